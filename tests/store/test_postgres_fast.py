"""The one-statement writes of a run this PostgreSQL store claimed or wrote last (``_fast``):
refused whenever the run changed since through anything else, and settled when the reply
is lost. (Their round trips: test_postgres.py's
``test_a_task_outcome_and_the_next_start_cost_few_round_trips``; a cancel while one waits
for a lock: its ``test_a_trio_cancel_in_the_middle_of_a_query_leaves_the_pool_healthy``.)"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiki.errors import StaleLease, StepConflict
from aiki.records import RunRecord, StepRecord
from aiki.store import Lease, MemoryStore, execute
from aiki.store import machine as m
from aiki.store import ops as o
from aiki.store.postgres import PostgresStore, _fast, _sql
from tests.conftest import TestPostgres
from tests.store import test_conformance as conformance
from tests.store.test_conformance import step
from tests.store.test_postgres import (
    WF,
    counting_statements,
    enqueue,
    generic_plan,
    lose_reply_after_commit,
    raw_connection,
)


async def claimed_and_started(store: PostgresStore, run_id: str = "r1") -> Lease:
    """``run_id`` enqueued, claimed by ``store`` and its step 0 started (one statement)."""
    await execute(store, enqueue(run_id))
    [claimed] = await execute(store, o.Claim("w1", WF, 1, 2.0, 30.0))
    assert await execute(store, o.StartStep(claimed.lease, step("0", state="running"), 3.0))
    return claimed.lease


async def events(store: PostgresStore, run_id: str = "r1") -> list[str]:
    return [e.event for e in await store.get_history(run_id)]


async def test_a_run_cancelled_through_another_server_is_decided_on_what_it_is_now(
    postgres: TestPostgres,
) -> None:
    """The first store kept the run as it started step 0; another revoked the lease. The
    outcome sent under the old lease is refused, as it is on the locked way, not written on
    what the first store kept."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as first, \
            PostgresStore.open(postgres.dsn, schema=schema) as second:
        lease = await claimed_and_started(first)
        cancelled = await execute(second, o.CancelRun("r1", "enough", 60.0, "ops", 4.0))
        assert cancelled.cancelled
        [outcome] = await first.apply([o.SaveStep(lease, step("0"), 5.0)])
        assert isinstance(outcome, StaleLease)
        assert "task.completed" not in await events(first)


async def test_a_step_written_without_its_run_row_still_changes_the_runs_version(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every write of a run's steps writes its row (``_sql.TOUCH``), so its version tells:
    step 0, failed by a writer that changes nothing of the run's row, is not overwritten by
    an outcome decided on the step as the store kept it (running)."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as raw:
        lease = await claimed_and_started(store)
        version = await raw.fetchval("SELECT xmin::text FROM runs WHERE id = 'r1'")
        failed = step("0", state="failed", error=("Boom", "it broke"))
        entry = m.Entry(3.5, "task.failed", 1, "w2", "0", "charge", "Boom: it broke")
        await raw.bridge.run(_sql._write, raw.conn, "r1",
                             m.Change(steps=(failed,), history=(entry,)))
        assert await raw.fetchval("SELECT xmin::text FROM runs WHERE id = 'r1'") != version
        [outcome] = await store.apply([o.SaveStep(lease, step("0"), 5.0)])
        assert isinstance(outcome, StepConflict)
        [stored] = await store.get_steps("r1")
        assert stored.state == "failed"
        # A batch of several runs' task outcomes whose change has steps and no run row
        # (none does today) writes the row too.
        other = await claimed_and_started(store, "r2")

        def steps_alone(op: Any, *args: Any) -> m.Change:
            return m.Change(steps=(op.step,), history=(
                m.Entry(op.now, "task.completed", 1, "w1", op.step.position, op.step.name),))

        monkeypatch.setattr(m, "decide_step", steps_alone)
        versions = await raw.fetch("SELECT id, xmin::text FROM runs ORDER BY id")
        assert await store.apply([o.SaveStep(lease, step("1"), 6.0),
                                  o.SaveStep(other, step("1"), 6.0)]) == [True, True]
        for run_id, before in versions:
            assert await raw.fetchval("SELECT xmin::text FROM runs WHERE id = $1",
                                      run_id) != before


async def test_a_run_renewed_here_stays_on_the_one_statement_path(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A heartbeat renews the lease of a run this store keeps: the renewal notes the row's
    new version (the row as kept, renewed), so the run's next writes are one statement
    each, not the locked way's four until its next claim (a run that lives longer than a
    heartbeat interval, ten seconds by default, is most of its life on the locked way)."""
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        lease = await claimed_and_started(store)
        statements, _ = counting_statements(monkeypatch)
        assert await execute(store, o.Renew((lease,), 10.0, 30.0)) == ()
        assert statements == ["BEGIN", "UPDATE", "COMMIT"]
        statements.clear()
        assert await store.apply([o.SaveStep(lease, step("0"), 11.0),
                                  o.StartStep(lease, step("1", state="running"), 11.0,
                                              30.0)]) == [True, True]
        assert statements == ["WITH"]
        run = await store.get_run("r1")
        assert run is not None and run.lease_expires_at == 41.0
        statements.clear()
        # Two heartbeats in one batch: the second renewal finds the row written by the
        # first, so the row is not as the first noted it: the run's next write goes the
        # locked way (reading the row as it is), not to a row version that is gone.
        assert await store.apply([o.Renew((lease,), 12.0, 30.0),
                                  o.Renew((lease,), 13.0, 30.0)]) == [(), ()]
        statements.clear()
        assert [getattr(x, "state", x) for x in await store.apply([
            o.SaveStep(lease, step("1"), 14.0), o.CompleteRun(lease, '"done"', 14.0)])
        ] == [True, "completed"]
        assert statements[0] == "BEGIN"
        run = await store.get_run("r1")
        assert run is not None and run.state == "completed" and run.finished_at == 14.0


async def test_a_heartbeat_batched_with_its_runs_write_keeps_the_run_on_one_statement(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store writer merges a worker's heartbeat with its run's task start: the renewal
    goes first, the locked way, noting the row renewed; the start is then one statement,
    and so is the run's next write. (Together, the locked way, they took the run off the
    one-statement path for the rest of its life.) The outcomes come back in the batch's
    order, a renewal's after the write it followed."""
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        lease = await claimed_and_started(store)
        statements, _ = counting_statements(monkeypatch)
        assert await store.apply([
            o.SaveStep(lease, step("0"), 10.0),
            o.Renew((lease, Lease("gone", 1, "w1")), 10.0, 30.0),
            o.StartStep(lease, step("1", state="running"), 10.0, 30.0),
        ]) == [True, ("gone",), True]
        assert statements == ["BEGIN", "UPDATE", "UPDATE", "COMMIT", "WITH"]
        statements.clear()
        assert [getattr(x, "state", x) for x in await store.apply([
            o.SaveStep(lease, step("1"), 11.0), o.Renew((lease,), 11.0, 30.0),
            o.CompleteRun(lease, '"done"', 11.0)])] == [True, (), "completed"]
        assert statements == ["BEGIN", "UPDATE", "COMMIT", "WITH"]
        run = await store.get_run("r1")
        assert run is not None and run.state == "completed" and run.lease_expires_at is None
        assert await events(store) == ["run.queued", "run.running", "task.running",
                                       "task.completed", "task.running", "task.completed",
                                       "run.completed"]


async def test_a_run_renewed_after_another_server_changed_it_is_decided_on_what_it_is_now(
    postgres: TestPostgres,
) -> None:
    """Another server paused the run (its lease stays): the renewal here renews it, but does
    not note the row as kept renewed; the next task start is refused as paused, as on the
    locked way, not written on the run as kept (running)."""
    from aiki.errors import RunPaused

    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as first, \
            PostgresStore.open(postgres.dsn, schema=schema) as second:
        lease = await claimed_and_started(first)
        await execute(first, o.SaveStep(lease, step("0"), 4.0))
        paused = await execute(second, o.PauseRun("r1", "ops", 5.0))
        assert paused.run.state == "paused"
        assert await execute(first, o.Renew((lease,), 10.0, 30.0)) == ()
        [outcome] = await first.apply([o.StartStep(lease, step("1", state="running"), 11.0,
                                                   30.0)])
        assert isinstance(outcome, RunPaused)
        assert [s.position for s in await first.get_steps("r1")] == ["0"]
        run = await first.get_run("r1")
        assert run is not None and run.state == "paused" and run.lease_expires_at == 40.0


async def test_a_run_held_by_another_writer_is_decided_on_what_it_commits(
    postgres: TestPostgres,
) -> None:
    """A transaction that asks for the run's cancel holds its row: the statement does not
    wait for it (SKIP LOCKED) and writes nothing on what the store kept; the locked way
    waits, then reads what the holder committed: the run ends cancelled, not completed."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as holder, \
            raw_connection(postgres, schema) as watcher:
        lease = await claimed_and_started(store)
        await holder.execute("BEGIN")
        await holder.execute("UPDATE runs SET cancel_requested_at = 4.5,"
                             " cancel_reason = 'held' WHERE id = 'r1'")
        outcomes: list[Any] = []

        async def finish() -> None:
            outcomes.extend(await store.apply([o.SaveStep(lease, step("0"), 5.0),
                                               o.CompleteRun(lease, '"done"', 5.0)]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            with trio.fail_after(10):
                while not await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'aiki' AND wait_event_type = 'Lock'"):
                    await trio.sleep(0.02)
            await holder.execute("COMMIT")
        assert outcomes[0] is True
        assert isinstance(outcomes[1], RunRecord) and outcomes[1].state == "cancelled"
        run = await store.get_run("r1")
        assert run is not None and run.state == "cancelled"


async def test_a_run_that_ends_waits_for_a_child_it_has_no_step_of(
    postgres: TestPostgres,
) -> None:
    """A run's end counts its unfinished children as the locked way does, even one no
    step of it records (a run id used again after a purge, whose old child is retried):
    the statement writes nothing, and the locked way has the run wait for the child."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as raw:
        lease = await claimed_and_started(store)
        await raw.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " created_at, updated_at, parent_id, detached)"
            " VALUES ('c1', 'wf', '1', '{}', 'queued', 0, 0, 1.0, 1.0, 'r1', false)")
        outcomes = await store.apply([o.SaveStep(lease, step("0"), 5.0),
                                      o.CompleteRun(lease, '"done"', 5.0)])
        assert outcomes[0] is True
        assert isinstance(outcomes[1], RunRecord) and outcomes[1].state == "waiting"


async def test_a_held_run_is_not_waited_for_in_one_statement(
    postgres: TestPostgres,
) -> None:
    """The run's row is held by another transaction: the statement takes it SKIP LOCKED,
    writes nothing, and the batch goes the locked way, which waits for the lock inside a
    transaction; cancelled there, it keeps nothing, even once the lock is free. (An
    autocommitted statement waiting for the lock would commit when it came free, after its
    caller was told it was cancelled: its server process does not notice the client left.)"""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema, max_size=1) as store, \
            raw_connection(postgres, schema) as holder:
        lease = await claimed_and_started(store)
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")
        waiting: list[int] = []  # whoever waits for the holder
        modes: list[str] = []  # its locks on the runs table
        with trio.move_on_after(5) as waited:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.apply, [o.CompleteRun(lease, '"done"', 5.0)])
                while not waiting:
                    waiting = [row[0] for row in await holder.fetch(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))")]
                    await trio.sleep(0.02)
                modes = [row[0] for row in await holder.fetch(
                    "SELECT mode FROM pg_locks WHERE pid = ANY($1::int[]) AND granted"
                    " AND locktype = 'relation' AND relation = 'runs'::regclass", waiting)]
                nursery.cancel_scope.cancel()
        assert not waited.cancelled_caught
        # The locked way's lock (FOR UPDATE: RowShareLock on the table), not the statement
        # that writes (RowExclusiveLock, taken before its row's lock).
        assert modes == ["RowShareLock"], modes
        await holder.execute("COMMIT")
        with trio.fail_after(5):  # the cancelled transaction's process ends, rolled back
            while await holder.fetchval("SELECT count(*) FROM pg_stat_activity"
                                        " WHERE pid = ANY($1::int[])", waiting):
                await trio.sleep(0.05)
        run = await store.get_run("r1")
        assert run is not None and run.state == "running"


async def reply_lost_after_the_write(conn: Any, p: _fast.Plan) -> tuple[str, str] | None:
    assert await real_write(conn, p) is not None  # written and committed
    conn.terminate()
    raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


async def connection_lost_before_the_write(conn: Any, p: _fast.Plan,
                                           ) -> tuple[str, str] | None:
    conn.terminate()
    return await real_write(conn, p)  # fails: the connection is closed


real_write = _fast.write


@pytest.mark.parametrize("fault", [reply_lost_after_the_write,
                                   connection_lost_before_the_write])
async def test_a_lost_reply_is_settled_by_the_statements_history_event(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fault: Any,
) -> None:
    """Committed: found by its first history event, and its outcomes are returned as if
    nothing had happened. Not committed: run again (the locked way). Once either way."""
    caplog.set_level(logging.WARNING)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        lease = await claimed_and_started(store)
        faults = [fault]

        async def once(conn: Any, p: _fast.Plan) -> tuple[str, str] | None:
            return await (faults.pop() if faults else real_write)(conn, p)

        monkeypatch.setattr(_fast, "write", once)
        outcomes = await store.apply([o.SaveStep(lease, step("0"), 4.0),
                                      o.StartStep(lease, step("1", state="running"), 4.0)])
        assert not faults and outcomes == [True, True]
        assert await events(store) == ["run.queued", "run.running", "task.running",
                                       "task.completed", "task.running"]
    settled = "the one-statement write of run r1 (task.completed) was committed" in caplog.text
    assert settled == (fault is reply_lost_after_the_write), caplog.text


real_commit = _sql.commit


@pytest.mark.parametrize("fault", ["renewals", reply_lost_after_the_write,
                                   connection_lost_before_the_write])
async def test_a_heartbeat_and_a_write_whose_reply_was_lost_are_applied_once(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fault: Any,
) -> None:
    """A renewal and a write of its run, sent apart (the renewal first): the renewal's
    reply lost, the batch runs again (a renewal repeated renews as it did); the write's
    lost, its fate settles the batch's. Either way every op is applied once, and the
    outcomes come back in the batch's order."""
    caplog.set_level(logging.WARNING)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        lease = await claimed_and_started(store)
        faults = [fault]
        if fault == "renewals":
            async def commit_once(conn: Any) -> None:
                await (lose_reply_after_commit if faults and faults.pop() else real_commit)(
                    conn)

            monkeypatch.setattr(_sql, "commit", commit_once)
        else:
            async def write_once(conn: Any, p: _fast.Plan) -> tuple[str, str] | None:
                return await (faults.pop() if faults else real_write)(conn, p)

            monkeypatch.setattr(_fast, "write", write_once)
        outcomes = await store.apply([o.Renew((lease,), 4.0, 30.0),
                                      o.SaveStep(lease, step("0"), 4.0),
                                      o.StartStep(lease, step("1", state="running"), 4.0)])
        assert not faults and outcomes == [(), True, True]
        assert await events(store) == ["run.queued", "run.running", "task.running",
                                       "task.completed", "task.running"]
        run = await store.get_run("r1")
        assert run is not None and run.lease_expires_at == 34.0
    settled = "the one-statement write of run r1 (task.completed) was committed" in caplog.text
    assert settled == (fault is reply_lost_after_the_write), caplog.text


async def test_a_statement_still_running_is_ended_before_its_fate_is_read(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server process of the lost statement has not noticed its client left, and its
    history event is written but not committed: the store ends that process first (its
    write is rolled back), then finds no event, and runs the batch again."""
    schema = postgres.fresh_schema()
    orphans: list[Any] = []

    async def still_running(conn: Any, p: _fast.Plan) -> tuple[str, str] | None:
        monkeypatch.setattr(_fast, "write", real_write)
        orphan = await asyncpg.connect(postgres.dsn, server_settings={"search_path": schema})
        orphans.append(orphan)
        await orphan.execute("BEGIN")
        await orphan.execute(_sql.HISTORY_INSERT, *p.history[0])
        conn.terminate()  # this statement is gone; the orphan's stands in for it
        raise _sql.CommitUnknown(ConnectionResetError("reset by peer"), p.outcomes, None,
                                 orphan.get_server_pid(), p.history)

    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        lease = await claimed_and_started(store)
        monkeypatch.setattr(_fast, "write", still_running)
        assert await store.apply([o.SaveStep(lease, step("0"), 4.0)]) == [True]
        assert orphans and await events(store) == [
            "run.queued", "run.running", "task.running", "task.completed"]


async def test_a_lost_reply_is_not_settled_by_another_statements_equal_event(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another statement committed the batch's first event, equal to the letter (the same
    task outcome at the same reading of the clock), and changed the run, so the batch's
    statement wrote nothing; then its reply was lost. The events of one transaction
    settle its fate, all of them: the batch is found not committed and runs again (its
    task start is recorded), where the first event alone would have said committed."""
    schema = postgres.fresh_schema()

    async def another_wrote_first(conn: Any, p: _fast.Plan) -> tuple[str, str] | None:
        monkeypatch.setattr(_fast, "write", real_write)
        other = await asyncpg.connect(postgres.dsn, server_settings={"search_path": schema})
        try:
            await other.execute(_sql.HISTORY_INSERT, *p.history[0])
            await other.execute(_sql.TOUCH, [p.run_id])
        finally:
            await other.close()
        assert await real_write(conn, p) is None  # the run changed: nothing written
        conn.terminate()
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        lease = await claimed_and_started(store)
        monkeypatch.setattr(_fast, "write", another_wrote_first)
        await store.apply([o.SaveStep(lease, step("0"), 4.0),
                           o.StartStep(lease, step("1", state="running"), 4.0)])
        assert [(s.position, s.state) for s in await store.get_steps("r1")] == [
            ("0", "completed"), ("1", "running")]


# -- a run claimed as it is enqueued (NEW_CLAIMED) --------------------------------------------
def claim(now: float = 2.0) -> o.Claim:
    return o.Claim("w1", WF, 1, now, 30.0)


def counting_inserts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str] | None]:
    """What each one-statement enqueue-and-claim returned (None: nothing written)."""
    sent: list[tuple[str, str] | None] = []

    async def counted(conn: Any, p: _fast.NewClaimed) -> tuple[str, str] | None:
        sent.append(await real_insert(conn, p))
        return sent[-1]

    monkeypatch.setattr(_fast, "insert", counted)
    return sent


real_insert = _fast.insert


async def test_a_run_enqueued_with_its_claim_is_written_as_the_locked_way_writes_it(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One statement; the run, its history and the outcomes are those of the locked way
    (the same batch in another schema, with the one-statement writes off), and the run's
    next task start goes in one statement too: the store keeps the run it wrote."""
    sent = counting_inserts(monkeypatch)
    seen: list[Any] = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(_fast, "plan_new", lambda ops: None)
        async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
            outcomes = await store.apply([enqueue("r1"), claim()])
            [[claimed]] = outcomes[1:]
            assert await execute(store, o.StartStep(claimed.lease, step("0", state="running"),
                                                    3.0))
            history = [(e.at, e.event, e.attempt, e.worker_id, e.detail)
                       for e in await store.get_history("r1")]
            seen.append((outcomes, await store.get_run("r1"), history))
            if fast:
                assert sent and sent[0] is not None
                assert store._fresh.get("r1") is not None  # (the start went in one statement)
    assert len(sent) == 1 and seen[0] == seen[1]
    outcomes, run, history = seen[0]
    assert outcomes[0] == o.EnqueueOutcome("r1", created=True)
    assert run.state == "running" and run.lease_owner == "w1" and run.attempts == 1
    assert [h[1] for h in history] == ["run.queued", "run.running", "task.running"]


async def test_a_run_queued_before_is_claimed_first(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim takes the oldest queued run of its version, as always: with one queued
    already, the new run is not written as leased; the batch goes the locked way."""
    sent = counting_inserts(monkeypatch)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await execute(store, enqueue("r1"))
        created, claimed = await store.apply([enqueue("r2"), claim()])
        assert sent == [None]
        assert created == o.EnqueueOutcome("r2", created=True)
        assert [c.run.id for c in claimed] == ["r1"]
        assert [(r.id, r.state) for r in await store.list_runs()] == [
            ("r2", "queued"), ("r1", "running")]
        assert await events(store, "r2") == ["run.queued"]


async def test_a_run_queued_before_and_held_elsewhere_is_skipped_as_the_locked_way_skips_it(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another transaction holds the older queued run (claiming it): the statement sees it
    queued and writes nothing; the locked way's claim skips it (SKIP LOCKED) and leases the
    new run. The same outcome either way, one statement later."""
    sent = counting_inserts(monkeypatch)
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as raw:
        await execute(store, enqueue("r1"))
        await raw.execute("BEGIN")
        await raw.execute("SELECT FROM runs WHERE id = 'r1' FOR UPDATE")
        created, claimed = await store.apply([enqueue("r2"), claim()])
        await raw.execute("ROLLBACK")
        assert sent == [None] and created == o.EnqueueOutcome("r2", created=True)
        assert [c.run.id for c in claimed] == ["r2"]
        assert [(r.id, r.state) for r in await store.list_runs()] == [
            ("r2", "running"), ("r1", "queued")]


@pytest.mark.parametrize("again", ["run id", "idempotency key"])
async def test_an_enqueue_of_a_run_that_exists_writes_nothing_in_one_statement(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, again: str,
) -> None:
    """The run's id, or its idempotency key, names a run leased already: the statement
    writes nothing (no history event, no second run), and the locked way answers with the
    existing run and a claim of nothing."""
    sent = counting_inserts(monkeypatch)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await store.apply([enqueue("r1", key="k"), claim()])
        op = enqueue("r1") if again == "run id" else enqueue("r2", key="k")
        created, claimed = await store.apply([op, claim(4.0)])
        assert sent[0] is not None and sent[1:] == [None]
        assert created == o.EnqueueOutcome("r1", created=False) and claimed == ()
        assert [r.id for r in await store.list_runs()] == ["r1"]
        assert await events(store, "r1") == ["run.queued", "run.running"]


async def test_a_lost_reply_of_an_enqueue_and_its_claim_is_settled_by_its_events(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Committed, then the reply lost: found by its two history events, and the claim's
    outcome is returned once, not run again (which would find the run leased, and claim
    nothing)."""
    caplog.set_level(logging.WARNING)
    lost: list[bool] = []

    async def lost_after(conn: Any, p: _fast.NewClaimed) -> tuple[str, str] | None:
        monkeypatch.setattr(_fast, "insert", real_insert)
        assert await real_insert(conn, p) is not None
        conn.terminate()
        lost.append(True)
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    monkeypatch.setattr(_fast, "insert", lost_after)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        created, claimed = await store.apply([enqueue("r1"), claim()])
        assert lost and created == o.EnqueueOutcome("r1", created=True)
        assert [c.run.id for c in claimed] == ["r1"]
        assert await events(store) == ["run.queued", "run.running"]
    assert "the one-statement write of run r1 (run.queued) was committed" in caplog.text


def test_fresh_keeps_a_bounded_number_of_runs_of_bounded_size() -> None:
    run = RunRecord(
        id="r", workflow="wf", version="1", payload="{}", state="running",
        idempotency_key=None, attempts=1, lease_epoch=1, lease_owner="w1",
        lease_expires_at=30.0, result=None, error_type=None, error_message=None,
        created_at=1.0, updated_at=1.0, finished_at=None)
    steps: dict[str, StepRecord] = {str(i): step(str(i)) for i in range(3)}
    fresh = _fast.Fresh(limit=4, max_steps=2)
    fresh.learn("big", _fast.Seen("1", "(0,1)", run, steps))
    assert fresh.get("big") is None  # too many steps to keep
    for i in range(6):
        fresh.learn(f"r{i}", _fast.Seen("1", "(0,1)", run, {}))
    assert len(fresh) <= 4 and fresh.get("r5") is not None and fresh.get("r0") is None
    fresh.after_locked([o.SaveStep(Lease("r5", 1, "w1"), step("0"), 2.0)], [True], {}, {})
    assert fresh.get("r5") is None  # the locked way wrote it: forgotten


@pytest.mark.parametrize("runs", [0, 600])
async def test_the_one_statement_writes_read_no_table_in_full(
    postgres: TestPostgres, runs: int,
) -> None:
    """An autocommitted statement cannot ``SET LOCAL enable_seqscan = off`` as the locked
    way's BEGIN does (see test_postgres.py's
    ``test_a_batch_reads_no_table_in_full_however_small_the_tables_are``): its generic plan
    must find the run by its place (:data:`_fast.WRITE`) or the queued runs of a version
    through their index (:data:`_fast.NEW_CLAIMED`) by itself: in a new store, and in a
    small one before and after its statistics are taken. (Once statistics say a table is
    empty, a full read of it is the plan; the next ANALYZE, when rows come, makes the plan
    again: checked by hand, PostgreSQL 18.)"""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        if runs:
            await store.apply([enqueue(f"r{i:03}") for i in range(runs)])
            claimed = await execute(store, o.Claim("w1", WF, runs // 2, 2.0, 30.0))
            await store.apply([o.StartStep(c.lease, step("0", state="running"), 3.0, 30.0)
                               for c in claimed])
    async with raw_connection(postgres, schema) as raw:
        for analyzed in (False, True) if runs else (False,):
            if analyzed:
                await raw.execute("ANALYZE")
            for name in ("WRITE", "NEW_CLAIMED"):
                plan = await generic_plan(raw, getattr(_fast, name))
                assert "Seq Scan" not in plan, (name, analyzed, plan)


# Runs' lives as one store at a time writes them, so that most batches are one run's and the
# one-statement paths take them, with another store's writes between: controls, events,
# expiries, claims of runs the first kept.
_RUNNING = st.tuples(st.just(True), st.integers(0, 7))
_life_step = st.tuples(
    st.sampled_from(["start_step", "save_step", "save_step"]), _RUNNING, st.just("current"),
    st.sampled_from(["0", "1", "2"]), st.just("pay"), st.just(None),
    st.sampled_from(["completed", "completed", "retrying", "failed"]), st.just('"a"'),
    st.just("task"), st.integers(1, 2))
_proceed = st.tuples(st.just("proceed"), _RUNNING)
_life = st.one_of(
    conformance.enqueue_command, conformance.claim_command, conformance.claim_command,
    _proceed, _proceed, _proceed, _proceed, _proceed, _proceed, _life_step,
    st.tuples(st.just("complete"), _RUNNING, st.just("current")),
    st.tuples(st.just("renew"), st.lists(st.tuples(_RUNNING, st.just("current")), min_size=1,
                                         max_size=2), st.sampled_from([5.0, 50.0])),
    st.tuples(st.just("renew"), st.lists(st.tuples(_RUNNING, st.just("current")), min_size=1,
                                         max_size=2), st.sampled_from([5.0, 50.0])),
    st.tuples(st.just("pause"), st.integers(0, 7)),
    st.tuples(st.just("pause"), st.integers(0, 7)),
    st.tuples(st.just("resume"), st.integers(0, 7)),
    st.tuples(st.just("send"), st.integers(0, 7), st.just("go"), st.just(None)),
    st.tuples(st.just("cancel"), st.integers(0, 7), st.just(None), st.sampled_from([0.0, 3.0])),
    st.tuples(st.just("expire")),
    st.tuples(st.just("wake")),
)
# A heartbeat merged with its run's next write (renewals first, then the one-statement path):
_beat_and_proceed = st.integers(0, 7).map(lambda k: [
    ("renew", [((True, k), "current")], 50.0), ("proceed", (True, k))])
_lives = st.lists(  # (one op a batch: a batch of two runs' ops goes the locked way)
    st.tuples(st.sampled_from([0.0, 0.5, 1.0, 5.0, 20.0]), st.one_of(
        st.lists(_life, min_size=1, max_size=1), st.lists(_life, min_size=1, max_size=1),
        _beat_and_proceed)),
    min_size=10, max_size=40)


class Lives(conformance.World):
    """The conformance suite's commands, and ``proceed``: the run's next write as its worker
    would send it, under its current lease (the last task started: its outcome; else the
    next task's start)."""

    async def op(self, cmd: tuple[Any, ...]) -> o.Op[Any]:
        if cmd[0] != "proceed":
            return await super().op(cmd)
        lease = await self.lease(cmd[1], "current")
        tasks = [s for s in await self.reference.get_steps(lease.run_id)
                 if s.kind == "task" and s.position.isdigit()]
        last = max(tasks, key=lambda s: int(s.position), default=None)
        if last is not None and last.state == "running":
            return o.SaveStep(lease, step(last.position, last.name, attempts=last.attempts),
                              self.now)
        position = "0" if last is None else str(int(last.position) + 1)
        return o.StartStep(lease, step(position, "pay", "running"), self.now, 30.0)


class Losses:
    """The store's seams around a commit (a transaction's COMMIT, a one-statement write, an
    enqueue written claimed), losing the connection at the next one reached once armed:
    ``after`` it was sent and done (the reply lost), or ``before``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed: str | None = None
        monkeypatch.setattr(_sql, "commit", self.wrap(_sql.commit))
        monkeypatch.setattr(_fast, "write", self.wrap(_fast.write))
        monkeypatch.setattr(_fast, "insert", self.wrap(_fast.insert))

    def wrap(self, real: Any) -> Any:
        async def seam(conn: Any, *args: Any) -> Any:
            how, self.armed = self.armed, None
            if how == "before":
                conn.terminate()
                return await real(conn, *args)  # fails: the connection is closed
            result = await real(conn, *args)
            if how == "after":
                conn.terminate()
                raise asyncpg.ConnectionDoesNotExistError(
                    "connection was closed in the middle of operation")
            return result

        return seam


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=_lives, routes=st.lists(st.booleans(), min_size=1, max_size=40),
       losses=st.lists(st.sampled_from([None, None, None, None, "after", "before"]),
                       min_size=1, max_size=40))
async def test_two_stores_on_one_schema_match_the_reference(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
    batches: list[tuple[float, list[tuple[Any, ...]]]], routes: list[bool],
    losses: list[str | None],
) -> None:
    """Two stores on one schema (two servers), each batch applied by one or the other, do
    what one reference store does: what a store keeps of the runs it claimed, wrote or
    renewed (``Fresh``), and of the runs whose end writes no other run (``Parents``), is
    never taken for the truth once the other changed them. (The simulation runs the memory
    store; this is the one-statement paths' sweep. Measured: with the statement's version
    check dropped it failed 3 runs in 3; a renewal's check, which needs a pause, a renewal
    and a write in turn, is left to the tests above. About half the batches that
    merge a heartbeat with its run's next write take the renewals-first path: some 190 in
    60 examples.) A batch in three loses its connection at its first commit, before it or
    with its reply: settled by reading its fate, or run again, it is applied once all the
    same, whichever path it took."""
    reference = MemoryStore()
    world = Lives(reference)
    lose = Losses(monkeypatch)
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as first, \
            PostgresStore.open(postgres.dsn, schema=schema) as second:
        for i, (dt, commands) in enumerate([*conformance.PRELUDE, *batches]):
            world.now += dt
            ops = [await world.op(cmd) for cmd in commands]
            store = first if routes[i // 5 % len(routes)] else second  # (stretches)
            expected = [conformance.comparable(x) for x in await reference.apply(ops)]
            loss = losses[i % len(losses)] if i >= len(conformance.PRELUDE) else None
            lose.armed = loss
            assert [conformance.comparable(x) for x in await store.apply(ops)] == expected, (
                "first" if store is first else "second", ops, loss)
            assert (await conformance.observe(store, world.run_ids)
                    == await conformance.observe(reference, world.run_ids))
