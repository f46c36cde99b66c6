"""What only the PostgreSQL store has to prove: URLs, migrations, outages, unknown commits,
cancellation across the bridge to the asyncio thread, and several stores sharing one database.

The conformance suite (``test_conformance.py``) already holds it to the memory model; these
run against the session's real server (``postgres`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiki
from aiki.asyncio_bridge import AsyncioThread
from aiki.errors import StaleLease, StoreUnavailable
from aiki.records import RunRecord, StepRecord, WaitFor
from aiki.store import Lease, Store, execute, open_store
from aiki.store import ops as o
from aiki.store.postgres import PostgresStore, _fast, _sql
from aiki.store.postgres._schema import MIGRATIONS
from tests.conftest import TestPostgres

WF = (("wf", "1"),)


def enqueue(run_id: str, key: str | None = None, now: float = 1.0) -> o.Enqueue:
    return o.Enqueue(run_id, "wf", "1", "{}", key, now)


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@attrs.define
class Raw:
    """A plain asyncpg connection beside the store, for holding locks and peeking."""

    bridge: AsyncioThread
    conn: Any

    async def execute(self, sql: str, *args: Any) -> str:
        result: str = await self.bridge.run(self.conn.execute, sql, *args)
        return result

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.bridge.run(self.conn.fetchval, sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self.bridge.run(self.conn.fetch, sql, *args)
        return rows


@asynccontextmanager
async def raw_connection(postgres: TestPostgres, schema: str) -> AsyncIterator[Raw]:
    async with AsyncioThread.open() as bridge:
        conn = await bridge.run(asyncpg.connect, postgres.dsn,
                                server_settings={"search_path": schema})
        try:
            yield Raw(bridge, conn)
        finally:
            bridge.call_soon(conn.terminate)


# -- opening ----------------------------------------------------------------------------------
async def test_open_store_accepts_postgresql_and_postgres_urls(postgres: TestPostgres) -> None:
    schema = postgres.fresh_schema()
    assert postgres.dsn.startswith("postgresql://")
    for url in (postgres.dsn, "postgres://" + postgres.dsn[len("postgresql://"):]):
        store = await open_store(with_schema(url, schema))
        try:
            assert isinstance(store, PostgresStore)
            assert store.schema == schema
            await execute(store, enqueue(f"r-{len(url)}"))
        finally:
            await store.aclose()
    async with raw_connection(postgres, schema) as raw:
        assert await raw.fetchval("SELECT count(*) FROM runs") == 2
    with pytest.raises(ValueError, match="postgresql://user:password@host:port/database"):
        await open_store("mysql://nope")


async def test_an_awaited_store_closes_from_another_task_in_a_shielded_scope(
    postgres: TestPostgres,
) -> None:
    """The await form hosts its loop in a system task: aclose works wherever it is called."""
    store = await open_store(with_schema(postgres.dsn, postgres.fresh_schema()))
    await execute(store, enqueue("r1"))

    async def close_elsewhere() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await store.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_elsewhere)
    with pytest.raises(StoreUnavailable, match="is closed"):
        await store.get_run("r1")


@aiki.task(name="double")
async def double(x: int) -> int:
    return 2 * x


@aiki.workflow(name="doubling", version="1")
async def doubling(run: aiki.WorkflowRun, x: int) -> int:
    return await double.run(run, x) + 1


async def test_embedded_takes_a_postgresql_url(postgres: TestPostgres) -> None:
    url = with_schema(postgres.dsn, postgres.fresh_schema())
    async with aiki.embedded(store=url) as client:
        async with aiki.worker(client, workflows=[doubling]):
            handle = await doubling.enqueue(client, 20)
            assert await handle.wait_for_completion(timeout=30) == 41
    async with aiki.embedded(store=url) as client:  # a restart on the same database
        assert (await client.handle(handle.id).status()).state == "completed"


def counting_statements(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Every statement sent to PostgreSQL from now on (each a round trip): its first word,
    and its text."""
    statements: list[str] = []
    sent: list[str] = []
    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        original = getattr(asyncpg.Connection, name)

        def counting(self: Any, query: str, *args: Any, _original: Any = original,
                     **kwargs: Any) -> Any:
            statements.append(query.split()[0].rstrip(";"))
            sent.append(query)
            return _original(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, name, counting)
    return statements, sent


async def test_a_task_outcome_and_the_next_start_cost_few_round_trips(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path's statements, counted (each is a round trip to the server). A batch of
    one run this store claimed or wrote last (one at a time: a task start with the previous
    outcome, the last outcome with the run's end) is one statement (``_fast``). Otherwise
    task starts and outcomes together are BEGIN with the lock of their runs (one simple
    query), one read of the runs with their steps and the transaction's id, one write of
    steps, runs and history, COMMIT, however many there are.
    The completion of a run that has no parent goes with them (the store saw that when it
    claimed the run; for a run it did not, one read more asks, and the lock is a statement
    of its own). An op of another kind takes one read and one write of its own; enqueues,
    one statement together."""
    from tests.store.test_conformance import step

    statements, sent = counting_statements(monkeypatch)
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await store.apply([enqueue("r1"), enqueue("r0"), enqueue("r00")])
        assert statements[-4:] == ["BEGIN", "WITH", "SELECT", "COMMIT"]  # enqueues together
        statements.clear()
        [claimed] = await execute(store, o.Claim("w1", WF, 1, 2.0, 30.0))
        # A claim: the lease and its history in one statement, which returns the
        # transaction's id too; the runs' steps read after it (after the runs' locks).
        assert statements == ["BEGIN", "WITH", "SELECT", "COMMIT"]
        lease = claimed.lease
        statements.clear()
        await execute(store, o.StartStep(lease, step("0", state="running"), 3.0, 30.0))
        outcomes = await store.apply([o.SaveStep(lease, step("0"), 4.0),
                                      o.StartStep(lease, step("1", state="running"), 4.0, 30.0)])
        assert outcomes == [True, True]
        outcomes = await store.apply([o.SaveStep(lease, step("1"), 5.0),
                                      o.CompleteRun(lease, '"done"', 5.0)])
        assert [getattr(x, "state", x) for x in outcomes] == [True, "completed"]
        assert statements == ["WITH", "WITH", "WITH"]  # one statement each, autocommitted
        assert [(s.position, s.state) for s in await store.get_steps("r1")] == [
            ("0", "completed"), ("1", "completed")]
        assert [e.event for e in await store.get_history("r1")] == [
            "run.queued", "run.running", "task.running", "task.completed", "task.running",
            "task.completed", "run.completed"]
    # A run this store instance did not claim (another server did): the locked way, and
    # one read asks whether its end writes another run.
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as other:
        await execute(other, enqueue("r2"))
        [claimed] = await execute(other, o.Claim("w1", WF, 1, 2.0, 30.0))
        await execute(other, o.StartStep(claimed.lease, step("0", state="running"), 3.0))
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        statements.clear()
        sent.clear()
        outcomes = await store.apply([
            o.SaveStep(claimed.lease, step("0"), 4.0),
            o.StartStep(claimed.lease, step("1", state="running"), 4.0, 30.0)])
        assert outcomes == [True, True]
        assert statements == ["BEGIN", "SELECT", "WITH", "COMMIT"]
        assert sent[0].endswith("WHERE id IN (E'r2') ORDER BY id FOR UPDATE")
        statements.clear()
        outcomes = await store.apply([o.SaveStep(claimed.lease, step("1"), 5.0),
                                      o.CompleteRun(claimed.lease, '"done"', 5.0)])
        assert [getattr(x, "state", x) for x in outcomes] == [True, "completed"]
        assert statements == ["BEGIN", "SELECT", "SELECT", "SELECT", "WITH", "COMMIT"]


async def test_the_batched_writes_array_types_are_the_tables_column_types(
    postgres: TestPostgres,
) -> None:
    """The arrays a batch of task starts and outcomes is written from match the columns,
    also once something (cattrs) has resolved the records' type hints: read from the text
    of the annotations, an int field became text once they were classes, and every batched
    write failed."""
    import aiki.records

    attrs.resolve_types(aiki.records.RunRecord)
    attrs.resolve_types(aiki.records.StepRecord)
    assert _sql._RUN_TYPES == _sql._array_types(aiki.records.RunRecord)
    wanted = {"text": "text", "integer": "int8", "bigint": "int8",
              "double precision": "float8", "boolean": "bool"}
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema):
        pass
    async with raw_connection(postgres, schema) as raw:
        for table, record, types in (("runs", aiki.records.RunRecord, _sql._RUN_TYPES),
                                     ("steps", aiki.records.StepRecord, _sql._STEP_TYPES[1:])):
            rows = await raw.bridge.run(raw.conn.fetch, (
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = $1 AND table_name = $2"), schema, table)
            columns = {r["column_name"]: wanted[r["data_type"]] for r in rows}
            assert types == [columns[f.name] for f in attrs.fields(record)]


def test_a_batch_is_applied_in_an_order_that_keeps_each_runs_ops_in_turn() -> None:
    """Task starts and outcomes move forward to go together, and so do enqueues, but never
    past an earlier op of their run nor across an op that may touch several runs."""
    from tests.store.test_conformance import step

    def start(run: str) -> o.Op[Any]:
        return o.StartStep(Lease(run, 1, "w"), step("0", state="running"), 1.0)

    def release(run: str) -> o.Op[Any]:
        return o.ReleaseRun(Lease(run, 1, "w"), 1.0, "drains")

    def enqueue(run: str) -> o.Op[Any]:
        return o.Enqueue(run, "wf", "1", "{}", None, 1.0)

    def complete(run: str) -> o.Op[Any]:  # (it may also write its parent and children)
        return o.CompleteRun(Lease(run, 1, "w"), "1", 1.0)

    keyed = o.SaveStep(Lease("a", 1, "w"), step("1", key="k"), 1.0)
    ops = [start("a"), release("a"), start("b"), release("b"), start("a"), start("c"),
           o.ExpireLeases(1.0), release("c"), start("d"), keyed, start("a"), complete("b"),
           start("b")]
    assert _sql._order(ops) == [0, 2, 5, 1, 3, 4, 6, 8, 7, 9, 10, 11, 12]
    # The completion of a run whose end writes no other run ("alone") goes with the others.
    assert _sql._order(ops, frozenset("b")) == [0, 2, 5, 1, 3, 4, 6, 8, 11, 12, 7, 9, 10]
    ops = [start("a"), release("a"), complete("c"), start("b"), complete("b"), start("c")]
    assert _sql._order(ops) == [0, 1, 2, 3, 4, 5]
    assert _sql._order(ops, frozenset("bc")) == [0, 2, 3, 4, 5, 1]
    # Enqueues go together after the steady ops, unless an earlier op of their run stays.
    ops = [enqueue("x"), start("a"), release("a"), enqueue("a"), enqueue("y"), start("x")]
    assert _sql._order(ops) == [1, 0, 2, 3, 4, 5]  # y stays after a: runs' seq order
    assert _sql._order([release("x"), enqueue("x"), enqueue("y")]) == [0, 1, 2]

    @given(st.lists(st.tuples(st.sampled_from(["start", "release", "complete", "keyed",
                                                "expire", "enqueue"]),
                              st.sampled_from("abc")), max_size=12),
           st.frozensets(st.sampled_from("abc")))
    def check(drawn: list[tuple[str, str]], alone: frozenset[str]) -> None:
        made = {"start": start, "release": release, "complete": complete,
                "enqueue": enqueue, "expire": lambda run: o.ExpireLeases(1.0),
                "keyed": lambda run: attrs.evolve(keyed, lease=Lease(run, 1, "w"))}
        ops = [made[kind](run) for kind, run in drawn]
        order = _sql._order(ops, alone)
        assert sorted(order) == list(range(len(ops)))
        for run in "abc":
            mine = [k for k in order if _sql._run_of(ops[k], alone) in (run, None)]
            assert mine == sorted(mine)  # its ops in turn, and none across a barrier
        enqueues = [k for k in order if isinstance(ops[k], o.Enqueue)]
        assert enqueues == sorted(enqueues)  # runs are created in the order asked

    check()


async def test_a_child_whose_id_the_store_remembers_as_a_runs_with_no_parent_tells_its_parent(
    postgres: TestPostgres,
) -> None:
    """What the store remembers of a run's parent may be out of date (a run id used again
    after a purge on another server): the locked row has the last word."""
    from tests.store.test_children import join_step, start
    from tests.store.test_conformance import step

    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await store.apply([enqueue("p"), enqueue("r2")])
        leases = {c.run.id: c.lease for c in await execute(store, o.Claim("w1", WF, 5, 2.0,
                                                                          30.0))}
        await execute(store, start(leases["p"], "0"))
        await execute(store, o.AwaitStep(leases["p"], join_step("1", "p/0"), 11.0))
        await execute(store, o.WaitRun(leases["p"], (WaitFor("1", "join", "p/0"),), "joins",
                                       11.0))
        [child] = await execute(store, o.Claim("w1", WF, 5, 12.0, 30.0))
        await execute(store, o.StartStep(leases["r2"], step("0", state="running"), 12.0))
        store._parents.learn("p/0", True)  # out of date
        outcomes = await store.apply([o.SaveStep(leases["r2"], step("0"), 13.0),
                                      o.CompleteRun(child.lease, '"shipped"', 13.0)])
        assert [getattr(x, "state", x) for x in outcomes] == [True, "completed"]
        parent = await store.get_run("p")
        assert parent is not None and parent.state == "queued"  # woken: its child ended
        assert (await store.get_steps("p"))[-1].output == '"shipped"'


def test_only_the_hot_paths_batches_keep_generic_plans() -> None:
    """A timer's wake-up planned for no particular time would read every waiting run."""
    lease = Lease("r", 1, "w")
    assert _sql._begin([o.Enqueue("r", "wf", "1", "{}", None, 1.0),
                        o.CompleteRun(lease, "1", 1.0)]) == _sql.BEGIN_GENERIC
    for other in (o.WakeDue(1.0), o.ExpireLeases(1.0), o.PurgeRuns(1.0, 10)):
        assert _sql._begin([o.CompleteRun(lease, "1", 1.0), other]) == _sql.BEGIN


def test_the_store_remembers_whose_end_writes_no_other_run_and_forgets_ended_runs() -> None:
    """What ``Parents`` learns from a batch's outcomes: a run it claimed ends alone unless
    it has a parent or a schedule started it; a run ended or purged is forgotten; past its
    limit the oldest half is."""
    from aiki.store.memory import MemoryStore
    from tests.store.test_children import start
    from tests.store.test_conformance import enqueue, step

    memory = MemoryStore()
    parents = _sql.Parents(limit=6)

    def apply(ops: list[o.Op[Any]]) -> o.Outcomes:
        outcomes = memory.apply_now(ops)
        assert isinstance(outcomes, o.Outcomes)
        parents.applied(ops, outcomes)
        return outcomes

    apply([enqueue("p"), enqueue("s@1", key="schedule:s:1"), enqueue("p")])
    assert len(parents) == 0  # (a queued run costs nothing here)
    [p, s1] = apply([o.Claim("w1", WF, 5, 2.0, 30.0)])[0]
    assert parents._alone == {"p": True, "s@1": False}
    apply([start(p.lease, "0")])
    [child] = apply([o.Claim("w1", WF, 5, 3.0, 30.0)])[0]
    assert parents._alone == {"s@1": False, "p": True, "p/0": False}
    apply([o.StartStep(child.lease, step("0", state="running"), 4.0),
           o.CompleteRun(child.lease, "1", 4.0), o.FailRun(s1.lease, "E", "e", 4.0)])
    assert parents._alone == {"p": True}  # (its parent runs on)
    for n in range(7):
        parents.learn(f"r{n}", True)
    assert list(parents._alone) == ["r2", "r3", "r4", "r5", "r6"]  # p, r0, r1 dropped at r5


async def test_migrations_run_once_under_concurrent_starts(postgres: TestPostgres) -> None:
    schema = postgres.fresh_schema()

    async def start(i: int) -> None:
        # Each store owns its loop in its own task, so each opens and closes there.
        async with PostgresStore.open(postgres.dsn, schema=schema) as store:
            await execute(store, enqueue(f"r{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(start, i)
    async with raw_connection(postgres, schema) as raw:
        versions = await raw.fetchval("SELECT array_agg(version ORDER BY version)"
                                      " FROM schema_migrations")
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        assert await raw.fetchval("SELECT count(*) FROM runs") == 4
        # A database written by a newer aiki is refused, not half-used.
        await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)",
                          len(MIGRATIONS) + 1)
    with pytest.raises(StoreUnavailable, match="newer than this version of aiki knows"):
        await PostgresStore.open(postgres.dsn, schema=schema)


async def test_a_schema_of_the_release_before_waits_is_migrated_and_its_runs_finish(
    postgres: TestPostgres,
) -> None:
    """A schema written by the release before waits (migrations 1 and 2, a run ``sleeping``
    until its retry) is migrated at open, and its runs go on."""
    schema = postgres.fresh_schema()
    async with raw_connection(postgres, schema) as raw:
        await raw.execute(f'CREATE SCHEMA "{schema}"')
        await raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                          " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for number, statements in enumerate(MIGRATIONS[:2], start=1):
            for statement in statements:
                await raw.execute(statement)
            await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        for run_id, state, wake_at in (("sleeper", "sleeping", 50.0), ("queued", "queued", None)):
            await raw.execute(
                "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
                " wake_at, created_at, updated_at) VALUES ($1, 'wf', '1', 'null', $2, 1, 1,"
                " $3, 1.0, 2.0)", run_id, state, wake_at)
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        sleeper = await store.get_run("sleeper")
        assert sleeper is not None and sleeper.state == "waiting"
        [wait] = await store.get_waits("sleeper")
        assert (wait.kind, wait.due_at) == ("retry", 50.0)
        assert await store.next_due() == 50.0
        assert await execute(store, o.WakeDue(50.0)) == ("sleeper",)
        claimed = await execute(store, o.Claim("w", WF, 10, 51.0, 30.0))
        assert sorted(c.run.id for c in claimed) == ["queued", "sleeper"]
        for c in claimed:
            await execute(store, o.CompleteRun(c.lease, '"done"', 52.0))
        assert {r.state for r in await store.list_runs()} == {"completed"}


async def test_a_schema_of_the_release_before_cancellation_opens_and_its_runs_cancel(
    postgres: TestPostgres,
) -> None:
    """A schema written before cancellation (every migration before the one adding the
    cancel columns, wherever it stands) is migrated at open, and a run of it in flight can
    be cancelled, its grace period ended by the timer."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "cancel_requested_at" in m[0])
    schema = postgres.fresh_schema()
    async with raw_connection(postgres, schema) as raw:
        await raw.execute(f'CREATE SCHEMA "{schema}"')
        await raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                          " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for number, statements in enumerate(MIGRATIONS[:before], start=1):
            for statement in statements:
                await raw.execute(statement)
            await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        await raw.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " lease_owner, lease_expires_at, created_at, updated_at) VALUES"
            " ('r1', 'wf', '1', 'null', 'running', 1, 1, 'w', 99.0, 1.0, 2.0)")
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        run = await store.get_run("r1")
        assert run is not None and (run.state, run.cancel_requested_at) == ("running", None)
        out = await execute(store, o.CancelRun("r1", "old", 10.0, "c", 5.0))
        assert (out.cancelled, out.holder) == (True, "w")
        assert await store.next_due() == 15.0
        [ended] = await execute(store, o.EndCancels(15.0))
        assert ended is not None and (ended.state, ended.error_message) == ("cancelled", "old")


async def test_a_schema_of_the_release_before_children_opens_and_starts_children(
    postgres: TestPostgres,
) -> None:
    """A schema written before child runs (every migration before the one adding
    ``parent_id``, wherever it stands) is migrated at open; its runs start children."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "parent_id" in m[0])
    schema = postgres.fresh_schema()
    async with raw_connection(postgres, schema) as raw:
        await raw.execute(f'CREATE SCHEMA "{schema}"')
        await raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                          " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for number, statements in enumerate(MIGRATIONS[:before], start=1):
            for statement in statements:
                await raw.execute(statement)
            await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        await raw.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " lease_owner, lease_expires_at, created_at, updated_at) VALUES"
            " ('r1', 'wf', '1', 'null', 'running', 1, 1, 'w', 99.0, 1.0, 2.0)")
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        run = await store.get_run("r1")
        assert run is not None and (run.parent_id, run.detached) == (None, False)
        step = StepRecord("0", "child", "wf@1", "h", "{}", None, "running", 1)
        await execute(store, o.StartChild(Lease("r1", 1, "w"), step, "r1/0", "wf", "1", "{}",
                                          False, 5.0))
        [child] = await store.get_children("r1")
        assert (child.id, child.parent_id, child.detached) == ("r1/0", "r1", False)


async def test_a_schema_of_the_release_before_run_controls_is_migrated_and_takes_them(
    postgres: TestPostgres,
) -> None:
    """A schema of the release before run controls (every migration before the one adding
    ``forked_from``, wherever it stands) opens, is migrated, and its runs can be paused,
    resumed and forked."""
    before = next(i for i, m in enumerate(MIGRATIONS) if "forked_from" in m[0])
    schema = postgres.fresh_schema()
    async with raw_connection(postgres, schema) as raw:
        await raw.execute(f'CREATE SCHEMA "{schema}"')
        await raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                          " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for number, statements in enumerate(MIGRATIONS[:before], start=1):
            for statement in statements:
                await raw.execute(statement)
            await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        await raw.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " created_at, updated_at, finished_at) VALUES ('old', 'wf', '1', 'null',"
            " 'completed', 1, 1, 1.0, 2.0, 2.0)")
        await raw.execute(
            "INSERT INTO steps (run_id, position, kind, name, input_hash, input, state,"
            " attempts, output) VALUES ('old', '0', 'task', 't', 'h', '1', 'completed', 1,"
            " '2')")
        await raw.execute(
            "INSERT INTO runs (id, workflow, version, payload, state, attempts, lease_epoch,"
            " created_at, updated_at) VALUES ('queued', 'wf', '1', 'null', 'queued', 0, 0,"
            " 1.0, 1.0)")
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        old = await store.get_run("old")
        assert old is not None and (old.forked_from, old.control_id) == (None, None)
        fork = (await execute(store, o.ForkRun("old", "new", 1, None, "c", 3.0))).run
        assert (fork.forked_from, fork.forked_steps) == ("old", 1)
        assert [s.output for s in await store.get_steps("new")] == ["2"]
        assert (await execute(store, o.PauseRun("queued", "c", 4.0))).run.state == "paused"
        assert (await execute(store, o.ResumeRun("queued", "c", 5.0))).run.state == "queued"


async def test_the_indexes_that_keep_claims_and_status_fast_exist(postgres: TestPostgres) -> None:
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema):
        pass
    async with raw_connection(postgres, schema) as raw:
        indexes = await raw.fetchval(
            "SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes"
            " WHERE schemaname = $1", schema,
        )
    assert {"runs_idempotency", "runs_claim", "runs_lease", "waits_due", "runs_by_state",
            "runs_by_workflow", "steps_idempotency", "history_run"} <= set(indexes)


async def generic_plan(raw: Raw, sql: str) -> str:
    """The generic plan of ``sql`` (its parameters unknown), as EXPLAIN prints it."""
    # (EXPLAIN through a function: asyncpg would send the statement's $1 as a parameter.)
    await raw.execute(
        "CREATE OR REPLACE FUNCTION pg_temp.plan(q text) RETURNS SETOF text LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN QUERY EXECUTE 'EXPLAIN (GENERIC_PLAN) ' || q; END $$")
    return "\n".join(row[0] for row in await raw.fetch("SELECT pg_temp.plan($1)", sql))


async def test_a_batch_reads_no_table_in_full_however_small_the_tables_are(
    postgres: TestPostgres,
) -> None:
    """The statements of a batch find their rows by key, with the plans a batch makes
    (generic or not), before and after the tables' statistics are taken: at a few hundred
    runs PostgreSQL found a hash join over a full read of the runs and steps cheaper, kept
    that plan for the connection's life, and one task start's read took 0.6 ms, not 0.05."""
    from tests.store.test_conformance import step

    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store:
        await store.apply([enqueue(f"r{i:03}") for i in range(600)])
        claimed = await execute(store, o.Claim("w1", WF, 600, 2.0, 30.0))
        await store.apply([o.StartStep(c.lease, step(str(k), state="running"), 3.0, 30.0)
                           for c in claimed for k in range(3)])
    statements = {name: getattr(_sql, name) for name in (
        "_LOCK_RUNS", "_RUNS_AND_STEPS", "_SAVE_ALL", "_RUNS_OF", "_CLAIM", "_ENQUEUE_ALL")}
    async with raw_connection(postgres, schema) as raw:
        for analyzed in (False, True):
            if analyzed:
                await raw.execute("ANALYZE")
            for begin in (_sql.BEGIN, _sql.BEGIN_GENERIC):
                await raw.execute(begin)
                try:
                    for name, sql in statements.items():
                        plan = await generic_plan(raw, sql)
                        assert "Seq Scan" not in plan, (name, begin, analyzed, plan)
                finally:
                    await raw.execute("ROLLBACK")


async def test_bad_schema_names_are_refused() -> None:
    with pytest.raises(ValueError, match="plain lowercase PostgreSQL name"):
        PostgresStore.open("postgresql://x/y", schema='a"; DROP TABLE runs; --')


# -- the database going away ---------------------------------------------------------------------
async def test_an_unreachable_database_is_store_unavailable_naming_the_cause(
    tmp_path: Any,
) -> None:
    dsn = f"postgresql://aiki:secret@/aiki?host={tmp_path}"  # no server listens there
    with trio.fail_after(10):
        with pytest.raises(StoreUnavailable) as caught:
            await PostgresStore.open(dsn, retry_for=0.3)
    message = str(caught.value)
    assert "opening the PostgreSQL store at postgresql://aiki:***@/aiki" in message
    assert "the database is unavailable" in message and "secret" not in message
    assert "nothing of this call was kept" in message


async def test_a_stopped_server_fails_calls_clearly_and_the_store_recovers(
    restartable_postgres: TestPostgres,
) -> None:
    postgres = restartable_postgres
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema(),
                                  retry_for=0.5) as store:
        await execute(store, enqueue("r1"))
        await trio.to_thread.run_sync(postgres.stop)
        try:
            with pytest.raises(StoreUnavailable, match="the database is unavailable"):
                await store.get_run("r1")
            with pytest.raises(StoreUnavailable, match="nothing of this call was kept"):
                await execute(store, enqueue("r2"))
        finally:
            await trio.to_thread.run_sync(postgres.start)
        # The pool drops the dead connections and opens new ones: no restart of the store.
        assert (await execute(store, enqueue("r3"))).created
        assert {r.id for r in await store.list_runs()} == {"r1", "r3"}


# -- a commit whose outcome is unknown ------------------------------------------------------------
def locked_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch goes the locked way (a transaction), none in one statement (``_fast``)."""
    monkeypatch.setattr(_fast, "plan", lambda ops, fresh: None)
    monkeypatch.setattr(_fast, "plan_new", lambda ops: None)


async def lose_reply_after_commit(conn: Any) -> None:
    await conn.execute("COMMIT")
    conn.terminate()
    raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


async def lose_connection_before_commit(conn: Any) -> None:
    conn.terminate()
    await conn.execute("COMMIT")  # fails: the connection is closed


@pytest.mark.parametrize("fault", [lose_reply_after_commit, lose_connection_before_commit])
async def test_an_unknown_commit_is_resolved_by_rereading_never_applied_twice(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fault: Callable[[Any], Any],
) -> None:
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await execute(store, enqueue("r1"))
        real_commit = _sql.commit
        faults = [fault]

        async def once(conn: Any) -> None:
            await (faults.pop() if faults else real_commit)(conn)

        monkeypatch.setattr(_sql, "commit", once)
        [claimed] = await execute(store, o.Claim("w1", WF, 5, 10.0, 30.0))
        assert not faults, "the fault was injected"
        # Committed once (re-read) or not at all and run again: either way, one claim.
        assert claimed.lease == Lease("r1", 1, "w1")
        run = await store.get_run("r1")
        assert run is not None and (run.lease_epoch, run.attempts) == (1, 1)
        assert [e.event for e in await store.get_history("r1")] == ["run.queued",
                                                                      "run.running"]
    reread = "died after COMMIT; transaction" in caplog.text
    assert reread == (fault is lose_reply_after_commit), caplog.text


async def test_the_transaction_id_of_a_batch_locked_with_its_begin_resolves_its_commit(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch of task starts and outcomes learns its transaction's id from its read (the
    lock sent with BEGIN assigned it), not from a statement of its own: the id that settles
    a commit whose reply was lost. The run's id has the characters a literal must escape.
    (The locked way: see test_postgres_fast.py for the one-statement writes.)"""
    from tests.store.test_conformance import step

    locked_way(monkeypatch)
    run_id = "it's a \\ run \"of\" \u00e9t\u00e9'"
    async with PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema()) as store:
        await execute(store, enqueue(run_id))
        [claimed] = await execute(store, o.Claim("w1", WF, 5, 2.0, 30.0))
        lease = claimed.lease
        assert lease.run_id == run_id
        await execute(store, o.StartStep(lease, step("0", state="running"), 3.0, 30.0))
        real_commit = _sql.commit
        faults = [lose_reply_after_commit]

        async def once(conn: Any) -> None:
            await (faults.pop() if faults else real_commit)(conn)

        monkeypatch.setattr(_sql, "commit", once)
        outcomes = await store.apply([o.SaveStep(lease, step("0"), 4.0),
                                      o.StartStep(lease, step("1", state="running"), 4.0, 30.0)])
        assert not faults and outcomes == [True, True]
        assert "died after COMMIT; transaction" in caplog.text  # re-read: committed
        assert [e.event for e in await store.get_history(run_id)] == [
            "run.queued", "run.running", "task.running", "task.completed", "task.running"]
    async with raw_connection(postgres, "public") as raw:
        for text in (run_id, "\\", "'", "\\'", "a\\\\'b''", "\u2603"):
            for conforming in ("on", "off"):
                for backslash_quote in ("on", "off"):  # (off: refuses \\' for a quote)
                    await raw.execute(f"SET standard_conforming_strings = {conforming}; "
                                      f"SET backslash_quote = {backslash_quote}")
                    # (A comment of its own: asyncpg would reuse the statement parsed under
                    # the settings before.)
                    assert await raw.fetchval(f"SELECT {_sql._literal(text)} -- "
                                              f"{conforming} {backslash_quote}") == text


async def test_an_orphaned_transaction_still_in_progress_is_ended_before_it_is_judged(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old server process has not noticed its client left: the store terminates it."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as orphan:
        await execute(store, enqueue("r1"))
        await orphan.execute("BEGIN")
        await orphan.execute("UPDATE runs SET payload = 'orphan' WHERE id = 'r1'")
        xid = await orphan.fetchval("SELECT pg_current_xact_id()::text")
        pid = await orphan.fetchval("SELECT pg_backend_pid()")

        async def reply_lost_while_in_progress(conn: Any) -> None:
            monkeypatch.setattr(_sql, "commit", real_commit)
            conn.terminate()  # this batch is gone; the orphan's transaction stands in for it
            raise _sql.CommitUnknown(ConnectionResetError("reset by peer"), [], xid, pid)

        real_commit = _sql.commit
        monkeypatch.setattr(_sql, "commit", reply_lost_while_in_progress)
        await execute(store, enqueue("r2"))  # judged aborted after terminating pid: run again
        assert (await store.get_run("r2")) is not None
        run = await store.get_run("r1")
        assert run is not None and run.payload == "{}"  # the orphan was rolled back


# -- cancellation across the bridge ------------------------------------------------------------
async def test_a_trio_cancel_in_the_middle_of_a_query_leaves_the_pool_healthy(
    postgres: TestPostgres,
) -> None:
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema, max_size=2) as store, \
            raw_connection(postgres, schema) as holder:
        await execute(store, enqueue("r1"))
        [claimed] = await execute(store, o.Claim("w1", WF, 1, 10.0, 30.0))
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")  # r1 is held
        # Each CompleteRun waits on the row lock inside PostgreSQL until it is cancelled.
        # More cancellations than the pool has connections: none may leak.
        for _ in range(5):
            with trio.move_on_after(0.2) as waited:
                await execute(store, o.CompleteRun(claimed.lease, '"done"', 11.0))
            assert waited.cancelled_caught
        assert store.connections <= 2
        # The pool serves at once, on other rows and on reads.
        with trio.fail_after(5):
            assert (await execute(store, enqueue("r2"))).created
            assert (await store.get_run("r2")) is not None
        await holder.execute("COMMIT")
        # None of the cancelled writes was kept, even once the lock was free.
        with trio.fail_after(5):
            while await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'aiki'"
                " AND wait_event_type = 'Lock'"
            ):
                await trio.sleep(0.05)
        run = await store.get_run("r1")
        assert run is not None and run.state == "running"
        await execute(store, o.CompleteRun(claimed.lease, '"done"', 12.0))
        run = await store.get_run("r1")
        assert run is not None and (run.state, run.result) == ("completed", '"done"')


@pytest.mark.parametrize("together", [False, True])
async def test_a_run_ending_as_another_server_ends_its_last_child_does_not_wait_for_it(
    postgres: TestPostgres, together: bool,
) -> None:
    """Another server ends a run's last child, holding the parent's row lock (as it tells
    the parent), while this one ends the parent and waits for that lock: the count of the
    parent's unfinished children is taken once the lock is granted, not from before it (a
    wait for a child that has ended would never end). ``together``: the completion goes
    with another run's task start, as a busy batch's does."""
    from tests.store.test_children import start
    from tests.store.test_conformance import step

    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as holder:
        await store.apply([enqueue("p"), enqueue("r2")])
        leases = {c.run.id: c.lease for c in await execute(store, o.Claim("w1", WF, 5, 2.0,
                                                                          30.0))}
        await execute(store, start(leases["p"], "0"))
        await execute(store, o.Claim("w1", WF, 5, 3.0, 30.0))  # the child runs
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM runs WHERE id = 'p' FOR UPDATE")
        await holder.execute("UPDATE runs SET state = 'completed', finished_at = 4.0"
                             " WHERE id = 'p/0'")
        ops: list[o.Op[Any]] = [o.CompleteRun(leases["p"], '"sent"', 5.0)]
        if together:
            ops.append(o.StartStep(leases["r2"], step("0", state="running"), 5.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.apply, ops)
            with trio.fail_after(10):  # the completion waits for the parent's lock
                while not await holder.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'aiki' AND wait_event_type = 'Lock'"):
                    await trio.sleep(0.02)
            await holder.execute("COMMIT")
        run = await store.get_run("p")
        assert run is not None and (run.state, run.result) == ("completed", '"sent"')
        assert await store.get_waits("p") == ()


@pytest.mark.parametrize("together", [False, True])
async def test_a_task_outcome_sent_again_through_another_server_is_applied_once(
    postgres: TestPostgres, monkeypatch: pytest.MonkeyPatch, together: bool,
) -> None:
    """A worker's outcome is sent again through another server while the first server's
    transaction still holds its run (a reply lost in a partition): the second waits for the
    lock, then reads the step as the first left it (not as of before the lock), so it
    changes nothing and records nothing more. ``together``: with another run's task
    outcome, as in a busy batch."""
    from tests.store.test_conformance import step

    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as first, \
            PostgresStore.open(postgres.dsn, schema=schema) as second, \
            raw_connection(postgres, schema) as watcher:
        await first.apply([enqueue("r1"), enqueue("r2")])
        leases = {c.run.id: c.lease for c in await execute(first, o.Claim("w1", WF, 5, 2.0,
                                                                          30.0))}
        await first.apply([o.StartStep(leases["r1"], step("0", state="running"), 3.0),
                           o.StartStep(leases["r2"], step("0", state="running"), 3.0)])
        done = o.SaveStep(leases["r1"], step("0"), 4.0)
        ops: list[o.Op[Any]] = [done]
        if together:
            ops.append(o.SaveStep(leases["r2"], step("0"), 4.0))
        token = trio.lowlevel.current_trio_token()
        real_commit = _sql.commit
        committing, go_on = trio.Event(), threading.Event()

        async def held_commit(conn: Any) -> None:  # (on the asyncio loop's thread)
            if not committing.is_set():  # the first server's: held before its COMMIT
                trio.from_thread.run_sync(committing.set, trio_token=token)
                while not go_on.is_set():
                    await asyncio.sleep(0.01)
            await real_commit(conn)

        monkeypatch.setattr(_sql, "commit", held_commit)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.apply, [done])
            with trio.fail_after(10):
                await committing.wait()  # its transaction holds r1
            nursery.start_soon(second.apply, ops)
            with trio.fail_after(10):  # the second waits for r1's lock
                while not await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'aiki' AND wait_event_type = 'Lock'"):
                    await trio.sleep(0.02)
            go_on.set()
        assert [e.event for e in await first.get_history("r1")] == [
            "run.queued", "run.running", "task.running", "task.completed"]


async def test_claims_skip_rows_another_transaction_holds(postgres: TestPostgres) -> None:
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store, \
            raw_connection(postgres, schema) as holder:
        await store.apply([enqueue("r1"), enqueue("r2")])
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")
        with trio.fail_after(5):  # not waiting on r1's lock
            claimed = await execute(store, o.Claim("w1", WF, 5, 10.0, 30.0))
        assert [c.run.id for c in claimed] == ["r2"]
        await holder.execute("ROLLBACK")
        assert [c.run.id for c in await execute(store, o.Claim("w1", WF, 5, 10.0, 30.0))] == \
            ["r1"]


# -- LISTEN/NOTIFY wake-ups ------------------------------------------------------------------------
async def test_watch_hears_runs_queued_by_another_store_and_comes_back_after_a_restart(
    restartable_postgres: TestPostgres,
) -> None:
    postgres = restartable_postgres
    schema = postgres.fresh_schema()
    heard = trio.Event()
    notices: list[str] = []

    def on_notice(notice: str) -> None:
        notices.append(notice)
        heard.set()

    async def hear(expected: str) -> None:
        nonlocal heard
        with trio.fail_after(15):
            await heard.wait()
        heard = trio.Event()
        assert notices == [expected]
        notices.clear()

    async with PostgresStore.open(postgres.dsn, schema=schema) as watcher, \
            PostgresStore.open(postgres.dsn, schema=schema) as other, \
            trio.open_nursery() as nursery:
        await nursery.start(watcher.watch, on_notice)
        await execute(other, enqueue("r1"))
        await hear("")  # a run queued
        [claimed] = await execute(other, o.Claim("w1", WF, 1, 10.0, 1.0))
        await trio.sleep(0.2)  # running: nothing to hear
        assert not heard.is_set()
        assert await execute(other, o.ExpireLeases(20.0)) == ("r1",)  # queued again
        await hear("")
        [claimed] = await execute(other, o.Claim("w1", WF, 1, 21.0, 30.0))
        await execute(other, o.WaitRun(claimed.lease, (WaitFor("0", "retry", "t", 99.0),),
                                       "retry", 22.0))
        await hear("due")  # a wait with a due time: other servers' timers look again
        await trio.to_thread.run_sync(postgres.stop)
        await trio.to_thread.run_sync(postgres.start)
        await hear("resync")  # back: told once, for whatever it may have missed
        await execute(other, enqueue("r2"))
        await hear("")
        [claimed] = await execute(other, o.Claim("w1", WF, 1, 30.0, 30.0))
        await execute(other, o.CompleteRun(claimed.lease, "null", 31.0))
        await hear(f"ended:{claimed.run.id}")  # for the watchers on every server
        nursery.cancel_scope.cancel()


# -- several stores on one database ---------------------------------------------------------------
STORES = 3
op_command = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from([None, None, "k1", "k2"])),
    st.tuples(st.just("claim"), st.integers(1, 3), st.sampled_from([1.0, 3.0])),
    st.tuples(st.just("claim"), st.integers(1, 3), st.sampled_from([1.0, 3.0])),
    st.tuples(st.just("expire")),
    st.tuples(st.just("renew")),
    st.tuples(st.just("complete"), st.integers(0, 5)),
)
# One round: for each store, a batch of ops (or nothing), all applied at the same time.
rounds = st.lists(
    st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0]),
              st.lists(st.lists(op_command, max_size=3), min_size=STORES, max_size=STORES)),
    min_size=3, max_size=12,
)


@attrs.define
class Ledger:
    """What every store was told, to check against the database's own history."""

    granted: dict[tuple[str, int], list[str]] = attrs.field(factory=dict)  # -> grantees
    held: dict[str, dict[str, Lease]] = attrs.field(factory=dict)  # worker -> run -> lease
    expires: dict[tuple[str, int], float] = attrs.field(factory=dict)
    keys: dict[str, set[str]] = attrs.field(factory=dict)
    completed: dict[str, Lease] = attrs.field(factory=dict)
    next_id: int = 0

    def ops(self, worker: str, commands: list[tuple[Any, ...]], now: float) -> list[o.Op[Any]]:
        result: list[o.Op[Any]] = []
        for cmd in commands:
            if cmd[0] == "enqueue":
                self.next_id += 1
                result.append(o.Enqueue(f"r{self.next_id}", "wf", "1", "{}", cmd[1], now))
            elif cmd[0] == "claim":
                result.append(o.Claim(worker, WF, cmd[1], now, cmd[2]))
            elif cmd[0] == "expire":
                result.append(o.ExpireLeases(now))
            elif cmd[0] == "renew":
                result.append(o.Renew(tuple(self.held.get(worker, {}).values()), now, 3.0))
            else:
                leases = sorted(self.held.get(worker, {}).values(), key=lambda lease: lease.run_id)
                if leases:
                    result.append(o.CompleteRun(leases[cmd[1] % len(leases)], "1", now))
        return result

    def record(self, worker: str, ops: list[o.Op[Any]], outcomes: list[Any]) -> None:
        for op, outcome in zip(ops, outcomes, strict=True):
            if isinstance(op, o.Enqueue) and op.idempotency_key is not None:
                self.keys.setdefault(op.idempotency_key, set()).add(outcome.run_id)
            elif isinstance(op, o.Claim):
                for claimed in outcome:
                    lease = claimed.lease
                    self.granted.setdefault((lease.run_id, lease.epoch), []).append(worker)
                    self.held.setdefault(worker, {})[lease.run_id] = lease
                    self.expires[(lease.run_id, lease.epoch)] = op.now + op.lease_ttl
            elif isinstance(op, o.Renew):
                for lease in op.leases:
                    if lease.run_id not in outcome:
                        self.expires[(lease.run_id, lease.epoch)] = op.now + op.lease_ttl
            elif isinstance(op, o.CompleteRun) and not isinstance(outcome, StaleLease):
                assert isinstance(outcome, RunRecord) and outcome.state == "completed", outcome
                self.completed[op.lease.run_id] = op.lease
                self.held[worker].pop(op.lease.run_id)


async def check_history(store: Store, run_id: str, ledger: Ledger) -> None:
    """The run's history is one lease after another, each ended before the next began."""
    live: int | None = None
    epoch = 0
    for event in await store.get_history(run_id):
        if event.event == "run.running":
            assert live is None, f"{run_id}: leased again while epoch {live} was live"
            epoch += 1
            assert event.detail == f"lease epoch {epoch}"
            assert ledger.granted[(run_id, epoch)] == [event.worker_id]  # granted once
            live = epoch
        elif event.event == "run.queued" and live is not None:
            assert event.detail is not None and event.detail.startswith(f"lease epoch {live} ")
            # Expired only once its (possibly renewed) lease had run out.
            assert ledger.expires[(run_id, live)] <= event.at, (run_id, live, event)
            live = None
        elif event.event == "run.completed":
            assert live is not None and ledger.completed[run_id].epoch == live
            live = None
    assert (run_id, epoch + 1) not in ledger.granted


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=rounds)
async def test_several_stores_never_lease_one_run_twice(
    postgres: TestPostgres, rounds: list[tuple[float, list[list[tuple[Any, ...]]]]],
) -> None:
    schema = postgres.fresh_schema()
    ledger = Ledger()
    now = 0.0
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(PostgresStore.open(postgres.dsn,
                                                                     schema=schema))
                  for _ in range(STORES)]
        for dt, batches in rounds:
            now += dt
            async with trio.open_nursery() as nursery:
                for i, (store, commands) in enumerate(zip(stores, batches, strict=True)):
                    ops = ledger.ops(f"w{i}", commands, now)
                    if ops:
                        async def apply(store: Store = store, ops: list[o.Op[Any]] = ops,
                                        worker: str = f"w{i}") -> None:
                            ledger.record(worker, ops, await store.apply(ops))

                        nursery.start_soon(apply)
        for key, run_ids in ledger.keys.items():
            assert len(run_ids) == 1, f"idempotency key {key} made runs {run_ids}"
        for run in await stores[0].list_runs(limit=1000):
            await check_history(stores[0], run.id, ledger)


# -- PostgreSQL stopped and started under a workload ---------------------------------------------
@aiki.task(name="outage-step")
async def outage_step(x: int) -> int:
    await trio.sleep(0.01)
    return x + 1


@aiki.workflow(name="outage", version="1")
async def outage_workflow(run: aiki.WorkflowRun, x: int) -> int:
    for _ in range(3):
        x = await outage_step.run(run, x)
    return x


@pytest.mark.parametrize("retry_for", [15.0, 0.2], ids=["store-rides-it-out", "engine-sees-it"])
async def test_postgres_stopped_and_started_under_a_workload_loses_no_run(
    restartable_postgres: TestPostgres, caplog: pytest.LogCaptureFixture, retry_for: float,
) -> None:
    """A real clock and a real restart: every run completes, each step committed once.

    With the default ``retry_for`` the store rides the outage out and the engine never sees
    it; with a short one, calls fail with StoreUnavailable and the engine must recover.
    """
    postgres = restartable_postgres
    schema = postgres.fresh_schema()
    handles: list[aiki.RunHandle[int]] = []
    async with PostgresStore.open(postgres.dsn, schema=schema, retry_for=retry_for) as store, \
            aiki.embedded(store, lease_ttl=5.0, poll_interval=0.2) as client:

        async def enqueue_some(first: int, count: int) -> None:
            for i in range(first, first + count):
                while True:
                    try:
                        handles.append(await outage_workflow.enqueue(client, i * 100))
                        break
                    except StoreUnavailable:  # (the short retry_for) the caller retries
                        await trio.sleep(0.1)

        async with aiki.worker(client, workflows=[outage_workflow], max_concurrent_runs=6):
            await enqueue_some(0, 20)
            with trio.fail_after(30):
                while len(await store.list_runs(state="completed")) < 3:
                    await trio.sleep(0.02)
            await trio.to_thread.run_sync(postgres.stop)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(enqueue_some, 20, 5)  # enqueued while it is down
                    await trio.sleep(1.0)
                    await trio.to_thread.run_sync(postgres.start)
            finally:
                await trio.to_thread.run_sync(postgres.start)
            with trio.fail_after(60):
                results = [await handle.wait_for_completion() for handle in handles]
        assert sorted(results) == [i * 100 + 3 for i in range(25)]
        runs = await store.list_runs(limit=1000)
        assert len(runs) == 25 and {run.state for run in runs} == {"completed"}
        for run in runs:  # each step's result was committed once and never redone
            steps = await store.get_steps(run.id)
            assert [s.state for s in steps] == ["completed"] * 3
    if retry_for > 1.0:  # the engine never noticed: no actor failed
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- schedules: several servers on one database, restarted, fire each occurrence once ---------
@aiki.task(name="tick-step")
async def tick_step(n: int) -> int:
    await trio.sleep(0.05)
    return n + 1


@aiki.workflow(name="tick", version="1")
async def tick_workflow(run: aiki.WorkflowRun, n: int) -> int:
    return await tick_step.run(run, n)


@pytest.mark.filterwarnings("ignore::aiki.UnservedVersionWarning")  # (servers 2 and 3)
async def test_three_servers_on_one_database_fire_each_occurrence_exactly_once(
    postgres: TestPostgres,
) -> None:
    """Three servers (one restarted twice) share a schema and each time one occurrence comes
    due, all three timers wake for it: each occurrence starts exactly one run, and none is
    lost while a server is up. A real clock: the store speaks asyncpg."""
    from aiki.store import machine as m

    schema = postgres.fresh_schema()
    every = 0.25
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(PostgresStore.open(postgres.dsn,
                                                                     schema=schema))
                  for _ in range(3)]

        async def server(store: PostgresStore, spans: list[tuple[float, float]],
                         work: bool) -> None:
            start = trio.current_time()
            for begin, end in spans:
                await trio.sleep_until(start + begin)
                async with aiki.embedded(store, lease_ttl=5.0, poll_interval=0.5) as client:
                    # Each server defines it too: the same definition returns the schedule.
                    defined = await tick_workflow.schedule(
                        client, 7, id="tick", every=every, overlap="allow",
                        catchup_window=30.0)
                    assert defined.id == "tick"
                    if work:
                        async with aiki.worker(client, workflows=[tick_workflow],
                                               max_concurrent_runs=20):
                            await trio.sleep_until(start + end)
                    else:
                        await trio.sleep_until(start + end)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, stores[0], [(0.0, 6.0)], True)
            nursery.start_soon(server, stores[1], [(0.0, 1.5), (2.5, 4.0), (4.5, 6.0)], False)
            nursery.start_soon(server, stores[2], [(0.5, 6.0)], False)
        store = stores[0]
        runs = [r for r in await store.list_runs(limit=1000) if r.workflow == "tick"]
        firings = await store.get_firings("tick", 1000)
    fired = [f for f in firings if f.outcome == "fired"]
    assert len(fired) >= 15
    # One run per occurrence: its key, its id and its firing record, each once.
    assert len({r.idempotency_key for r in runs}) == len(runs) == len(fired)
    assert sorted(f.run_id for f in fired) == sorted(r.id for r in runs)  # type: ignore[type-var]
    for run in runs:
        assert run.idempotency_key == m.run_key("tick", run.id.split("@", 1)[1])
    # No occurrence between the first and the last was lost (a server was always up).
    times = sorted(f.occurrence for f in fired)
    assert times == [times[0] + k * every for k in range(len(times))]
