"""Task outcomes that ride with the run's next write (aiki.actors.outcomes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.actors.outcomes import DEFAULT_BOUND, Flusher
from aiki.actors.run import Abandon, run_workflow
from aiki.errors import RunPaused, StaleLease
from aiki.records import RunRecord
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store.ops import Op


@aiki.task(name="inc")
async def inc(x: int) -> int:
    return x + 1


@aiki.workflow(name="three", version="1")
async def three(run: aiki.WorkflowRun, x: int) -> int:
    for _ in range(3):
        x = await inc.run(run, x)
    return x


@aiki.workflow(name="then-think", version="1")
async def then_think(run: aiki.WorkflowRun, x: int) -> int:
    x = await inc.run(run, x)
    await trio.sleep(5.0)  # a long stretch of workflow code: no next write comes soon
    return x


@aiki.workflow(name="then-sleep", version="1")
async def then_sleep(run: aiki.WorkflowRun, x: int) -> int:
    x = await inc.run(run, x)
    await run.sleep(3600)
    return x


def leased(workflow: str) -> RunRecord:
    return RunRecord("r1", workflow, "1", "0", "running", None, 1, 1, "w1", 1e9, None, None,
                     None, 0.0, 0.0, None)


def shown(msg: Any) -> str:
    """A written message as the test reads it: its type, its step, what it carries."""
    step = getattr(msg, "step", None)
    head = type(msg).__name__ + (f" {step.position} {step.state}" if step else "")
    saved = getattr(msg, "saved", ())
    return head + (f" +{[f'{s.position} {s.state}' for s in saved]}" if saved else "")


def recorder(react: Any = None) -> tuple[list[str], Any]:
    """A persist function that writes down each message it is given (``shown``) and answers
    Ok, or what ``react(msg)`` returns (it may also wait, or raise)."""
    written: list[str] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        written.append(shown(msg))
        answer = None if react is None else await react(msg)
        return p.Ok(1) if answer is None else answer

    return written, persist


async def drive(workflow: Any, persist: Any) -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve)
        try:
            await run_workflow(workflow, p.Assign(leased(workflow.name), ()), persist,
                               Sources.seeded(1), flusher=flusher)
        except Abandon:  # as the Worker does: the run is left to its lease
            pass
        nursery.cancel_scope.cancel()


async def test_each_outcome_rides_with_the_next_write(autojump_clock: trio.abc.Clock) -> None:
    written, persist = recorder()
    await drive(three, persist)
    assert written == [
        "StartStep 0 running",
        "StartStep 1 running +['0 completed']",
        "StartStep 2 running +['1 completed']",
        "CompleteRun +['2 completed']",
    ]


async def test_an_outcome_with_no_ride_is_sent_alone_within_the_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    written: list[tuple[float, str]] = []

    async def persist(make: Any) -> Any:
        written.append((trio.current_time(), shown(make(1))))
        return p.Ok(1)

    start = trio.current_time()
    await drive(then_think, persist)
    assert [w for _, w in written] == [
        "StartStep 0 running", "SaveStep 0 completed", "CompleteRun"]
    assert written[1][0] - start == pytest.approx(DEFAULT_BOUND)


async def test_a_write_that_cannot_carry_outcomes_sends_them_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def react(msg: Any) -> Any:
        return p.StepResult(1, msg.step) if isinstance(msg, p.AwaitStep) else None

    written, persist = recorder(react)
    await drive(then_sleep, persist)
    assert written[:3] == ["StartStep 0 running", "SaveStep 0 completed",
                           "AwaitStep 1 running"]


async def test_an_outcome_the_flusher_could_not_send_stops_the_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The lease is gone when the lone outcome goes: nothing may be written after it.
    async def react(msg: Any) -> None:
        if isinstance(msg, p.SaveStep):
            raise StaleLease("run r1: lease epoch 1 of worker 'w1' is stale")

    written, persist = recorder(react)
    await drive(then_think, persist)
    assert written == ["StartStep 0 running", "SaveStep 0 completed"]


class Batches(MemoryStore):
    """A memory store that remembers the ops of each transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.batches.append([type(op).__name__ for op in ops])
        return await super().apply(ops)


async def test_a_run_of_three_tasks_costs_five_transactions(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With a worker slot free, the enqueue and its claim are one transaction; then each
    task's start carries the outcome before it, and the completion the last one."""
    store = Batches()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[three]):
            handle = await three.enqueue(client, 0)
            assert await handle.wait_for_completion(timeout=60) == 3
    run_batches = store.batches[store.batches.index(["Enqueue", "Claim"]):]
    # The worker's stop may give back the lease before its run actor hears that the
    # completion committed (the client heard first): not the run's cost, and refused.
    if run_batches[-1] == ["ReleaseRun"]:
        run_batches.pop()
    assert run_batches == [
        ["Enqueue", "Claim"], ["StartStep"], ["SaveStep", "StartStep"],
        ["SaveStep", "StartStep"], ["SaveStep", "CompleteRun"],
    ]
    steps = await store.get_steps(handle.id)
    assert [(s.position, s.state, s.output) for s in steps] == [
        ("0", "completed", "1"), ("1", "completed", "2"), ("2", "completed", "3")]


async def test_runs_one_after_another_each_cost_five_transactions(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client that enqueues its next run as soon as it hears that the last one ended
    finds the worker's slot free and claims it in the enqueue's own commit. (The slot used
    to be freed when the session that asked for the end told the Dispatcher, after the
    commit in a task of its own: in about half of the runs, whichever of the two Trio
    scheduled first, the enqueue found the slot taken and cost a commit more.)"""
    store = Batches()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[three], max_concurrent_runs=1):
            await (await three.enqueue(client, 0)).wait_for_completion(timeout=60)
            store.batches.clear()
            for x in range(1, 13):
                assert await (await three.enqueue(client, x)).wait_for_completion(
                    timeout=60) == x + 3
            batches = list(store.batches)
    assert [b for b in batches if "Enqueue" in b] == [["Enqueue", "Claim"]] * 12
    assert len(batches) == 12 * 5


async def test_an_enqueue_with_no_slot_free_is_claimed_once_one_frees(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Batches()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[three, then_think], max_concurrent_runs=1):
            busy = await then_think.enqueue(client, 0)  # holds the one slot for 5 s
            await trio.sleep(1.0)
            store.batches.clear()
            handle = await three.enqueue(client, 10)
            assert store.batches == [["Enqueue"]]  # no claim: no slot free
            assert await handle.wait_for_completion(timeout=60) == 13
            assert await busy.wait_for_completion(timeout=60) == 1
    assert ["Claim"] in store.batches


class HeldBatches(Batches):
    """Batches whose apply waits while ``held`` is set: the StoreWriter stays busy."""

    def __init__(self) -> None:
        super().__init__()
        self.held: trio.Event | None = None

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        if self.held is not None:
            await self.held.wait()
        return await super().apply(ops)


async def test_an_enqueue_claims_its_slot_only_while_the_writer_is_idle(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While a batch is being applied, enqueues wait to be batched together, and the
    Dispatcher's next claim takes their runs in one statement: no claim rides with each."""
    store = HeldBatches()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[three, then_think]):
            await (await three.enqueue(client, 0)).wait_for_completion(timeout=60)
            store.held = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(then_think.enqueue, client, 0)  # its batch is held
                await trio.sleep(0.1)
                store.batches.clear()
                handles: list[Any] = []

                async def enqueue(x: int) -> None:
                    handles.append(await three.enqueue(client, x))

                for x in (10, 20):
                    nursery.start_soon(enqueue, x)
                await trio.sleep(0.1)
                held, store.held = store.held, None
                held.set()
            assert sorted([await h.wait_for_completion(timeout=60) for h in handles]) == [13, 23]
    # (A batch is noted once applied.) The held enqueue found the writer idle and claimed
    # its slot; the two behind it came in one batch, claimed after it by the Dispatcher (the
    # first run's task start may ride with that claim).
    assert store.batches[:2] == [["Enqueue", "Claim"], ["Enqueue", "Enqueue"]]
    assert store.batches[2].count("Claim") == 1
    assert set(store.batches[2]) <= {"Claim", "StartStep"}


async def test_an_outcome_riding_with_a_slow_lone_write_rides_again_with_the_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The Flusher sends the outcome alone (no next step came in time) and that write is slow;
    # the run ends meanwhile. Its completion must carry the outcome too, or it may commit
    # first and leave the step running under a completed run (simulation seeds 52, 90, 113).
    async def react(msg: Any) -> None:
        if isinstance(msg, p.SaveStep):
            await trio.sleep(30.0)  # held up in the network

    written, persist = recorder(react)
    await drive(then_think, persist)
    assert written == ["StartStep 0 running", "SaveStep 0 completed",
                       "CompleteRun +['0 completed']"]


async def test_a_wait_refused_as_paused_gives_the_run_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Paused between the wait's step and the wait itself (its worker missed the word): the
    # wait's write is refused, and the run is given back at that boundary, as a refused
    # completion is. The refusal escaped and took the worker down (simulation seed 12 with
    # issue 11's workload).
    async def react(msg: Any) -> Any:
        if isinstance(msg, p.AwaitStep):
            return p.StepResult(msg.req, msg.step)  # recorded, waiting
        if isinstance(msg, p.WaitRun):
            raise RunPaused("run r1 is paused: waiting is refused until it is resumed")
        return None

    written, persist = recorder(react)
    await drive(then_sleep, persist)
    assert written[-2:] == ["WaitRun", "ReleaseRun"]


async def test_an_outcome_the_flusher_sent_while_paused_rides_with_the_end_once_resumed(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The Flusher sends the outcome alone while a client has paused the run: refused. The
    # run is resumed before its next write, which is accepted: it must carry the outcome,
    # or the run ends on a result never committed (simulation seed 5156).
    async def react(msg: Any) -> None:
        if isinstance(msg, p.SaveStep):
            raise RunPaused("run r1 is paused: attempt 1 of step 0 is refused")

    written, persist = recorder(react)
    await drive(then_think, persist)
    assert written == ["StartStep 0 running", "SaveStep 0 completed",
                       "CompleteRun +['0 completed']"]


async def test_a_paused_run_is_given_back_without_the_outcomes_refused_as_paused(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Still paused at the run's next write: the outcome refused with the Flusher's write is
    # refused again, first, and the run is given back without it (it runs again once the
    # run is resumed and replays): the give-back itself is not lost behind it.
    async def react(msg: Any) -> None:
        if isinstance(msg, (p.SaveStep, p.CompleteRun)):
            raise RunPaused("run r1 is paused")

    written, persist = recorder(react)
    await drive(then_think, persist)
    assert written == ["StartStep 0 running", "SaveStep 0 completed",
                       "CompleteRun +['0 completed']", "SaveStep 0 completed", "ReleaseRun"]
