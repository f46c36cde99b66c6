"""The store conformance suite: every store behaves like the memory store, the reference model.

Each test runs once per store kind (see ``conftest.py``). Times are fixed floats passed in;
nothing sleeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiki import schedules as sch
from aiki.errors import AikiError, StaleLease, StepConflict
from aiki.records import EventRecord, RunCount, ScheduleRecord, WaitFor, WaitRecord
from aiki.store import (
    ClaimedRun,
    HistoryEvent,
    Lease,
    MemoryStore,
    RunRecord,
    StepRecord,
    Store,
    execute,
)
from aiki.store import ops as o
from tests.store.conftest import StoreFactory

WF1 = ("wf", "1")


# -- helpers ------------------------------------------------------------------------------
def enqueue(
    run_id: str, workflow: str = "wf", version: str = "1", key: str | None = None,
    now: float = 1.0, payload: str = '{"n": 1}',
) -> o.Enqueue:
    return o.Enqueue(run_id, workflow, version, payload, key, now)


async def claim(
    store: Store, worker: str = "w1", workflows: tuple[tuple[str, str], ...] = (WF1,),
    limit: int = 10, now: float = 10.0, ttl: float = 30.0,
) -> tuple[ClaimedRun, ...]:
    return await execute(store, o.Claim(worker, workflows, limit, now, ttl))


async def claim_one(store: Store, run_id: str, **kwargs: Any) -> Lease:
    """Enqueue ``run_id`` and claim it; its lease."""
    await execute(store, enqueue(run_id))
    [claimed] = await claim(store, **kwargs)
    assert claimed.run.id == run_id
    return claimed.lease


def suspend(lease: Lease, due: float, reason: str, now: float) -> o.WaitRun:
    """Wait for the retry of a task (the simplest condition: a time)."""
    return o.WaitRun(lease, (WaitFor("0", "retry", "charge", due),), reason, now)


def step(
    position: str = "0", name: str = "charge", state: str = "completed", *,
    output: str | None = '"ok"', key: str | None = None, attempts: int = 1, kind: str = "task",
    error: tuple[str, str] | None = None, next_attempt_at: float | None = None,
) -> StepRecord:
    error_type, error_message = error if error else (None, None)
    return StepRecord(
        position=position, kind=kind, name=name, input_hash="h-" + name,  # type: ignore[arg-type]
        input='{"amount": 3}', idempotency_key=key, state=state,  # type: ignore[arg-type]
        attempts=attempts, output=output if state == "completed" else None,
        error_type=error_type, error_message=error_message, next_attempt_at=next_attempt_at,
    )


Snapshot = tuple[RunRecord | None, tuple[StepRecord, ...], tuple[HistoryEvent, ...]]


async def snapshot(store: Store, *run_ids: str) -> list[Snapshot]:
    return [
        (await store.get_run(r), await store.get_steps(r), await store.get_history(r))
        for r in run_ids
    ]


async def events(store: Store, run_id: str) -> list[tuple[Any, ...]]:
    """History without ``seq`` (checked on its own) and ``run_id``."""
    return [
        (e.at, e.event, e.attempt, e.worker_id, e.position, e.name, e.detail)
        for e in await store.get_history(run_id)
    ]


# -- enqueue ------------------------------------------------------------------------------
async def test_enqueue_creates_a_queued_run(store: Store) -> None:
    assert await execute(store, enqueue("r1", key=None, now=1.5)) == o.EnqueueOutcome("r1", True)
    run = await store.get_run("r1")
    assert run == RunRecord(
        id="r1", workflow="wf", version="1", payload='{"n": 1}', state="queued",
        idempotency_key=None, attempts=0, lease_epoch=0, lease_owner=None,
        lease_expires_at=None, result=None, error_type=None, error_message=None,
        created_at=1.5, updated_at=1.5, finished_at=None,
    )
    assert await store.get_steps("r1") == ()
    assert await events(store, "r1") == [(1.5, "run.queued", 0, None, None, None, "version 1")]
    assert await store.list_runs() == (run,)


async def test_unknown_run_reads_are_empty(store: Store) -> None:
    assert await store.get_run("nope") is None
    assert await store.get_steps("nope") == ()
    assert await store.get_history("nope") == ()
    assert await store.list_runs() == ()
    assert await store.next_due() is None


async def test_run_counts_group_unfinished_runs_by_version_and_state(store: Store) -> None:
    assert await store.run_counts() == ()
    await execute(store, enqueue("r1", now=1.0))
    await execute(store, enqueue("r2", now=2.0))
    await execute(store, enqueue("r3", version="2", now=3.0))
    await execute(store, enqueue("r4", workflow="other", now=4.0))
    [claimed] = await claim(store, now=10.0, limit=1)  # r1
    assert await store.run_counts() == (
        RunCount("other", "1", "queued", 1, 4.0),
        RunCount("wf", "1", "queued", 1, 2.0),
        RunCount("wf", "1", "running", 1, 10.0),
        RunCount("wf", "2", "queued", 1, 3.0),
    )
    await execute(store, o.CompleteRun(claimed.lease, '"done"', 11.0))
    [claimed] = await claim(store, now=12.0, limit=1)  # r2
    await execute(store, suspend(claimed.lease, 99.0, "retry later", 13.0))
    assert await store.run_counts() == (  # a finished run is not counted
        RunCount("other", "1", "queued", 1, 4.0),
        RunCount("wf", "1", "waiting", 1, 13.0),
        RunCount("wf", "2", "queued", 1, 3.0),
    )


async def test_idempotent_enqueue_returns_the_same_run(store: Store) -> None:
    assert await execute(store, enqueue("r1", key="order-7")) == o.EnqueueOutcome("r1", True)
    before = await snapshot(store, "r1")
    again = await execute(store, enqueue("r2", key="order-7", now=2.0))  # the same payload
    assert again == o.EnqueueOutcome("r1", created=False)
    # Another payload under the key: refused (nothing stored), or the run, if asked for.
    [conflict] = await store.apply([enqueue("r2", key="order-7", now=2.0, payload="{}")])
    assert type(conflict).__name__ == "IdempotencyConflict"
    assert "idempotency key 'order-7' of workflow 'wf' names run r1" in str(conflict)
    kept = await execute(store, attrs.evolve(enqueue("r2", key="order-7", now=2.0, payload="{}"),
                                             on_conflict="return_existing"))
    assert kept == o.EnqueueOutcome("r1", created=False)
    assert await store.get_run("r2") is None
    assert await store.get_history("r2") == ()
    assert await snapshot(store, "r1") == before
    assert [r.id for r in await store.list_runs()] == ["r1"]
    # The key is per workflow; no key means no deduplication.
    assert await execute(store, enqueue("r3", workflow="other", key="order-7")) == \
        o.EnqueueOutcome("r3", True)
    assert (await execute(store, enqueue("r4"))).created
    assert (await execute(store, enqueue("r5"))).created
    assert {r.id for r in await store.list_runs()} == {"r1", "r3", "r4", "r5"}


async def test_idempotent_enqueue_in_one_batch(store: Store) -> None:
    outcomes = await store.apply([enqueue("r1", key="k"), enqueue("r2", key="k")])
    assert outcomes == [o.EnqueueOutcome("r1", True), o.EnqueueOutcome("r1", False)]
    assert [r.id for r in await store.list_runs()] == ["r1"]


async def test_many_enqueues_in_one_batch_each_get_their_answer(store: Store) -> None:
    """The busy batch of enqueues (PostgreSQL inserts them in one statement): new runs, a
    run id sent again, keys that name runs already there (the same payload, another one:
    refused, or returned), in enqueue order, each with its first event."""
    await store.apply([enqueue("r1", key="k1"), enqueue("r2", key="k2")])
    outcomes = await store.apply([
        enqueue("r3", now=2.0), enqueue("r1", now=2.0),  # r1 again: its enqueue retried
        enqueue("r4", key="k1", now=2.0),  # the same payload as r1: r1
        enqueue("r5", key="k2", payload='{"n": 2}', now=2.0),  # another payload: refused
        o.Enqueue("r6", "wf", "1", '{"n": 3}', "k2", 2.0, "return_existing"),
        enqueue("r7", key="k3", now=2.0), enqueue("r8", workflow="other", key="k1", now=2.0),
    ])
    assert [type(x).__name__ if isinstance(x, AikiError) else (x.run_id, x.created)
            for x in outcomes] == [
        ("r3", True), ("r1", False), ("r1", False), "IdempotencyConflict", ("r2", False),
        ("r7", True), ("r8", True)]
    assert [r.id for r in await store.list_runs()] == ["r8", "r7", "r3", "r2", "r1"]
    for run_id in ("r3", "r7", "r8"):
        assert [(e.at, e.event) for e in await store.get_history(run_id)] == [
            (2.0, "run.queued")]
    assert [e.at for e in await store.get_history("r1")] == [1.0]
    # One run id twice, one key twice: the first of each wins, as one at a time.
    outcomes = await store.apply([enqueue("r9", now=3.0), enqueue("r9", now=3.0),
                                  enqueue("r10", key="k4", now=3.0),
                                  enqueue("r11", key="k4", now=3.0)])
    assert [(x.run_id, x.created) for x in outcomes] == [
        ("r9", True), ("r9", False), ("r10", True), ("r10", False)]
    assert len(await store.get_history("r9")) == 1


async def test_concurrent_enqueues_of_one_key_make_one_run(store: Store) -> None:
    outcomes: list[o.EnqueueOutcome] = []

    async def one(i: int) -> None:
        outcomes.append(await execute(store, enqueue(f"r{i}", key="same", now=float(i))))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert len(outcomes) == 50
    winners = [out for out in outcomes if out.created]
    assert len(winners) == 1
    assert {out.run_id for out in outcomes} == {winners[0].run_id}
    runs = await store.list_runs()
    assert [r.id for r in runs] == [winners[0].run_id]
    assert len(await store.get_history(winners[0].run_id)) == 1


async def test_retried_enqueue_of_an_existing_run_id_changes_nothing(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.SaveStep(lease, step(), 11.0))
    before = await snapshot(store, "r1")
    assert await execute(store, enqueue("r1", now=12.0)) == o.EnqueueOutcome("r1", False)
    assert await snapshot(store, "r1") == before


# -- claim --------------------------------------------------------------------------------
async def test_claim_sets_the_lease_and_logs_it(store: Store) -> None:
    await execute(store, enqueue("r1"))
    [claimed] = await claim(store, worker="w1", now=10.0, ttl=30.0)
    run = claimed.run
    assert (run.state, run.attempts, run.lease_epoch, run.lease_owner) == ("running", 1, 1, "w1")
    assert (run.lease_expires_at, run.updated_at, run.created_at) == (40.0, 10.0, 1.0)
    assert claimed.steps == ()
    assert claimed.lease == Lease("r1", 1, "w1")
    assert await store.get_run("r1") == run
    assert (await events(store, "r1"))[-1] == (10.0, "run.running", 1, "w1", None, None,
                                                "lease epoch 1")


async def test_claim_filters_by_workflow_and_version(store: Store) -> None:
    await store.apply([
        enqueue("a1", "wf", "1"), enqueue("b2", "wf", "2"), enqueue("c1", "other", "1"),
        enqueue("d1", "wf", "1"),
    ])
    assert [c.run.id for c in await claim(store, workflows=(WF1,))] == ["a1", "d1"]
    got = await claim(store, workflows=(("other", "1"), ("wf", "2")))
    assert [c.run.id for c in got] == ["b2", "c1"]
    assert await claim(store, workflows=()) == ()


async def test_a_version_nobody_claims_stays_queued(store: Store) -> None:
    await execute(store, enqueue("old", version="0.9"))
    assert await claim(store, workflows=(WF1, ("wf", "2"), ("other", "0.9"))) == ()
    run = await store.get_run("old")
    assert run is not None
    assert (run.state, run.attempts, run.lease_epoch) == ("queued", 0, 0)


async def test_claim_is_fifo_and_respects_the_limit(store: Store) -> None:
    # Ids sort differently from the enqueue order; created_at does not decide either.
    for run_id, now in [("r-c", 5.0), ("r-a", 5.0), ("r-d", 5.0), ("r-b", 5.0)]:
        await execute(store, enqueue(run_id, now=now))
    assert await claim(store, limit=0) == ()
    assert [c.run.id for c in await claim(store, limit=2)] == ["r-c", "r-a"]
    assert [c.run.id for c in await claim(store, worker="w2", limit=5)] == ["r-d", "r-b"]
    assert await claim(store) == ()
    assert {r.lease_owner for r in await store.list_runs(state="running")} == {"w1", "w2"}


async def test_requeued_run_keeps_its_place_in_the_queue(store: Store) -> None:
    await store.apply([enqueue("r1"), enqueue("r2")])
    await claim(store, limit=1, now=10.0, ttl=5.0)
    assert await execute(store, o.ExpireLeases(15.0)) == ("r1",)
    assert [c.run.id for c in await claim(store, now=16.0)] == ["r1", "r2"]


async def test_claims_in_one_batch_lease_each_run_once(store: Store) -> None:
    """Enqueues and claims of one batch, each claim seeing what the ones before it leased
    and the runs queued before it."""
    await execute(store, enqueue("r1"))
    first, _, second, third = await store.apply([
        o.Claim("w1", (WF1,), 1, 10.0, 30.0), enqueue("r2"),
        o.Claim("w2", (WF1,), 5, 10.0, 30.0), o.Claim("w3", (WF1,), 5, 10.0, 30.0)])
    assert [(c.run.id, c.run.lease_owner) for c in (*first, *second, *third)] == [
        ("r1", "w1"), ("r2", "w2")]
    assert [(r.id, r.state, r.lease_owner) for r in await store.list_runs()] == [
        ("r2", "running", "w2"), ("r1", "running", "w1")]
    assert [e[1] for e in await events(store, "r2")] == ["run.queued", "run.running"]


async def test_claim_increments_attempts_and_returns_existing_steps(store: Store) -> None:
    lease = await claim_one(store, "r1", now=10.0, ttl=5.0)
    await store.apply([
        o.SaveStep(lease, step("0", "charge"), 11.0),
        o.SaveStep(lease, step("1", "ship", "retrying", error=("IOError", "down"),
                                next_attempt_at=20.0), 12.0),
    ])
    assert await execute(store, o.ExpireLeases(15.0)) == ("r1",)
    [again] = await claim(store, worker="w2", now=16.0, ttl=5.0)
    assert (again.run.attempts, again.run.lease_epoch, again.run.lease_owner) == (2, 2, "w2")
    assert again.steps == await store.get_steps("r1")
    assert [s.position for s in again.steps] == ["0", "1"]
    assert again.steps[1].state == "retrying"


# -- leases -------------------------------------------------------------------------------
async def test_renew_extends_leases_and_reports_lost_ones(store: Store) -> None:
    await store.apply([enqueue("r1"), enqueue("r2"), enqueue("r3")])
    a, b, c = (x.lease for x in await claim(store, now=10.0, ttl=10.0))
    history_before = await snapshot(store, "r1", "r2", "r3")
    assert await execute(store, o.Renew((a, b), 15.0, 10.0)) == ()
    assert [(await store.get_run(r)).lease_expires_at for r in ("r1", "r2")] == [25.0, 25.0]  # type: ignore[union-attr]
    assert (await store.get_run("r1")).updated_at == 15.0  # type: ignore[union-attr]
    assert (await store.get_run("r3")).lease_expires_at == 20.0  # type: ignore[union-attr]
    # Renewing adds no history.
    assert [s[2] for s in await snapshot(store, "r1", "r2", "r3")] == [s[2] for s in history_before]
    assert await execute(store, o.ExpireLeases(20.0)) == ("r3",)
    lost = await execute(store, o.Renew((
        Lease("r1", a.epoch - 1, "w1"), b, Lease("r2", b.epoch, "w9"), c,
        Lease("ghost", 1, "w1"),
    ), 21.0, 10.0))
    assert lost == ("r1", "r2", "r3", "ghost")
    assert (await store.get_run("r2")).lease_expires_at == 31.0  # type: ignore[union-attr]


async def test_expire_requeues_expired_runs_only(store: Store) -> None:
    await execute(store, enqueue("r1"))
    [first] = await claim(store, now=0.0, ttl=10.0)
    await execute(store, enqueue("r2"))
    [second] = await claim(store, now=5.0, ttl=10.0)
    sleeper = await claim_one(store, "r3", now=5.0, ttl=1.0)
    await execute(store, suspend(sleeper, 6.0, "sleep", 5.5))
    assert await execute(store, o.ExpireLeases(9.5)) == ()
    assert await execute(store, o.ExpireLeases(10.0)) == ("r1",)  # expires_at <= now
    run = await store.get_run("r1")
    assert run is not None
    assert (run.state, run.lease_owner, run.lease_expires_at) == ("queued", None, None)
    assert (run.attempts, run.lease_epoch, run.updated_at) == (1, 1, 10.0)
    assert (await events(store, "r1"))[-1] == (
        10.0, "run.queued", 1, "w1", None, None, "lease epoch 1 of worker 'w1' expired")
    assert (await store.get_run("r2")).state == "running"  # type: ignore[union-attr]
    assert (await store.get_run("r3")).state == "waiting"  # type: ignore[union-attr]
    assert await execute(store, o.ExpireLeases(100.0)) == ("r2",)
    assert await execute(store, o.ExpireLeases(100.0)) == ()
    again = await claim(store, now=101.0)
    assert [(c.run.id, c.run.lease_epoch, c.run.attempts) for c in again] == [
        ("r1", 2, 2), ("r2", 2, 2)]
    assert first.lease.epoch == 1 and second.lease.epoch == 1


async def test_expire_handles_several_runs_in_enqueue_order(store: Store) -> None:
    await store.apply([enqueue(f"r{i}") for i in range(4)])
    await claim(store, now=0.0, ttl=10.0)
    assert await execute(store, o.ExpireLeases(10.0)) == ("r0", "r1", "r2", "r3")


# -- fencing ------------------------------------------------------------------------------
FENCED_OPS: dict[str, Callable[[Lease], o.Op[None]]] = {
    "start_step": lambda lease: o.StartStep(lease, step("1", "ship", "running"), 50.0),
    "save_step": lambda lease: o.SaveStep(lease, step("1", "ship"), 50.0),
    "complete": lambda lease: o.CompleteRun(lease, '"done"', 50.0),
    "fail": lambda lease: o.FailRun(lease, "ValueError", "boom", 50.0),
    "suspend": lambda lease: suspend(lease, 60.0, "sleep", 50.0),
    "release": lambda lease: o.ReleaseRun(lease, 50.0),
}
STALE_LEASES = {
    "old_epoch": Lease("r1", 1, "w1"),
    "old_epoch_same_worker": Lease("r1", 1, "w2"),
    "wrong_worker": Lease("r1", 2, "w1"),
    "future_epoch": Lease("r1", 3, "w2"),
    "missing_run": Lease("ghost", 2, "w2"),
}


async def fenced_setup(store: Store) -> Lease:
    """r1 claimed by w1 (epoch 1), expired, claimed by w2 (epoch 2), with one step saved."""
    await execute(store, enqueue("r1"))
    [first] = await claim(store, worker="w1", now=10.0, ttl=5.0)
    await execute(store, o.SaveStep(first.lease, step("0"), 11.0))
    await execute(store, o.ExpireLeases(15.0))
    [second] = await claim(store, worker="w2", now=16.0, ttl=30.0)
    assert second.lease == Lease("r1", 2, "w2")
    return second.lease


@pytest.mark.parametrize("lease_name", sorted(STALE_LEASES))
@pytest.mark.parametrize("op_name", sorted(FENCED_OPS))
async def test_fenced_ops_with_a_stale_lease_change_nothing(
    store: Store, op_name: str, lease_name: str
) -> None:
    await fenced_setup(store)
    before = await snapshot(store, "r1", "ghost")
    [outcome] = await store.apply([FENCED_OPS[op_name](STALE_LEASES[lease_name])])
    assert isinstance(outcome, StaleLease)
    assert STALE_LEASES[lease_name].run_id in str(outcome)
    assert await snapshot(store, "r1", "ghost") == before
    with pytest.raises(StaleLease):
        await execute(store, FENCED_OPS[op_name](STALE_LEASES[lease_name]))


@pytest.mark.parametrize("op_name", sorted(FENCED_OPS))
async def test_fenced_ops_on_a_run_that_is_not_running_are_stale(
    store: Store, op_name: str
) -> None:
    lease = await fenced_setup(store)
    await execute(store, o.ReleaseRun(lease, 20.0))  # queued again; the lease is gone
    before = await snapshot(store, "r1")
    [outcome] = await store.apply([FENCED_OPS[op_name](lease)])
    assert isinstance(outcome, StaleLease)
    assert await snapshot(store, "r1") == before


async def test_stale_lease_message_names_the_current_lease(store: Store) -> None:
    await fenced_setup(store)
    [outcome] = await store.apply([FENCED_OPS["complete"](Lease("r1", 1, "w1"))])
    assert str(outcome) == (
        "run r1: lease epoch 1 of worker 'w1' is stale (the run is running, epoch 2, "
        "owner 'w2')")
    [outcome] = await store.apply([FENCED_OPS["complete"](Lease("ghost", 1, "w1"))])
    assert str(outcome) == "run ghost does not exist"


async def test_a_batch_applies_its_good_ops_and_refuses_the_stale_one(store: Store) -> None:
    lease = await fenced_setup(store)
    stale = Lease("r1", 1, "w1")
    outcomes = await store.apply([
        o.SaveStep(stale, step("1", "stale-write"), 20.0),
        o.SaveStep(lease, step("1", "ship"), 21.0),
        o.CompleteRun(stale, '"nope"', 22.0),
    ])
    assert isinstance(outcomes[0], StaleLease) and isinstance(outcomes[2], StaleLease)
    assert outcomes[1] is True
    steps = await store.get_steps("r1")
    assert [(s.position, s.name) for s in steps] == [("0", "charge"), ("1", "ship")]
    run = await store.get_run("r1")
    assert run is not None and run.state == "running" and run.updated_at == 21.0
    assert [e[1] for e in await events(store, "r1")][-1:] == ["task.completed"]


async def test_ops_in_a_batch_see_the_earlier_ones(store: Store) -> None:
    outcomes = await store.apply([
        enqueue("r1"), enqueue("r2", key="k"), o.Claim("w1", (WF1,), 5, 10.0, 30.0),
        o.SaveStep(Lease("r1", 1, "w1"), step(), 11.0),
        o.CompleteRun(Lease("r2", 1, "w1"), "1", 12.0),
    ])
    assert outcomes[:2] == [o.EnqueueOutcome("r1", True), o.EnqueueOutcome("r2", True)]
    assert [c.run.id for c in outcomes[2]] == ["r1", "r2"]
    assert outcomes[3] is True
    assert outcomes[4] == await store.get_run("r2")
    assert outcomes[4].state == "completed"


# -- steps --------------------------------------------------------------------------------
async def test_start_step_then_save_it_completed(store: Store) -> None:
    lease = await claim_one(store, "r1")
    started = step("0", "charge", "running", output=None, key="pay-1")
    assert await execute(store, o.StartStep(lease, started, 11.0)) is True
    assert await store.get_steps("r1") == (started,)
    done = step("0", "charge", "completed", output='{"receipt": 9}', key="pay-1")
    assert await execute(store, o.SaveStep(lease, done, 12.0)) is True
    assert await store.get_steps("r1") == (done,)
    assert (await store.get_run("r1")).updated_at == 12.0  # type: ignore[union-attr]
    assert (await events(store, "r1"))[-2:] == [
        (11.0, "task.running", 1, "w1", "0", "charge", None),
        (12.0, "task.completed", 1, "w1", "0", "charge", None),
    ]


async def test_start_step_records_it_as_running(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.StartStep(lease, step("0", attempts=2, state="retrying"), 11.0))
    [saved] = await store.get_steps("r1")
    assert (saved.state, saved.attempts) == ("running", 2)
    assert (await events(store, "r1"))[-1][1:3] == ("task.running", 2)


async def test_resaving_an_identical_final_step_is_accepted_silently(store: Store) -> None:
    lease = await claim_one(store, "r1")
    for final in (step("0"), step("1", state="failed", error=("ValueError", "bad"))):
        await execute(store, o.SaveStep(lease, final, 11.0))
        before = await snapshot(store, "r1")
        assert await execute(store, o.SaveStep(lease, final, 12.0)) is False  # wrote nothing
        assert await snapshot(store, "r1") == before


async def test_a_different_final_outcome_is_a_conflict(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.SaveStep(lease, step("0", output='"first"'), 11.0))
    await execute(store, o.SaveStep(lease, step("1", state="failed", error=("E", "x")), 11.0))
    before = await snapshot(store, "r1")
    for refused in [
        o.SaveStep(lease, step("0", output='"second"'), 12.0),
        o.SaveStep(lease, step("0", state="failed", error=("E", "x")), 12.0),
        o.SaveStep(lease, step("0", "other-task"), 12.0),
        o.SaveStep(lease, step("0", state="retrying", error=("E", "x")), 12.0),
        o.StartStep(lease, step("0", state="running"), 12.0),
        o.StartStep(lease, step("1", state="failed", error=("E", "x")), 12.0),
        o.SaveStep(lease, step("1"), 12.0),
    ]:
        [outcome] = await store.apply([refused])
        assert isinstance(outcome, StepConflict), refused
        assert f"step {refused.step.position} is already final" in str(outcome)
        assert await snapshot(store, "r1") == before
    with pytest.raises(StepConflict):
        await execute(store, o.SaveStep(lease, step("0", output='"third"'), 13.0))


async def test_task_idempotency_key_is_unique_per_run_and_name(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.SaveStep(lease, step("0", "pay", key="k1"), 11.0))
    before = await snapshot(store, "r1")
    for refused in [
        o.SaveStep(lease, step("1", "pay", key="k1"), 12.0),
        o.StartStep(lease, step("1", "pay", "running", key="k1"), 12.0),
    ]:
        [outcome] = await store.apply([refused])
        assert isinstance(outcome, StepConflict)
        assert "'k1'" in str(outcome) and "at step 0" in str(outcome)
        assert await snapshot(store, "r1") == before
    # Another name, another key, or another run: no conflict.
    assert await store.apply([
        o.SaveStep(lease, step("1", "refund", key="k1"), 12.0),
        o.SaveStep(lease, step("2", "pay", key="k2"), 12.0),
        o.SaveStep(lease, step("3", "pay"), 12.0),
        o.SaveStep(lease, step("4", "pay"), 12.0),
    ]) == [True] * 4
    other = await claim_one(store, "r2", now=13.0)
    assert await execute(store, o.SaveStep(other, step("0", "pay", key="k1"), 14.0)) is True


async def test_a_non_final_step_can_move_to_another_key(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.StartStep(lease, step("0", "pay", "running", key="k1"), 11.0))
    await execute(store, o.SaveStep(lease, step("0", "pay", key="k2"), 12.0))
    await execute(store, o.SaveStep(lease, step("1", "pay", key="k1"), 13.0))
    assert [(s.position, s.idempotency_key) for s in await store.get_steps("r1")] == [
        ("0", "k2"), ("1", "k1")]


async def test_retrying_steps_can_be_retried_then_completed(store: Store) -> None:
    lease = await claim_one(store, "r1")
    retrying = step("0", state="retrying", error=("IOError", "timeout"), next_attempt_at=12.5)
    await execute(store, o.StartStep(lease, step("0", state="running"), 11.0))
    await execute(store, o.SaveStep(lease, retrying, 11.5))
    assert await store.get_steps("r1") == (retrying,)
    await execute(store, o.StartStep(lease, step("0", state="running", attempts=2), 12.5))
    await execute(store, o.SaveStep(lease, step("0", attempts=2, output='"late"'), 13.0))
    [final] = await store.get_steps("r1")
    assert (final.state, final.attempts, final.output) == ("completed", 2, '"late"')
    assert (final.error_type, final.next_attempt_at) == (None, None)
    assert (await events(store, "r1"))[-4:] == [
        (11.0, "task.running", 1, "w1", "0", "charge", None),
        (11.5, "task.retrying", 1, "w1", "0", "charge",
         "IOError: timeout; next attempt at 1970-01-01T00:00:12.500Z"),
        (12.5, "task.running", 2, "w1", "0", "charge", None),
        (13.0, "task.completed", 2, "w1", "0", "charge", None),
    ]


async def test_failed_and_recorded_steps_history(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await store.apply([
        o.SaveStep(lease, step("0", state="failed", error=("ValueError", "bad card"),
                                attempts=3), 11.0),
        o.SaveStep(lease, step("1", "now", kind="now", output="1700000000.5"), 12.0),
    ])
    assert (await events(store, "r1"))[-2:] == [
        (11.0, "task.failed", 3, "w1", "0", "charge", "ValueError: bad card"),
        (12.0, "step.recorded", 1, "w1", "1", "now", "now"),
    ]


async def test_steps_keep_the_order_they_were_first_recorded(store: Store) -> None:
    lease = await claim_one(store, "r1")
    for position in ["10", "2", "1", "b", "a"]:
        await execute(store, o.StartStep(lease, step(position, state="running"), 11.0))
    await execute(store, o.SaveStep(lease, step("2"), 12.0))
    assert [s.position for s in await store.get_steps("r1")] == ["10", "2", "1", "b", "a"]


async def test_starts_and_outcomes_of_several_runs_in_one_batch(store: Store) -> None:
    """The busy batch (PostgreSQL applies it as one read and one write): runs interleaved,
    one step started and finished in the same batch, a stale write refused in the middle
    (it changes nothing), a step of a run not there, and a start that renews the lease."""
    await store.apply([enqueue("r1"), enqueue("r2"), enqueue("r3")])
    a, b, c = (x.lease for x in await claim(store, now=10.0))
    await execute(store, o.StartStep(b, step("0", state="running"), 10.5))
    outcomes = await store.apply([
        o.StartStep(a, step("0", state="running"), 11.0, 60.0),
        o.SaveStep(b, step("0"), 11.0),
        o.SaveStep(a, step("0", output='"a0"'), 11.0),
        o.SaveStep(Lease("r3", c.epoch - 1, "w1"), step("0"), 11.0),
        o.StartStep(a, step("1", "ship", state="running"), 11.0, 60.0),
        o.StartStep(Lease("ghost", 1, "w1"), step("0", state="running"), 11.0),
        o.StartStep(b, step("1", "ship", state="running"), 11.0),
        o.SaveStep(a, step("0", output='"a0"'), 11.0),  # the same outcome again
    ])
    assert [type(x).__name__ if isinstance(x, AikiError) else x for x in outcomes] == [
        True, True, True, "StaleLease", True, "StaleLease", True, False]
    assert [(s.position, s.state, s.output) for s in await store.get_steps("r1")] == [
        ("0", "completed", '"a0"'), ("1", "running", None)]
    assert [(s.position, s.state) for s in await store.get_steps("r2")] == [
        ("0", "completed"), ("1", "running")]
    assert await store.get_steps("r3") == ()
    r1 = await store.get_run("r1")
    assert r1 is not None and (r1.updated_at, r1.lease_expires_at) == (11.0, 71.0)
    assert [(e[1], e[4]) for e in await events(store, "r1")] == [
        ("run.queued", None), ("run.running", None), ("task.running", "0"),
        ("task.completed", "0"), ("task.running", "1")]
    assert [e[1] for e in await events(store, "r3")] == ["run.queued", "run.running"]


async def test_last_outcomes_and_completions_of_several_runs_in_one_batch(store: Store) -> None:
    """Each run's last task outcome riding with its completion, several runs in one batch
    (PostgreSQL applies the outcomes together first): each answer in its place."""
    await store.apply([enqueue("r1"), enqueue("r2")])
    a, b = (x.lease for x in await claim(store, now=10.0))
    await store.apply([o.StartStep(a, step("0", state="running"), 10.5),
                       o.StartStep(b, step("0", state="running"), 10.5)])
    outcomes = await store.apply([
        o.SaveStep(a, step("0"), 11.0), o.CompleteRun(a, '"a"', 11.0),
        o.SaveStep(b, step("0"), 11.0), o.FailRun(b, "E", "boom", 11.0),
        o.SaveStep(b, step("1"), 11.0),  # after its run failed: refused
    ])
    assert [type(x).__name__ if isinstance(x, AikiError) else getattr(x, "state", x)
            for x in outcomes] == [True, "completed", True, "failed", "StaleLease"]
    for run_id, state in (("r1", "completed"), ("r2", "failed")):
        assert [s.state for s in await store.get_steps(run_id)] == ["completed"]
        assert [e[1] for e in await events(store, run_id)][-2:] == ["task.completed",
                                                                    f"run.{state}"]


async def test_a_start_after_its_runs_completion_in_the_same_batch_is_refused(
        store: Store) -> None:
    """The later ops of a run in a batch see what the earlier ones did, also where SQLite
    decides a batch's task starts, outcomes and completions before it writes them."""
    lease = await claim_one(store, "r1")
    await execute(store, o.StartStep(lease, step("0", state="running"), 10.5))
    outcomes = await store.apply([
        o.SaveStep(lease, step("0"), 11.0), o.CompleteRun(lease, '"a"', 11.0),
        o.StartStep(lease, step("1", state="running"), 11.5, 60.0),
        o.SaveStep(lease, step("1"), 11.5),
    ])
    assert [type(x).__name__ if isinstance(x, AikiError) else getattr(x, "state", x)
            for x in outcomes] == [True, "completed", "StaleLease", "StaleLease"]
    assert [(s.position, s.state) for s in await store.get_steps("r1")] == [("0", "completed")]
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_expires_at, run.updated_at) == (
        "completed", None, 11.0)


async def test_a_runs_ops_on_both_sides_of_an_enqueue_in_a_batch(store: Store) -> None:
    """A start that renews the lease, an enqueue, then the start's outcome: the outcome sees
    the renewed lease (SQLite writes what it decided before the enqueue, and reads on)."""
    lease = await claim_one(store, "r1")
    outcomes = await store.apply([
        o.StartStep(lease, step("0", state="running"), 11.0, 60.0), enqueue("r2"),
        o.SaveStep(lease, step("0"), 12.0), enqueue("r3"), o.CompleteRun(lease, '"a"', 13.0),
    ])
    assert [getattr(x, "state", x) for x in outcomes] == [
        True, o.EnqueueOutcome("r2", True), True, o.EnqueueOutcome("r3", True), "completed"]
    assert [(s.position, s.state) for s in await store.get_steps("r1")] == [("0", "completed")]
    assert [e[1] for e in await events(store, "r1")][-3:] == [
        "task.running", "task.completed", "run.completed"]


async def test_a_renewed_lease_is_kept_by_the_outcome_after_an_enqueue(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await store.apply([o.StartStep(lease, step("0", state="running"), 11.0, 60.0),
                       enqueue("r2"), o.SaveStep(lease, step("0"), 12.0)])
    run = await store.get_run("r1")
    assert run is not None and (run.lease_expires_at, run.updated_at) == (71.0, 12.0)


async def test_a_batch_stores_text_and_floats_as_sent(store: Store) -> None:
    """Text past ASCII, quotes and backslashes, and floats of every size, infinity among
    them, come back as sent from a batch of several runs' starts and outcomes (which
    PostgreSQL writes as columns of arrays, SQLite as a statement per table)."""
    await store.apply([enqueue("r1"), enqueue("r2")])
    a, b = (c.lease for c in await claim(store, now=10.0))
    await store.apply([o.StartStep(a, step("0", state="running"), 11.0, math.inf),
                       o.StartStep(b, step("0", state="running"), 11.0, 60.0)])
    assert [(r.id, r.lease_expires_at) for r in await store.list_runs()] == [
        ("r2", 71.0), ("r1", math.inf)]
    retrying = attrs.evolve(step("0", "charge ☃ \u00e9", state="retrying",
                                 error=("Flaky", 'it\'s "quoted" \\ ☃')),
                            next_attempt_at=1.5e-7 + 20.0)
    await store.apply([o.SaveStep(a, retrying, 1234567890.123456789),
                       o.SaveStep(b, retrying, 12.0)])
    assert [await store.get_steps(r) for r in ("r1", "r2")] == [(retrying,), (retrying,)]
    assert [(r.id, r.updated_at) for r in await store.list_runs()] == [
        ("r2", 12.0), ("r1", 1234567890.123456789)]


# -- suspend, wake, release, finish -------------------------------------------------------
async def test_suspend_then_wake_due_runs_only(store: Store) -> None:
    await store.apply([enqueue("r1"), enqueue("r2"), enqueue("r3")])
    a, b, _ = (c.lease for c in await claim(store, now=10.0))
    assert await store.next_due() == 40.0  # the leases' expiry
    await execute(store, suspend(a, 200.0, "sleep cooling-off", 11.0))
    await execute(store, suspend(b, 100.0, "retry charge", 12.0))
    run = await store.get_run("r1")
    assert run is not None
    assert (run.state, run.lease_owner, run.lease_expires_at) == ("waiting", None, None)
    assert await store.get_waits("r1") == (
        WaitRecord("r1", "0", "retry", "charge", 200.0, 11.0),)
    assert (run.lease_epoch, run.attempts, run.updated_at) == (1, 1, 11.0)
    assert (await events(store, "r1"))[-1] == (
        11.0, "run.waiting", 1, "w1", None, None,
        "sleep cooling-off; waits for the retry of task 'charge' at step 0"
        " until 1970-01-01T00:03:20.000Z")
    assert await store.next_due() == 40.0
    assert await execute(store, o.WakeDue(99.5)) == ()
    assert await execute(store, o.ExpireLeases(150.0)) == ("r3",)  # waiters hold no lease
    assert await store.next_due() == 100.0
    assert await execute(store, o.WakeDue(100.0)) == ("r2",)
    woken = await store.get_run("r2")
    assert woken is not None
    assert (woken.state, woken.updated_at) == ("queued", 100.0)
    assert await store.get_waits("r2") == ()
    assert (await events(store, "r2"))[-1] == (
        100.0, "run.queued", 1, None, None, None,
        "woke up: the retry of task 'charge' at step 0 until 1970-01-01T00:01:40.000Z"
        " came due")
    assert await store.next_due() == 200.0
    assert await execute(store, o.WakeDue(500.0)) == ("r1",)
    assert await store.next_due() is None
    assert await execute(store, o.WakeDue(500.0)) == ()
    assert [c.run.id for c in await claim(store, now=501.0)] == ["r1", "r2", "r3"]


async def test_wake_several_runs_in_enqueue_order(store: Store) -> None:
    await store.apply([enqueue(f"r{i}") for i in range(3)])
    leases = [c.lease for c in await claim(store, now=10.0)]
    await store.apply([suspend(lease, 20.0 - i, "sleep", 11.0)
                       for i, lease in enumerate(reversed(leases))])
    assert await execute(store, o.WakeDue(20.0)) == ("r0", "r1", "r2")


async def test_next_due_counts_a_due_time_of_zero(store: Store) -> None:
    lease = await claim_one(store, "r1", now=0.0)
    await execute(store, suspend(lease, 0.0, "retry", -1.0))
    assert await store.next_due() == 0.0


async def test_release_puts_the_run_back_in_the_queue(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.ReleaseRun(lease, 12.0))
    run = await store.get_run("r1")
    assert run is not None
    assert (run.state, run.lease_owner, run.lease_expires_at, run.updated_at) == (
        "queued", None, None, 12.0)
    assert (await events(store, "r1"))[-1] == (12.0, "run.queued", 1, "w1", None, None,
                                                "released by its worker")
    [again] = await claim(store, worker="w2", now=13.0)
    assert (again.run.attempts, again.run.lease_epoch) == (2, 2)


async def test_complete_sets_the_result_and_clears_the_lease(store: Store) -> None:
    lease = await claim_one(store, "r1")
    returned = await execute(store, o.CompleteRun(lease, '{"total": 3}', 20.0))
    run = await store.get_run("r1")
    assert run is not None
    assert returned == run  # the run as committed, for watchers, without a read
    assert (run.state, run.result, run.finished_at, run.updated_at) == (
        "completed", '{"total": 3}', 20.0, 20.0)
    assert (run.lease_owner, run.lease_expires_at, run.error_type, run.error_message) == (
        None, None, None, None)
    assert (await events(store, "r1"))[-1] == (20.0, "run.completed", 1, "w1", None, None, None)
    assert await claim(store, now=21.0) == ()
    assert await execute(store, o.ExpireLeases(1000.0)) == ()
    assert await execute(store, o.Renew((lease,), 22.0, 5.0)) == ("r1",)


async def test_fail_sets_the_error_and_clears_the_lease(store: Store) -> None:
    lease = await claim_one(store, "r1")
    returned = await execute(store, o.FailRun(lease, "TaskFailed", "charge failed", 20.0))
    run = await store.get_run("r1")
    assert run is not None
    assert returned == run
    assert (run.state, run.error_type, run.error_message, run.finished_at) == (
        "failed", "TaskFailed", "charge failed", 20.0)
    assert (run.result, run.lease_owner, run.lease_expires_at) == (None, None, None)
    assert (await events(store, "r1"))[-1] == (
        20.0, "run.failed", 1, "w1", None, None, "TaskFailed: charge failed")


# -- reads --------------------------------------------------------------------------------
async def test_list_runs_filters_and_orders_newest_first(store: Store) -> None:
    await store.apply([
        enqueue("a1", "alpha", now=1.0), enqueue("b1", "beta", now=2.0),
        enqueue("a2", "alpha", now=3.0), enqueue("a3", "alpha", now=4.0),
    ])
    await claim(store, workflows=(("alpha", "1"),), limit=1)

    def ids(runs: tuple[RunRecord, ...]) -> list[str]:
        return [r.id for r in runs]

    assert ids(await store.list_runs()) == ["a3", "a2", "b1", "a1"]
    assert ids(await store.list_runs(workflow="alpha")) == ["a3", "a2", "a1"]
    assert ids(await store.list_runs(state="queued")) == ["a3", "a2", "b1"]
    assert ids(await store.list_runs(workflow="alpha", state="queued")) == ["a3", "a2"]
    assert ids(await store.list_runs(workflow="alpha", state="running")) == ["a1"]
    assert ids(await store.list_runs(limit=2)) == ["a3", "a2"]
    assert ids(await store.list_runs(workflow="alpha", limit=1)) == ["a3"]
    assert await store.list_runs(limit=0) == ()
    assert await store.list_runs(workflow="gamma") == ()
    assert await store.list_runs(state="waiting") == ()
    assert (await store.list_runs(workflow="alpha", state="running"))[0] == \
        await store.get_run("a1")


async def test_history_is_in_order_with_increasing_seq(store: Store) -> None:
    await store.apply([enqueue("r1"), enqueue("r2")])
    l1, l2 = (c.lease for c in await claim(store, now=10.0))
    await store.apply([
        o.StartStep(l1, step("0", state="running"), 11.0),
        o.SaveStep(l2, step("0"), 11.0),
        o.SaveStep(l1, step("0"), 12.0),
        suspend(l1, 30.0, "sleep", 13.0),
    ])
    await execute(store, o.WakeDue(30.0))
    [again] = await claim(store, now=31.0)
    await execute(store, o.CompleteRun(again.lease, "null", 32.0))
    history = await store.get_history("r1")
    assert [e.event for e in history] == [
        "run.queued", "run.running", "task.running", "task.completed", "run.waiting",
        "run.queued", "run.running", "run.completed",
    ]
    assert [e.attempt for e in history] == [0, 1, 1, 1, 1, 1, 2, 2]
    assert all(e.run_id == "r1" for e in history)
    seqs = [e.seq for e in history]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # seq orders events across runs too.
    both = sorted([*history, *await store.get_history("r2")], key=lambda e: e.seq)
    assert [(e.run_id, e.event) for e in both][:6] == [
        ("r1", "run.queued"), ("r2", "run.queued"), ("r1", "run.running"),
        ("r2", "run.running"), ("r1", "task.running"), ("r2", "task.completed"),
    ]


async def test_execute_raises_refused_outcomes(store: Store) -> None:
    lease = await claim_one(store, "r1")
    assert await execute(store, o.SaveStep(lease, step("0"), 11.0)) is True
    with pytest.raises(StepConflict, match="already final"):
        await execute(store, o.SaveStep(lease, step("0", output='"other"'), 12.0))
    with pytest.raises(StaleLease, match="is stale"):
        await execute(store, o.CompleteRun(Lease("r1", 7, "w1"), "1", 12.0))
    assert await execute(store, o.ExpireLeases(12.0)) == ()


async def test_an_unknown_op_is_a_type_error(store: Store) -> None:
    with pytest.raises(TypeError, match="unknown store operation"):
        await store.apply([o.Op()])


# -- differential: random op sequences against the reference model ------------------------
WORKFLOWS = [("wf", "1"), ("wf", "2"), ("other", "1")]
# A target run: (prefer a running one, index); most writes use the current lease.
target = st.tuples(st.sampled_from([True, True, True, False]), st.integers(0, 7))
lease_mode = st.sampled_from(["current"] * 6 + ["stale", "intruder"])
enqueue_command = st.tuples(
    st.just("enqueue"), st.integers(0, 2), st.sampled_from([None, None, "k1", "k2"]),
    st.sampled_from([None] * 5 + [0]),  # or retry the enqueue of an existing run id
)
step_command = st.tuples(
    st.sampled_from(["save_step", "start_step", "save_step"]), target, lease_mode,
    st.sampled_from(["2", "0", "1"]), st.sampled_from(["pay", "pay", "ship"]),
    st.sampled_from([None, "k1", "k1", "k2"]), st.sampled_from(["completed", "failed", "retrying"]),
    st.sampled_from(['"a"', '"b"']), st.sampled_from(["task", "task", "now"]),
    st.integers(1, 2),
)
claim_command = st.tuples(
    st.just("claim"), st.sampled_from(["w1", "w2"]),
    st.sampled_from([(0, 1, 2), (0, 1, 2), (0,), (1, 2), ()]), st.sampled_from([5, 1, 2, 0]),
    st.sampled_from([5.0, 50.0, 50.0]),
)
resave_command = st.tuples(  # save a recorded step again: as it is, changed, or started again
    st.just("resave"), target, lease_mode, st.integers(0, 2),
    st.sampled_from([None, None, "changed", "start"]),
)
command = st.one_of(  # repeated alternatives are weights: keep runs running and busy
    enqueue_command, enqueue_command, claim_command, claim_command, claim_command,
    step_command, step_command, step_command, step_command, resave_command, resave_command,
    st.tuples(st.just("renew"), st.lists(st.tuples(target, lease_mode), max_size=3),
              st.sampled_from([5.0, 50.0])),
    st.tuples(st.just("expire")),
    st.tuples(st.just("wake")),
    st.tuples(st.just("end_cancels")),
    # Children: started from a step (detached or not), joined, waited on.
    st.tuples(st.just("start_child"), target, lease_mode, st.sampled_from(["8", "9"]),
              st.sampled_from([False, False, True])),
    st.tuples(st.just("join"), target, lease_mode, st.sampled_from(["10", "11"]),
              st.integers(0, 7)),
    # A deadline scope expired over some steps: those not final are abandoned.
    st.tuples(st.just("abandon"), target, lease_mode,
              st.lists(st.sampled_from(["0", "1", "2", "5", "6", "10"]), max_size=3)),
    st.tuples(st.just("suspend"), target, lease_mode, st.sampled_from([0.0, 1.0, 3.5])),
    st.tuples(st.sampled_from(["complete", "fail", "release"]), target, lease_mode),
    # Waits: a sleep or event wait reached, the run waiting on them, sends and wake-ups.
    st.tuples(st.just("await"), target, lease_mode, st.sampled_from(["5", "6", "7"]),
              st.sampled_from(["sleep", "event", "event"]), st.sampled_from(["go", "stop"]),
              st.sampled_from([None, 0.0, 1.0, 4.0])),
    st.tuples(st.just("wait_on"), target, lease_mode, st.sampled_from(["5", "6", "7"]),
              st.sampled_from(["sleep", "event", "retry", "deadline"]),
              st.sampled_from(["go", "stop"]),
              st.sampled_from([None, 1.0, 4.0])),
    st.tuples(st.just("send"), st.integers(0, 7), st.sampled_from(["go", "go", "stop"]),
              st.sampled_from([None, None, "m1", "m2"])),
    st.tuples(st.just("wakeup"), st.integers(0, 7)),
    st.tuples(st.just("purge"), st.sampled_from([0.0, 2.0, 100.0]), st.integers(0, 2)),
    st.tuples(st.just("retry"), st.integers(0, 7), st.sampled_from([None, "2"])),
    # Cancels: at once (no grace), or with a grace period the timer (wake) may end.
    st.tuples(st.just("cancel"), st.integers(0, 7), st.sampled_from([None, "why"]),
              st.sampled_from([0.0, 3.0, 60.0])),
    # Schedules: defined (or redefined), fired by the timer, paused, triggered, backfilled.
    st.tuples(st.just("define"), st.sampled_from(["s0", "s1"]),
              st.sampled_from([2.0, 5.0, None]), st.sampled_from(["skip", "buffer_one", "allow"]),
              st.sampled_from([0.0, 3.0, 100.0]), st.booleans()),
    st.tuples(st.just("fire")), st.tuples(st.just("fire")),
    st.tuples(st.just("pause_schedule"), st.sampled_from(["s0", "s1", "s9"]), st.booleans()),
    st.tuples(st.just("trigger"), st.sampled_from(["s0", "s1"]), st.sampled_from(["t1", "t2"])),
    st.tuples(st.just("backfill"), st.sampled_from(["s0", "s1"]), st.sampled_from([0.0, 6.0]),
              st.sampled_from([0.0, 4.0, 30.0])),
    st.tuples(st.just("delete_schedule"), st.sampled_from(["s0", "s1"])),
    # Controls: pause and resume any run (held ones too), fork one from a step.
    st.tuples(st.just("pause"), st.integers(0, 7)),
    st.tuples(st.just("pause"), st.integers(0, 7)),
    st.tuples(st.just("resume"), st.integers(0, 7)),
    st.tuples(st.just("fork"), st.integers(0, 7), st.integers(-1, 4), st.sampled_from([None, "2"]),
              st.booleans()),
)
PRELUDE: list[tuple[float, list[tuple[Any, ...]]]] = [
    (0.0, [("enqueue", 0, None, None), ("enqueue", 1, "k1", None), ("enqueue", 2, None, None)]),
    (1.0, [("claim", "w1", (0, 1, 2), 2, 50.0)]),
]
batches = st.lists(
    st.tuples(st.sampled_from([0.0, 0.0, 0.5, 0.5, 1.0, 2.0, 5.0, 20.0]),
              st.lists(command, min_size=1, max_size=3)),
    min_size=8, max_size=30,
)


class World:
    """Turns abstract commands into concrete ops, reading leases from the reference store."""

    def __init__(self, reference: MemoryStore) -> None:
        self.reference = reference
        self.run_ids: list[str] = []
        self.now = 0.0

    def run_id(self, index: int) -> str:
        return self.run_ids[index % len(self.run_ids)] if self.run_ids else "ghost"

    async def lease(self, target: tuple[bool, int], mode: str) -> Lease:
        prefer_running, index = target
        running = [r.id for r in await self.reference.list_runs(limit=1000)
                   if r.lease_owner is not None]  # running, or paused and not given back
        run_id = running[index % len(running)] if prefer_running and running else self.run_id(index)
        run = await self.reference.get_run(run_id)
        epoch, owner = (run.lease_epoch, run.lease_owner or "w1") if run else (1, "w1")
        if mode == "stale":
            return Lease(run_id, epoch - 1, owner)
        return Lease(run_id, epoch, "intruder" if mode == "intruder" else owner)

    async def op(self, cmd: tuple[Any, ...]) -> o.Op[Any]:
        kind, now = cmd[0], self.now
        if kind == "enqueue":
            _, wf, key, reuse = cmd
            if reuse is not None and self.run_ids:
                run_id = self.run_id(reuse)
            else:
                run_id = f"r{len(self.run_ids)}"
                self.run_ids.append(run_id)
            workflow, version = WORKFLOWS[wf]
            return o.Enqueue(run_id, workflow, version, f'{{"at": {now}}}', key, now,
                             "return_existing" if key == "k2" else "raise")
        if kind == "claim":
            _, worker, wanted, limit, ttl = cmd
            return o.Claim(worker, tuple(WORKFLOWS[i] for i in wanted), limit, now, ttl)
        if kind == "renew":
            _, leases, ttl = cmd
            return o.Renew(tuple([await self.lease(i, m) for i, m in leases]), now, ttl)
        if kind == "expire":
            return o.ExpireLeases(now)
        if kind == "wake":
            return o.WakeDue(now)
        if kind == "end_cancels":
            return o.EndCancels(now)
        if kind == "send":
            _, index, name, key = cmd
            return o.SendEvent(self.run_id(index), name, f'{{"sent": {now}}}', key, now)
        if kind == "wakeup":
            return o.Wakeup(self.run_id(cmd[1]), now)
        if kind == "purge":
            return o.PurgeRuns(now - cmd[1], cmd[2])
        if kind == "retry":
            return o.RetryRun(self.run_id(cmd[1]), cmd[2], "c", now)
        if kind == "cancel":
            return o.CancelRun(self.run_id(cmd[1]), cmd[2], cmd[3], "c", now)
        if kind == "define":
            _, sid, every, overlap, window, update = cmd
            cron = "* * * * *" if every is None else None
            record = ScheduleRecord(sid, "wf", "1", f'{{"s": "{sid}"}}', cron, "UTC", every,
                                    overlap, window, False,
                                    sch.next_after(cron, "UTC", every, now), None, None, now,
                                    now)
            return o.DefineSchedule(record, update, now)
        if kind == "fire":
            return o.FireSchedules(now)
        if kind == "pause_schedule":
            return o.PauseSchedule(cmd[1], cmd[2], now)
        if kind == "trigger":
            return o.TriggerSchedule(cmd[1], cmd[2], now)
        if kind == "backfill":
            return o.BackfillSchedule(cmd[1], max(now - cmd[2] - cmd[3], 0.0),
                                      max(now - cmd[3], 0.0), now)
        if kind == "delete_schedule":
            return o.DeleteSchedule(cmd[1])
        if kind == "pause":
            return o.PauseRun(self.run_id(cmd[1]), "c", now)
        if kind == "resume":
            return o.ResumeRun(self.run_id(cmd[1]), "c", now)
        if kind == "fork":
            _, index, from_step, version, again = cmd
            if again and any(r.startswith("f") for r in self.run_ids):  # a fork sent again
                new_id = next(r for r in reversed(self.run_ids) if r.startswith("f"))
            else:
                new_id = f"f{len(self.run_ids)}"
                self.run_ids.append(new_id)
            return o.ForkRun(self.run_id(index), new_id, from_step, version, "c", now)
        lease = await self.lease(cmd[1], cmd[2])
        if kind == "start_child":
            _, _, _, position, detached = cmd
            child_id = f"{lease.run_id}/{position}"
            if child_id not in self.run_ids and lease.run_id in self.run_ids:
                self.run_ids.append(child_id)
            record = StepRecord(position, "child", "wf", "h", '{"c": 1}', None, "running", 1)
            return o.StartChild(lease, record, child_id, "wf", "1", '{"c": 1}', detached, now)
        if kind == "abandon":
            return o.AbandonSteps(lease, tuple(cmd[3]), "4", now)
        if kind == "join":
            _, _, _, position, index = cmd
            child_id = self.run_id(index)
            if cmd[1][0]:  # half the time, a wait on the join too
                return o.WaitRun(lease, (WaitFor(position, "join", child_id),), "joins", now)
            record = StepRecord(position, "join", child_id, "", "{}", None, "running", 1)
            return o.AwaitStep(lease, record, now)
        if kind == "await":
            _, _, _, position, step_kind, name, delay = cmd
            seconds = 1.0 if delay is None and step_kind == "sleep" else delay
            due = None if seconds is None else now + seconds
            record = StepRecord(position, step_kind, "sleep" if step_kind == "sleep" else name,
                                "", f'{{"seconds": {json.dumps(seconds)}}}', None, "running",
                                1, next_attempt_at=due)
            return o.AwaitStep(lease, record, now)
        if kind == "wait_on":
            _, _, _, position, wait_kind, name, delay = cmd
            condition = WaitFor(position, wait_kind, name if wait_kind in ("event", "retry")
                                else wait_kind,
                                None if delay is None else now + delay)
            return o.WaitRun(lease, (condition,), "waits", now)
        if kind in ("start_step", "save_step"):
            _, _, _, position, name, key, state, output, step_kind, attempts = cmd
            record = step(
                position, name, state, output=output, key=key, kind=step_kind,
                attempts=attempts, error=None if state == "completed" else ("E", name),
                next_attempt_at=now + 1.0 if state == "retrying" else None,
            )
            return (o.StartStep if kind == "start_step" else o.SaveStep)(lease, record, now)
        if kind == "resave":
            _, _, _, index, tweak = cmd
            steps = await self.reference.get_steps(lease.run_id) or (step(),)
            record = steps[index % len(steps)]
            if tweak == "start":
                return o.StartStep(lease, record, now)
            if tweak == "changed":
                record = attrs.evolve(record, output=f'"changed at {now}"', state="completed")
            return o.SaveStep(lease, record, now)
        if kind == "complete":
            return o.CompleteRun(lease, f'"done at {now}"', now)
        if kind == "fail":
            return o.FailRun(lease, "E", f"failed at {now}", now)
        if kind == "release":
            return o.ReleaseRun(lease, now)
        assert kind == "suspend"
        return suspend(lease, now + cmd[3], "sleep", now)


def comparable(outcome: Any) -> Any:
    if isinstance(outcome, AikiError):
        return (type(outcome).__name__, str(outcome))
    return outcome


async def observe(store: Store, run_ids: list[str]) -> Any:
    """Everything the store's reads show; history and event ``seq`` replaced by its rank in
    its run's history or events. (The order of different runs' events is no contract: a
    batch's requests are in flight at once, and PostgreSQL applies its task starts and
    outcomes together, ahead of other runs' ops; each run's own order is kept. Nor are
    dense numbers: a PostgreSQL sequence number taken by a transaction that did not commit
    is not given again.)"""
    scheduled = [r.id for r in await store.list_runs(limit=1000) if "@" in r.id]
    per_run = [await snapshot(store, r) for r in [*run_ids, *sorted(scheduled), "ghost"]]
    return (
        [(run, steps, [attrs.evolve(e, seq=i) for i, e in enumerate(history)])
         for [(run, steps, history)] in per_run],
        await store.list_runs(), await store.list_runs(limit=2),
        await store.list_runs(workflow="wf"), await store.list_runs(state="running"),
        await store.list_runs(workflow="other", state="queued"),
        await store.next_due(),
        [await store.get_children(r) for r in run_ids],
        [(await store.get_waits(r), [attrs.evolve(e, seq=i) for i, e in enumerate(
            await store.get_events(r))]) for r in run_ids],
        await store.list_schedules(),
        [await store.get_firings(sid, 1000) for sid in ("s0", "s1")],
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=batches, empty_start=st.booleans())
async def test_random_op_sequences_match_the_reference(
    store_factory: StoreFactory, batches: list[tuple[float, list[tuple[Any, ...]]]],
    empty_start: bool,
) -> None:
    reference = MemoryStore()
    world = World(reference)
    async with store_factory() as store:
        for dt, commands in (batches if empty_start else [*PRELUDE, *batches]):
            world.now += dt
            ops = [await world.op(cmd) for cmd in commands]
            expected = [comparable(x) for x in await reference.apply(ops)]
            assert [comparable(x) for x in await store.apply(ops)] == expected, ops
            assert await observe(store, world.run_ids) == await observe(reference, world.run_ids)
            for run_id in world.run_ids:
                assert_sends_taken_in_order(await reference.get_events(run_id))


def assert_sends_taken_in_order(events: Sequence[EventRecord]) -> None:
    """A run's waits take its events of one name in send order: none is delivered while an
    older one stays buffered."""
    for name in {e.name for e in events}:
        taken = [e.position is not None for e in events if e.name == name]  # in send order
        assert taken == sorted(taken, reverse=True), [
            (e.seq, e.position) for e in events if e.name == name]


# -- retried and late writes (found by the simulation) -----------------------------------
async def test_a_retried_identical_retrying_step_changes_nothing(store: Store) -> None:
    lease = await claim_one(store, "r1")
    retrying = step(state="retrying", error=("Flaky", "try later"), next_attempt_at=50.0)
    await execute(store, o.StartStep(lease, step(state="running"), 11.0))
    await execute(store, o.SaveStep(lease, retrying, 12.0))
    before = await snapshot(store, "r1")
    await execute(store, o.SaveStep(lease, retrying, 13.0))  # its first reply was lost
    assert await snapshot(store, "r1") == before


async def test_a_late_duplicate_of_an_earlier_attempt_changes_nothing(store: Store) -> None:
    # Seed 52: a duplicated "attempt 1 retrying" arrived after attempt 2's write and
    # regressed the step. A step only moves forward within a lease.
    lease = await claim_one(store, "r1")
    first = step(state="retrying", attempts=1, error=("Flaky", "1"), next_attempt_at=20.0)
    second = step(state="retrying", attempts=2, error=("Flaky", "2"), next_attempt_at=30.0)
    await execute(store, o.StartStep(lease, step(state="running", attempts=1), 11.0))
    await execute(store, o.SaveStep(lease, first, 12.0))
    await execute(store, o.StartStep(lease, step(state="running", attempts=2), 13.0))
    await execute(store, o.SaveStep(lease, second, 14.0))
    before = await snapshot(store, "r1")
    await execute(store, o.SaveStep(lease, first, 15.0))
    await execute(store, o.StartStep(lease, step(state="running", attempts=2), 16.0))
    assert await snapshot(store, "r1") == before
    assert (await store.get_steps("r1"))[0].attempts == 2


# -- waits: sleeps, events, wake-ups --------------------------------------------------------
def wait_step(position: str, kind: str, name: str, seconds: float | None,
              due: float | None) -> StepRecord:
    return StepRecord(position, kind, name, "", json.dumps({"seconds": seconds}),  # type: ignore[arg-type]
                      None, "running", 1, next_attempt_at=due)


async def test_a_sleep_waits_then_ends_when_due(store: Store) -> None:
    lease = await claim_one(store, "r1")
    sleep = wait_step("0", "sleep", "sleep", 5.0, 16.0)
    waiting = await execute(store, o.AwaitStep(lease, sleep, 11.0))
    assert (waiting.state, waiting.next_attempt_at) == ("running", 16.0)
    assert await execute(store, o.AwaitStep(lease, sleep, 12.0)) == waiting  # nothing new
    await execute(store, o.WaitRun(lease, (WaitFor("0", "sleep", "sleep", 16.0),), "sleeps",
                                   12.0))
    assert (await store.get_run("r1")).state == "waiting"  # type: ignore[union-attr]
    assert await store.next_due() == 16.0
    assert await execute(store, o.WakeDue(16.0)) == ("r1",)
    [done] = await store.get_steps("r1")
    assert (done.state, done.output) == ("completed", "true")
    assert [e[1:] for e in await events(store, "r1")][-4:] == [
        ("sleep.waiting", 1, "w1", "0", "sleep", "until 1970-01-01T00:00:16.000Z"),
        ("run.waiting", 1, "w1", None, None,
         "sleeps; waits for a sleep at step 0 until 1970-01-01T00:00:16.000Z"),
        ("sleep.completed", 1, None, "0", "sleep", "slept"),
        ("run.queued", 1, None, None, None,
         "woke up: a sleep at step 0 until 1970-01-01T00:00:16.000Z came due"),
    ]
    [again] = await claim(store, now=17.0)
    assert await execute(store, o.AwaitStep(again.lease, sleep, 17.0)) == done  # replay


async def test_a_start_with_a_ttl_renews_the_lease_even_when_sent_again(store: Store) -> None:
    lease = await claim_one(store, "r1", now=10.0, ttl=30.0)
    running = step("0", state="running", output=None)
    await execute(store, o.StartStep(lease, running, 12.0))  # without a TTL: no renewal
    assert (await store.get_run("r1")).lease_expires_at == 40.0  # type: ignore[union-attr]
    await execute(store, o.StartStep(lease, running, 20.0, 30.0))  # the same start, again
    assert (await store.get_run("r1")).lease_expires_at == 50.0  # type: ignore[union-attr]
    await execute(store, o.StartStep(lease, step("1", state="running", output=None), 25.0,
                                     30.0))
    assert (await store.get_run("r1")).lease_expires_at == 55.0  # type: ignore[union-attr]
    assert [e[1] for e in await events(store, "r1")].count("task.running") == 3
    stale = attrs.evolve(lease, epoch=lease.epoch + 1)
    with pytest.raises(StaleLease):
        await execute(store, o.StartStep(stale, running, 26.0, 30.0))
    assert (await store.get_run("r1")).lease_expires_at == 55.0  # type: ignore[union-attr]


async def test_waits_are_kept_and_woken_in_position_order_whatever_order_they_came_in(
    store: Store,
) -> None:
    # Two retries of a run.gather's branches, given back in the order the branches got
    # there ("5.3.0" first): every store reads and describes them in position order (the
    # memory store kept the given order, so its history said otherwise than SQLite's).
    lease = await claim_one(store, "r1")
    for position in ("5.1.0", "5.3.0"):
        await execute(store, o.SaveStep(lease, step(position, state="retrying",
                                                    next_attempt_at=40.0), 11.0))
    conditions = (WaitFor("5.3.0", "retry", "charge", 40.0),
                  WaitFor("5.1.0", "retry", "charge", 40.0))
    await execute(store, o.WaitRun(lease, conditions, "retries", 12.0))
    assert [w.position for w in await store.get_waits("r1")] == ["5.1.0", "5.3.0"]
    assert await execute(store, o.WakeDue(40.0)) == ("r1",)
    woke = (await events(store, "r1"))[-1]
    assert woke[-1] == ("woke up: the retry of task 'charge' at step 5.1.0 until "
                        "1970-01-01T00:00:40.000Z or the retry of task 'charge' at step 5.3.0 "
                        "until 1970-01-01T00:00:40.000Z came due")


async def test_wakeup_ends_a_sleep_early_and_is_false_otherwise(store: Store) -> None:
    await execute(store, enqueue("idle", workflow="other"))
    assert await execute(store, o.Wakeup("idle", 10.0)) is False
    with pytest.raises(AikiError, match="no run with id 'ghost'"):
        await execute(store, o.Wakeup("ghost", 10.0))
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "sleep", "sleep", 99.0, 110.0),
                                     11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "sleep", "sleep", 110.0),), "zz",
                                   11.0))
    before = await snapshot(store, "idle")
    assert await execute(store, o.Wakeup("r1", 20.0)) is True
    assert await snapshot(store, "idle") == before
    run = await store.get_run("r1")
    assert run is not None and run.state == "queued"
    assert [(s.state, s.output) for s in await store.get_steps("r1")] == [("completed", "false")]
    assert await execute(store, o.Wakeup("r1", 21.0)) is False  # not sleeping any more
    assert await store.get_waits("r1") == ()


async def test_events_are_buffered_delivered_in_order_and_keyed(store: Store) -> None:
    lease = await claim_one(store, "r1")
    first = await execute(store, o.SendEvent("r1", "ok", '"one"', "k1", 11.0))
    assert first == o.SendOutcome(delivered=False, duplicate=False)
    assert await execute(store, o.SendEvent("r1", "ok", '"again"', "k1", 11.5)) == \
        o.SendOutcome(delivered=False, duplicate=True)
    await execute(store, o.SendEvent("r1", "ok", '"two"', None, 12.0))
    got = await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", None, None),
                                           13.0))
    assert (got.state, got.output) == ("completed", '"one"')
    got = await execute(store, o.AwaitStep(lease, wait_step("1", "event", "ok", 5.0, 18.0),
                                           13.0))
    assert (got.state, got.output) == ("completed", '"two"')
    waiting = await execute(store, o.AwaitStep(lease, wait_step("2", "event", "ok", 5.0, 18.0),
                                               13.0))
    assert waiting.state == "running"
    await execute(store, o.WaitRun(lease, (WaitFor("2", "event", "ok", 18.0),), "waits", 13.0))
    delivered = await execute(store, o.SendEvent("r1", "ok", '"three"', None, 14.0))
    assert delivered == o.SendOutcome(delivered=True, duplicate=False)
    assert (await store.get_run("r1")).state == "queued"  # type: ignore[union-attr]
    assert [(e.payload, e.position) for e in await store.get_events("r1")] == [
        ('"one"', "0"), ('"two"', "1"), ('"three"', "2")]
    assert await execute(store, o.WakeDue(100.0)) == ()  # its wait was cleared


async def test_an_event_wait_times_out_and_a_later_send_goes_to_the_next(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", 5.0, 16.0), 11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "ok", 16.0),), "waits", 11.0))
    assert await execute(store, o.WakeDue(16.0)) == ("r1",)
    [timed_out] = await store.get_steps("r1")
    assert (timed_out.state, timed_out.error_type) == ("failed", "EventTimeout")
    assert await execute(store, o.SendEvent("r1", "ok", '"late"', None, 17.0)) == \
        o.SendOutcome(delivered=False, duplicate=False)
    [again] = await claim(store, now=18.0)
    got = await execute(store, o.AwaitStep(again.lease, wait_step("1", "event", "ok", 5.0,
                                                                   23.0), 18.0))
    assert (got.state, got.output) == ("completed", '"late"')


async def test_a_run_whose_event_is_buffered_does_not_wait(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", None, None), 11.0))
    await execute(store, o.SendEvent("r1", "other", "1", None, 11.5))
    assert (await store.get_steps("r1"))[0].state == "running"
    await execute(store, o.SendEvent("r1", "ok", "2", None, 12.0))  # delivered while held
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "ok", None),), "waits", 13.0))
    run = await store.get_run("r1")
    assert run is not None and run.state == "queued"
    assert (await events(store, "r1"))[-1][-1] == (
        "waits; woke at once: event at step 0 ended while the run was held")


async def test_a_send_does_not_overtake_an_event_buffered_while_the_run_was_paused(
    store: Store,
) -> None:
    # Seed 196 (with the enqueue that claims a free slot): a run waiting at step 0 was
    # paused, an event sent then was buffered, and the resume queued the run with its wait
    # step still waiting (the buffered event is delivered when the run gets there). A second
    # send before the run got there went straight into that wait, and the first event into
    # the next one: the run's waits took its sends out of order.
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", None, None), 11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "ok", None),), "waits", 11.0))
    await execute(store, o.PauseRun("r1", "c", 12.0))
    assert await execute(store, o.SendEvent("r1", "ok", '"first"', None, 13.0)) == \
        o.SendOutcome(delivered=False, duplicate=False)
    await execute(store, o.ResumeRun("r1", "c", 14.0))
    assert (await store.get_steps("r1"))[0].state == "running"  # taken when it gets there
    # The first event goes to the wait; the second is buffered for the next one.
    assert await execute(store, o.SendEvent("r1", "ok", '"second"', None, 15.0)) == \
        o.SendOutcome(delivered=False, duplicate=False)
    assert [(e.payload, e.position) for e in await store.get_events("r1")] == [
        ('"first"', "0"), ('"second"', None)]
    assert (await events(store, "r1"))[-2:] == [
        (15.0, "event.sent", 1, None, None, "ok", None),
        (15.0, "event.received", 1, None, "0", "ok",
         "sent at 1970-01-01T00:00:13.000Z")]
    assert (await store.get_run("r1")).state == "queued"  # type: ignore[union-attr]
    [again] = await claim(store, now=16.0)
    got = await execute(store, o.AwaitStep(again.lease, wait_step("0", "event", "ok", None,
                                                                   None), 16.0))
    assert (got.state, got.output) == ("completed", '"first"')
    got = await execute(store, o.AwaitStep(again.lease, wait_step("1", "event", "ok", None,
                                                                   None), 16.0))
    assert (got.state, got.output) == ("completed", '"second"')


async def test_sends_after_a_resume_keep_the_order_of_those_buffered_while_paused(
    store: Store,
) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", None, None), 11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "ok", None),), "waits", 11.0))
    await execute(store, o.PauseRun("r1", "c", 12.0))
    await execute(store, o.SendEvent("r1", "ok", '"first"', None, 13.0))
    await execute(store, o.SendEvent("r1", "ok", '"second"', None, 13.5))
    await execute(store, o.ResumeRun("r1", "c", 14.0))
    await execute(store, o.SendEvent("r1", "ok", '"third"', "k", 15.0))
    assert [(e.payload, e.position) for e in await store.get_events("r1")] == [
        ('"first"', "0"), ('"second"', None), ('"third"', None)]
    [again] = await claim(store, now=16.0)
    got = [await execute(store, o.AwaitStep(again.lease, wait_step(p, "event", "ok", None,
                                                                    None), 16.0))
           for p in ("0", "1", "2")]
    assert [s.output for s in got] == ['"first"', '"second"', '"third"']


async def test_sends_to_finished_or_unknown_runs_are_refused(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.CompleteRun(lease, "null", 11.0))
    before = await snapshot(store, "r1")
    outcomes = await store.apply([o.SendEvent("r1", "ok", "1", None, 12.0),
                                  o.SendEvent("ghost", "ok", "1", None, 12.0)])
    assert [type(x).__name__ for x in outcomes] == ["RunFinished", "RunNotFound"]
    assert await snapshot(store, "r1") == before
    assert await store.get_events("r1") == ()


# -- retention ------------------------------------------------------------------------------
async def test_purge_deletes_finished_runs_oldest_first_with_everything_they_had(
    store: Store,
) -> None:
    for i, key in enumerate(["k0", None, "k2", None]):
        await execute(store, enqueue(f"r{i}", key=key))
    leases = [c.lease for c in await claim(store, now=10.0)]
    await execute(store, o.SaveStep(leases[0], step("0"), 11.0))
    await execute(store, o.SendEvent("r0", "ok", "1", "m", 11.5))
    await execute(store, o.FailRun(leases[0], "E", "boom", 30.0))
    await execute(store, o.CompleteRun(leases[1], "null", 20.0))
    await execute(store, o.CompleteRun(leases[2], "null", 40.0))
    await execute(store, suspend(leases[3], 500.0, "retry", 12.0))  # unfinished: kept
    assert await execute(store, o.PurgeRuns(20.0, 10)) == ()  # finished_at < before
    assert await execute(store, o.PurgeRuns(35.0, 1)) == ("r1",)  # oldest first, limited
    assert await execute(store, o.PurgeRuns(1000.0, 10)) == ("r0", "r2")
    for run_id in ("r0", "r1", "r2"):
        assert await snapshot(store, run_id) == [(None, (), ())]
        assert await store.get_events(run_id) == ()
    assert [r.id for r in await store.list_runs()] == ["r3"]
    assert await store.get_waits("r3") != ()
    # The keys are free again: the same key makes a new run.
    assert await execute(store, enqueue("r9", key="k0", now=1001.0)) == \
        o.EnqueueOutcome("r9", created=True)
    # FIFO order survives the purge.
    await execute(store, enqueue("r10", now=1002.0))
    assert [c.run.id for c in await claim(store, now=1003.0)] == ["r9", "r10"]


# -- retry ----------------------------------------------------------------------------------
async def test_retry_requeues_a_failed_run_keeping_its_completed_steps(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.SaveStep(lease, step("0", "charge"), 11.0))
    await execute(store, o.SaveStep(lease, step("1", "ship", "failed", error=("E", "boom")),
                                    12.0))
    await execute(store, o.StartStep(lease, step("2", "mail", "running"), 12.5))
    await execute(store, o.FailRun(lease, "E", "boom", 13.0, "Traceback ..."))
    run = (await execute(store, o.RetryRun("r1", "2", "client-9", 20.0))).run
    assert (run.state, run.version, run.attempts, run.finished_at, run.error_type,
            run.error_traceback) == ("queued", "2", 1, None, None, None)
    assert [s.position for s in await store.get_steps("r1")] == ["0"]
    assert (await events(store, "r1"))[-1] == (
        20.0, "run.queued", 1, "client-9", None, None,
        "retried by client-9, re-pinned from version 1 to 2; 2 step(s) to run again, 1 kept")
    [again] = await claim(store, workflows=(("wf", "2"),), now=21.0)
    assert (again.run.attempts, again.run.lease_epoch) == (2, 2)
    assert [s.position for s in again.steps] == ["0"]


async def test_only_a_failed_run_can_be_retried(store: Store) -> None:
    lease = await claim_one(store, "r1")
    before = await snapshot(store, "r1")
    outcomes = await store.apply([o.RetryRun("r1", None, "c", 12.0),
                                  o.RetryRun("ghost", None, "c", 12.0)])
    assert [type(x).__name__ for x in outcomes] == ["RunNotRetryable", "RunNotFound"]
    assert "run r1 is running: only a failed run can be retried" in str(outcomes[0])
    assert await snapshot(store, "r1") == before
    await execute(store, o.CompleteRun(lease, "null", 13.0))
    with pytest.raises(AikiError, match="is completed"):
        await execute(store, o.RetryRun("r1", None, "c", 14.0))


# -- cancel ---------------------------------------------------------------------------------
async def test_cancelling_a_run_that_never_ran_ends_it_at_once(store: Store) -> None:
    await execute(store, enqueue("r1"))
    out = await execute(store, o.CancelRun("r1", "customer left", 60.0, "client-1", 5.0))
    assert out.cancelled and out.holder is None
    run = await store.get_run("r1")
    assert run is not None and out.run == run
    assert (run.state, run.error_type, run.error_message, run.finished_at,
            run.cancel_reason, run.cancel_requested_at) == (
        "cancelled", "RunCancelled", "customer left", 5.0, "customer left", 5.0)
    assert [e[1] for e in await events(store, "r1")] == [
        "run.queued", "cancel.requested", "run.cancelled"]
    assert await claim(store, now=6.0) == ()


async def test_cancelling_a_finished_run_changes_nothing_and_is_false(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.CompleteRun(lease, '"ok"', 11.0))
    before = await snapshot(store, "r1")
    assert await execute(store, o.CancelRun("r1", None, 60.0, "c", 12.0)) == \
        o.CancelOutcome(False, None, None)
    assert await snapshot(store, "r1") == before
    with pytest.raises(AikiError, match="no run with id 'ghost'"):
        await execute(store, o.CancelRun("ghost", None, 60.0, "c", 12.0))


async def test_a_cancel_revokes_the_lease_and_requeues_the_run_to_compensate(
        store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.SaveStep(lease, step("0", "charge"), 11.0))
    await execute(store, o.StartStep(lease, step("1", "ship", "running"), 12.0))
    out = await execute(store, o.CancelRun("r1", "abandoned", 60.0, "client-1", 13.0))
    assert (out.cancelled, out.holder) == (True, "w1")
    run = await store.get_run("r1")
    assert run is not None and out.run == run
    assert (run.state, run.lease_owner, run.lease_epoch, run.cancel_deadline) == (
        "queued", None, lease.epoch + 1, 73.0)
    # Every later write under the old lease is refused.
    outcomes = await store.apply([
        o.SaveStep(lease, step("1", "ship"), 14.0), o.StartStep(lease, step("2"), 14.0),
        o.CompleteRun(lease, "null", 14.0), o.Renew((lease,), 14.0, 30.0)])
    assert [type(x).__name__ for x in outcomes[:3]] == ["StaleLease"] * 3
    assert outcomes[3] == ("r1",)
    # A second cancel keeps the first one's reason and grace.
    assert await execute(store, o.CancelRun("r1", "other", 1.0, "c", 15.0)) == \
        o.CancelOutcome(True, None, None)
    [again] = await claim(store, now=16.0)
    assert again.run.cancel_reason == "abandoned" and again.run.lease_epoch == lease.epoch + 2
    # The compensation runs under the new lease; whatever the workflow ends with, the run
    # ends cancelled.
    await execute(store, o.SaveStep(again.lease, step("2", "refund"), 17.0))
    ended = await execute(store, o.CompleteRun(again.lease, '"returned anyway"', 18.0))
    assert (ended.state, ended.result, ended.error_type, ended.error_message) == (
        "cancelled", None, "RunCancelled", "abandoned")
    assert [e[1:4] for e in await events(store, "r1")][-5:] == [
        ("cancel.requested", 1, "client-1"), ("run.queued", 1, "client-1"),
        ("run.running", 2, "w1"), ("task.completed", 1, "w1"), ("run.cancelled", 2, "w1")]
    assert await store.next_due() is None


async def test_a_cancel_drops_a_waiting_runs_waits(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "sleep", "sleep", 99.0, 110.0),
                                     11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "sleep", "sleep", 110.0),), "zz",
                                   11.0))
    out = await execute(store, o.CancelRun("r1", None, 30.0, "c", 20.0))
    assert (out.cancelled, out.holder) == (True, None)
    run = await store.get_run("r1")
    assert run is not None and run.state == "queued"
    assert await store.get_waits("r1") == ()
    assert await store.next_due() == 50.0  # the grace period's end


async def test_a_cancel_with_no_grace_ends_a_running_run_at_once(store: Store) -> None:
    lease = await claim_one(store, "r1")
    out = await execute(store, o.CancelRun("r1", "now", 0.0, "c", 12.0))
    assert (out.cancelled, out.holder) == (True, "w1")
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_owner) == ("cancelled", None)
    assert run.lease_epoch > lease.epoch
    with pytest.raises(StaleLease):
        await execute(store, o.CompleteRun(lease, "null", 13.0))


async def test_a_paused_run_cancelled_stays_paused_until_resumed_or_its_grace_ends(
        store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.PauseRun("r1", "ops", 11.0))
    out = await execute(store, o.CancelRun("r1", "gone", 5.0, "c", 12.0))
    assert (out.cancelled, out.holder) == (True, "w1")  # its worker is told
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_owner, run.lease_epoch) == (
        "paused", None, lease.epoch + 1)
    assert await claim(store, now=13.0) == ()
    with pytest.raises(StaleLease):
        await execute(store, o.SaveStep(lease, step("0"), 13.0))
    # Resumed: it is queued to compensate; not resumed, the timer ends it at the grace's end.
    resumed = (await execute(store, o.ResumeRun("r1", "ops", 14.0))).run
    assert (resumed.state, resumed.cancel_reason) == ("queued", "gone")
    await execute(store, o.PauseRun("r1", "ops", 15.0))
    [ended] = await execute(store, o.EndCancels(17.0))
    assert (ended.state, ended.error_message) == ("cancelled", "gone")


async def test_the_timer_ends_a_cancel_whose_grace_period_is_over(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.CancelRun("r1", "late", 5.0, "c", 12.0))
    [again] = await claim(store, now=13.0)
    assert await execute(store, o.EndCancels(16.0)) == ()
    assert await store.next_due() == 17.0
    [ended] = await execute(store, o.EndCancels(17.0))
    run = await store.get_run("r1")
    assert ended == run
    assert run is not None and (run.state, run.error_message, run.lease_owner) == (
        "cancelled", "late", None)
    assert (await events(store, "r1"))[-1][1:] == (
        "run.cancelled", 2, None, None, None,
        "its grace period ended at 1970-01-01T00:00:17.000Z; reason: late")
    for old in (lease, again.lease):
        with pytest.raises(StaleLease):
            await execute(store, o.SaveStep(old, step("0"), 18.0))
    assert await store.next_due() is None


# -- pause, resume, fork ---------------------------------------------------------------------
async def test_a_queued_run_paused_is_not_claimed_until_resumed(store: Store) -> None:
    await execute(store, enqueue("r1"))
    paused = (await execute(store, o.PauseRun("r1", "client-7", 5.0))).run
    assert (paused.state, paused.lease_owner) == ("paused", None)
    assert await claim(store, now=6.0) == ()
    resumed = (await execute(store, o.ResumeRun("r1", "client-8", 7.0))).run
    assert (resumed.state, resumed.lease_epoch) == ("queued", 0)
    assert [c.run.id for c in await claim(store, now=8.0)] == ["r1"]
    assert (await events(store, "r1"))[1:3] == [
        (5.0, "run.paused", 0, "client-7", None, None, "paused by client-7"),
        (7.0, "run.queued", 0, "client-8", None, None, "resumed by client-8"),
    ]


async def test_a_running_run_paused_records_its_task_in_flight_and_starts_nothing(
    store: Store,
) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.StartStep(lease, step("0", "charge", "running"), 11.0))
    paused = (await execute(store, o.PauseRun("r1", "ops", 12.0))).run
    assert (paused.state, paused.lease_owner, paused.lease_epoch) == ("paused", "w1", 1)
    # The task in flight, and one whose start was never recorded, finish and are kept.
    await execute(store, o.SaveStep(lease, step("0", "charge"), 13.0))
    await execute(store, o.SaveStep(lease, step("1", "ship"), 13.5))
    assert await execute(store, o.Renew((lease,), 14.0, 30.0)) == ()  # still its lease
    before = await snapshot(store, "r1")
    refused = await store.apply([
        o.StartStep(lease, step("2", "mail", "running"), 14.0),
        o.SaveStep(lease, step("2", "now", kind="now"), 14.0),
        o.AwaitStep(lease, wait_step("2", "sleep", "sleep", 5.0, 19.0), 14.0),
        o.CompleteRun(lease, '"done"', 14.0),
        o.FailRun(lease, "E", "boom", 14.0),
    ])
    assert {type(x).__name__ for x in refused} == {"RunPaused"}
    assert all(isinstance(x, StaleLease) for x in refused)  # a worker stops writing
    assert "run r1 is paused: step 2 (mail) is refused until it is resumed" in str(refused[0])
    assert await snapshot(store, "r1") == before
    await execute(store, o.ReleaseRun(lease, 15.0, "paused"))
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_owner) == ("paused", None)
    assert await claim(store, now=16.0) == ()
    with pytest.raises(StaleLease):  # given back: its lease is no more
        await execute(store, o.SaveStep(lease, step("2", "mail"), 16.5))
    await execute(store, o.ResumeRun("r1", "ops", 17.0))
    [again] = await claim(store, now=18.0)
    assert [s.position for s in again.steps] == ["0", "1"]
    assert (again.run.attempts, again.run.lease_epoch) == (2, 2)
    assert [e[1] for e in await events(store, "r1")][-5:] == [
        "task.completed", "task.completed", "lease.released", "run.queued", "run.running"]


async def test_a_retrying_task_of_a_paused_run_does_not_start_its_next_attempt(
    store: Store,
) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.StartStep(lease, step("0", "charge", "running"), 11.0))
    await execute(store, o.PauseRun("r1", "ops", 12.0))
    retrying = step("0", "charge", "retrying", error=("E", "x"), next_attempt_at=13.0)
    await execute(store, o.SaveStep(lease, retrying, 12.5))
    await execute(store, o.SaveStep(lease, retrying, 12.6))  # the same write again: accepted
    with pytest.raises(StaleLease, match="attempt 2 of step 0 is refused"):
        await execute(store, o.SaveStep(lease, step("0", "charge", attempts=2), 14.0))


async def test_resuming_a_run_whose_worker_never_gave_it_back_runs_on_under_its_lease(
    store: Store,
) -> None:
    # Seed 129: the resume fenced the holder off and queued the run; another worker claimed
    # it and committed a task's result, and then the holder, whose start of that task was
    # committed before the pause and acknowledged late, ran the task (its lease still live
    # as far as it knew). No other worker may hold the run while that lease lives.
    lease = await claim_one(store, "r1", ttl=30.0)
    await execute(store, o.StartStep(lease, step("0", "charge", "running"), 10.5))
    await execute(store, o.PauseRun("r1", "ops", 11.0))
    resumed = (await execute(store, o.ResumeRun("r1", "ops", 12.0))).run
    assert (resumed.state, resumed.lease_owner, resumed.lease_epoch) == ("running", "w1", 1)
    assert await claim(store, "w2", now=13.0) == ()  # not another worker's
    assert (await events(store, "r1"))[-1] == (
        12.0, "run.running", 1, "ops", None, None,
        "resumed by ops; worker 'w1' still holds it: it runs on under lease epoch 1")
    await execute(store, o.SaveStep(lease, step("0", "charge"), 13.0))
    await execute(store, o.StartStep(lease, step("1", "ship", "running"), 13.5))
    # Given back at its next step boundary (its worker was told of the pause): queued.
    await execute(store, o.ReleaseRun(lease, 14.0, "given back paused"))
    [again] = await claim(store, "w2", now=15.0)
    assert (again.run.lease_epoch, [s.position for s in again.steps]) == (2, ["0", "1"])
    # A holder that never gives it back: its lease expires, and then another worker has it.
    await execute(store, o.PauseRun("r1", "ops", 16.0))
    await execute(store, o.ResumeRun("r1", "ops", 17.0))
    assert await execute(store, o.ExpireLeases(45.0)) == ("r1",)
    [third] = await claim(store, "w1", now=46.0)
    assert third.run.lease_epoch == 3


async def test_the_lease_of_a_paused_run_expires_and_the_run_stays_paused(store: Store) -> None:
    await claim_one(store, "r1", ttl=5.0)
    await execute(store, o.PauseRun("r1", "ops", 11.0))
    assert await store.next_due() == 15.0
    assert await execute(store, o.ExpireLeases(15.0)) == ("r1",)
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_owner) == ("paused", None)
    assert await store.next_due() is None
    assert (await events(store, "r1"))[-1][1:] == (
        "lease.expired", 1, "w1", None, None,
        "lease epoch 1 of worker 'w1' expired; the run stays paused")


async def test_a_run_paused_while_waiting_keeps_its_waits_and_does_not_wake(
    store: Store,
) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "event", "ok", 10.0, 21.0), 11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "ok", 21.0),), "waits", 11.0))
    await execute(store, o.PauseRun("r1", "ops", 12.0))
    assert [w.position for w in await store.get_waits("r1")] == ["0"]
    assert await store.next_due() is None  # its timeout does not fire while paused
    assert await execute(store, o.WakeDue(30.0)) == ()
    # Resumed before anything came: it waits again, for the same wait.
    waiting = (await execute(store, o.ResumeRun("r1", "ops", 13.0))).run
    assert waiting.state == "waiting"
    assert await store.next_due() == 21.0
    await execute(store, o.PauseRun("r1", "ops", 14.0))
    sent = await execute(store, o.SendEvent("r1", "ok", '"yes"', None, 15.0))
    assert sent == o.SendOutcome(delivered=False, duplicate=False)  # buffered
    assert (await store.get_run("r1")).state == "paused"  # type: ignore[union-attr]
    queued = (await execute(store, o.ResumeRun("r1", "ops", 16.0))).run
    assert queued.state == "queued" and await store.get_waits("r1") == ()
    assert (await events(store, "r1"))[-1][-1] == (
        "resumed by ops; woke at once: event 'ok' is waiting to be delivered")
    [again] = await claim(store, now=17.0)
    got = await execute(store, o.AwaitStep(again.lease, wait_step("0", "event", "ok", 10.0,
                                                                   21.0), 17.0))
    assert (got.state, got.output) == ("completed", '"yes"')


async def test_a_wait_that_came_due_while_paused_ends_on_resume(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, o.AwaitStep(lease, wait_step("0", "sleep", "sleep", 5.0, 16.0), 11.0))
    await execute(store, o.PauseRun("r1", "ops", 11.5))  # held: its worker gives it back
    await execute(store, o.WaitRun(lease, (WaitFor("0", "sleep", "sleep", 16.0),), "sleeps",
                                   12.0))
    run = await store.get_run("r1")
    assert run is not None and (run.state, run.lease_owner) == ("paused", None)
    assert [w.due_at for w in await store.get_waits("r1")] == [16.0]
    assert await execute(store, o.Wakeup("r1", 13.0)) is True  # ends the sleep, no waking
    assert (await store.get_run("r1")).state == "paused"  # type: ignore[union-attr]
    queued = (await execute(store, o.ResumeRun("r1", "ops", 20.0))).run
    assert queued.state == "queued"
    assert [(s.state, s.output) for s in await store.get_steps("r1")] == [("completed", "false")]


async def test_pause_and_resume_refuse_runs_where_they_make_no_sense(store: Store) -> None:
    lease = await claim_one(store, "r1")
    await execute(store, enqueue("r2"))
    before = await snapshot(store, "r1", "r2")
    outcomes = await store.apply([
        o.ResumeRun("r1", "c", 11.0), o.PauseRun("ghost", "c", 11.0),
        o.ResumeRun("ghost", "c", 11.0)])
    assert [type(x).__name__ for x in outcomes] == ["RunNotPaused", "RunNotFound", "RunNotFound"]
    assert str(outcomes[0]) == ("run r1 is running, not paused: there is nothing to resume; "
                                "nothing changed")
    assert await snapshot(store, "r1", "r2") == before
    await execute(store, o.PauseRun("r2", "c", 12.0))
    with pytest.raises(AikiError, match="run r2 is paused: only a queued, running or waiting"):
        await execute(store, o.PauseRun("r2", "c", 13.0))
    await execute(store, o.CompleteRun(lease, "null", 14.0))
    before = await snapshot(store, "r1")
    with pytest.raises(AikiError, match="run r1 is completed: only a queued"):
        await execute(store, o.PauseRun("r1", "c", 15.0))
    assert await snapshot(store, "r1") == before


async def fork_setup(store: Store) -> None:
    """r1 failed after steps 0, 1, 2.0.0 and 2.1.0 completed and step 3 failed."""
    lease = await claim_one(store, "r1")
    for position in ("0", "1", "2.1.0", "2.0.0"):
        await execute(store, o.SaveStep(lease, step(position, f"t{position}"), 11.0))
    await execute(store, o.SaveStep(lease, step("3", "t3", "failed", error=("E", "bug")), 12.0))
    await execute(store, o.FailRun(lease, "E", "bug", 13.0))


async def test_fork_copies_the_first_steps_into_a_new_run(store: Store) -> None:
    await fork_setup(store)
    made = await execute(store, o.ForkRun("r1", "f1", 3, "2", "client-3", 20.0))
    forked = made.run
    assert made.applied
    assert (forked.id, forked.state, forked.version, forked.payload, forked.forked_from,
            forked.forked_steps, forked.idempotency_key) == (
        "f1", "queued", "2", '{"n": 1}', "r1", 3, None)
    original = {s.position: s for s in await store.get_steps("r1")}
    copied = await store.get_steps("f1")
    assert [s.position for s in copied] == ["0", "1", "2.0.0"]
    assert all(s == original[s.position] for s in copied)
    assert await events(store, "f1") == [(
        20.0, "run.queued", 0, "client-3", None, None,
        "forked by client-3 from run r1 at step 3 (version 2); 3 step(s) copied")]
    assert (await events(store, "r1"))[-1] == (
        20.0, "fork.created", 1, "client-3", None, None,
        "forked by client-3 at step 3 into run f1")
    assert (await store.get_run("r1")).state == "failed"  # type: ignore[union-attr]
    # The same fork sent again (its reply lost) is that run; another under its id is not.
    again = await execute(store, o.ForkRun("r1", "f1", 3, "2", "client-3", 21.0))
    assert (again.run, again.applied) == (forked, False)
    # ... also when it comes twice in one transaction, at one time (a duplicated request).
    twice = await store.apply([o.ForkRun("r1", "f4", 1, None, "c", 22.0)] * 2)
    assert [(x.run.id, x.applied) for x in twice] == [("f4", True), ("f4", False)]
    with pytest.raises(AikiError, match="run id 'f1' is taken by another run"):
        await execute(store, o.ForkRun("r1", "f1", 2, None, "client-3", 21.0))
    [claimed] = await claim(store, workflows=(("wf", "2"),), now=22.0)
    assert [s.position for s in claimed.steps] == ["0", "1", "2.0.0"]
    whole = (await execute(store, o.ForkRun("r1", "f2", 5, None, "c", 23.0))).run
    assert (whole.version, len(await store.get_steps("f2"))) == ("1", 5)
    fresh = (await execute(store, o.ForkRun("r1", "f3", 0, None, "c", 23.0))).run
    assert await store.get_steps("f3") == ()
    assert fresh.forked_steps == 0
    assert [r.id for r in await store.list_runs()] == ["f3", "f2", "f4", "f1", "r1"]


async def test_a_fork_past_the_history_or_of_an_unfinished_step_is_refused(
    store: Store,
) -> None:
    await fork_setup(store)
    lease = await claim_one(store, "r2")
    await execute(store, o.SaveStep(lease, step("0", "a"), 11.0))
    await execute(store, o.StartStep(lease, step("1", "b", "running"), 11.0))
    before = await snapshot(store, "r1", "r2", "f1")
    outcomes = await store.apply([
        o.ForkRun("r1", "f1", 6, None, "c", 20.0), o.ForkRun("r1", "f1", -1, None, "c", 20.0),
        o.ForkRun("r2", "f1", 2, None, "c", 20.0), o.ForkRun("ghost", "f1", 0, None, "c", 20.0)])
    assert [type(x).__name__ for x in outcomes] == [
        "InvalidFork", "InvalidFork", "InvalidFork", "RunNotFound"]
    assert str(outcomes[0]) == ("run r1 has 5 step(s): from_step must be 0 to 5, got 6; "
                                "nothing was stored")
    assert str(outcomes[2]) == ("run r2: step 1 (b) is running, not finished: fork from at "
                                "most step 1; nothing was stored")
    assert await snapshot(store, "r1", "r2", "f1") == before
    assert (await execute(store, o.ForkRun("r2", "f1", 1, None, "c", 20.0))).run.state == "queued"


async def test_a_control_sent_again_is_answered_as_done(store: Store) -> None:
    """The same request (its ``control_id``) again, its reply lost: the run as it is, no
    refusal and no second history event; another request is refused as usual."""
    await execute(store, enqueue("r1"))
    paused = await execute(store, o.PauseRun("r1", "c", 5.0, "id-1"))
    assert (paused.run.control_id, paused.applied) == ("pause:id-1", True)
    again = await execute(store, o.PauseRun("r1", "c", 6.0, "id-1"))
    assert (again.run, again.applied) == (paused.run, False)
    with pytest.raises(AikiError, match="is paused"):
        await execute(store, o.PauseRun("r1", "c", 6.0, "id-2"))
    resumed = await execute(store, o.ResumeRun("r1", "c", 7.0, "id-3"))
    again = await execute(store, o.ResumeRun("r1", "c", 8.0, "id-3"))
    assert (resumed.applied, again.run, again.applied) == (True, resumed.run, False)
    # Twice in one transaction, at one time (a duplicated request): applied once.
    twice = await store.apply([o.PauseRun("r1", "c", 8.5, "id-6")] * 2)
    assert [x.applied for x in twice] == [True, False]
    await execute(store, o.ResumeRun("r1", "c", 8.5, "id-7"))
    assert [e[1] for e in await events(store, "r1")] == [
        "run.queued", "run.paused", "run.queued", "run.paused", "run.queued"]
    [claimed] = await claim(store, now=9.0)
    await execute(store, o.FailRun(claimed.lease, "E", "boom", 10.0))
    retried = await execute(store, o.RetryRun("r1", None, "c", 11.0, "id-4"))
    assert (retried.run.control_id, retried.applied) == ("retry:id-4", True)
    again = await execute(store, o.RetryRun("r1", None, "c", 12.0, "id-4"))
    assert (again.run, again.applied) == (retried.run, False)
    with pytest.raises(AikiError, match="only a failed run can be retried"):
        await execute(store, o.RetryRun("r1", None, "c", 12.0, "id-5"))


async def test_resume_delivers_an_event_sent_before_its_wait_came_due(store: Store) -> None:
    lease = await claim_one(store, "r1")
    for position, due in (("0", 20.0), ("1", 20.0)):
        await execute(store, o.AwaitStep(lease, wait_step(position, "event", f"e{position}",
                                                          9.0, due), 11.0))
    await execute(store, o.WaitRun(lease, (WaitFor("0", "event", "e0", 20.0),
                                           WaitFor("1", "event", "e1", 20.0)), "waits", 11.0))
    await execute(store, o.PauseRun("r1", "c", 12.0))
    await execute(store, o.SendEvent("r1", "e0", '"early"', None, 15.0))  # before its due
    await execute(store, o.SendEvent("r1", "e1", '"late"', None, 25.0))  # after its due
    await execute(store, o.ResumeRun("r1", "c", 30.0))
    steps = {s.position: s for s in await store.get_steps("r1")}
    assert steps["0"].state == "running"  # its event is delivered when the run gets there
    assert (steps["1"].state, steps["1"].error_type) == ("failed", "EventTimeout")
    history = [e[1] for e in await events(store, "r1")]
    assert history[-2:] == ["run.queued", "event.timed_out"]  # the resume comes first
