"""Task starts: recorded before the task runs by default; with ``record_start_after``, only
once an attempt outlives it.

Deferred, a short task costs one write, its outcome; a long one shows as running while it
runs; a start record that finds the lease gone stops the attempt and writes nothing more.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

import aiki
from aiki import protocol as p
from aiki.actors.run import Abandon, RunState
from aiki.actors.worker import Worker
from aiki.errors import StaleLease
from aiki.records import Lease, StepRecord
from aiki.retry import Retry
from aiki.sources import Sources
from aiki.store import Store
from aiki.transport.memory import MemoryTransport

long_started = trio.Event()


@aiki.task(name="quick")
async def quick(x: int) -> int:
    return x + 1


@aiki.task(name="long")
async def long(x: int) -> int:
    long_started.set()
    await trio.sleep(10)
    return x * 2


@aiki.workflow(name="short-and-long", version="1")
async def short_and_long(run: aiki.WorkflowRun, x: int) -> int:
    return await long.run(run, await quick.run(run, x))


async def test_deferred_a_quick_task_is_written_once_and_a_long_one_shows_as_running(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    global long_started
    long_started = trio.Event()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[short_and_long], record_start_after=0.05):
            handle = await short_and_long.enqueue(client, 1)
            await long_started.wait()
            await trio.sleep(1)
            during = await handle.status()
            assert await handle.wait_for_completion(timeout=60) == 4
            history = await handle.history()
    assert [(t.name, t.state, t.attempts) for t in during.tasks] == [
        ("quick", "completed", 1), ("long", "running", 1),
    ]
    events = [(e.event, e.name) for e in history if e.event.startswith("task.")]
    assert events == [
        ("task.completed", "quick"), ("task.running", "long"), ("task.completed", "long"),
    ]


async def test_by_default_every_start_is_recorded_before_the_task_runs(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[short_and_long]):
            handle = await short_and_long.enqueue(client, 1)
            assert await handle.wait_for_completion(timeout=60) == 4
            history = await handle.history()
    events = [(e.event, e.name) for e in history if e.event.startswith("task.")]
    assert events == [
        ("task.running", "quick"), ("task.completed", "quick"),
        ("task.running", "long"), ("task.completed", "long"),
    ]


class _Long:
    name = "long"
    retry = Retry.fixed(1, 0.0)
    payload_type = int
    result_type = int

    def __init__(self) -> None:
        self.cancelled = False

    async def call(self, payload: Any) -> Any:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            self.cancelled = True
            raise
        return payload


async def test_a_start_record_refused_as_stale_stops_the_attempt_and_writes_nothing_more(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    sent: list[str] = []

    async def persist(make: Any) -> None:
        sent.append(type(make(1)).__name__)
        raise StaleLease("run r1: lease epoch 1 is stale; the run is at epoch 2")

    state = RunState(Lease("r1", 1, "w1"), {}, persist, sources, 10.0, 0.05)
    task = _Long()
    step = StepRecord("0", "task", "long", "h", "7", None, "running", 1)
    try:
        await state._call(task, step)
    except Abandon as exc:
        assert "stale" in str(exc)
    else:
        raise AssertionError("the attempt went on after its lease was refused")
    assert task.cancelled
    assert sent == ["StartStep"]


ran: list[int] = []


@aiki.task(name="effect")
async def effect(x: int) -> int:
    ran.append(x)
    return x


@aiki.workflow(name="one-effect", version="1")
async def one_effect(run: aiki.WorkflowRun, x: int) -> int:
    return await effect.run(run, x)


async def _late_assign_after_completion(
    engine_store: Store, sources: aiki.Sources, record_start_after: float,
) -> list[int]:
    """A run completes; then the assignment of its first lease, held up in the network
    until now, reaches a worker. What does that worker run?"""
    ran.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[one_effect], id="first"):
            handle = await one_effect.enqueue(client, 5)
            assert await handle.wait_for_completion(timeout=60) == 5
        done = await engine_store.get_run(handle.id)
        assert done is not None and done.state == "completed"
        late = attrs.evolve(done, state="running", lease_owner="late", finished_at=None)
        async with aiki.worker(client, workflows=[one_effect], id="late",
                               record_start_after=record_start_after) as w:
            w._on_push(p.Assign(late, ()))  # the stale lease: epoch 1, long replaced
            await trio.sleep(5)
        assert (await engine_store.get_run(handle.id)) == done  # nothing stored changed
    return ran


async def test_a_late_assignment_runs_nothing_when_starts_are_fenced(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    assert await _late_assign_after_completion(engine_store, sources, 0) == [5]  # first only


async def test_deferred_starts_trade_that_for_at_least_once(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    # The documented trade: the late worker runs the task again; its result is refused.
    assert await _late_assign_after_completion(engine_store, sources, 0.05) == [5, 5]


async def test_a_draining_worker_offers_no_slots_when_it_reconnects() -> None:
    worker = Worker(MemoryTransport(), "srv", [], "w", Sources.seeded(1),
                    max_concurrent_runs=4)
    assert worker._hello(1).slots == 4
    worker.draining.set()
    assert worker._hello(2).slots == 0
