"""Fencing: a worker whose lease expired (heartbeats cut off) cannot overwrite its replacement."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

import aiki
from aiki.actors.worker import Worker
from aiki.store import Store

executions: Counter[str] = Counter()
started = trio.Event()


@aiki.task(name="slow-charge")
async def slow_charge(x: int) -> str:
    executions["n"] += 1
    n = executions["n"]
    started.set()
    if n == 1:
        await trio.sleep(100)  # the cut-off worker finishes late, long after its lease
    return f"execution {n}"


@aiki.workflow(name="fenced", version="1")
async def fenced(run: aiki.WorkflowRun, x: int) -> str:
    return await slow_charge.run(run, x)


async def test_late_writes_from_an_expired_lease_are_rejected(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global started
    started = trio.Event()
    executions.clear()
    real_heartbeat = Worker._heartbeat

    async def partitioned(self: Worker, link: object) -> None:
        if self.id == "cut-off":
            await trio.sleep_forever()  # its heartbeats never reach the server
        await real_heartbeat(self, link)  # type: ignore[arg-type]

    real_on_push = Worker._on_push

    def deaf(self: Worker, msg: object) -> None:
        if self.id == "cut-off" and self.runs_started >= 1:
            return  # the partition drops what the server sends it, too
        real_on_push(self, msg)

    monkeypatch.setattr(Worker, "_heartbeat", partitioned)
    monkeypatch.setattr(Worker, "_on_push", deaf)
    async with aiki.embedded(engine_store, lease_ttl=10, sources=sources) as client:
        handle = await fenced.enqueue(client, 1)
        async with aiki.worker(client, workflows=[fenced], id="cut-off"):
            await started.wait()
            async with aiki.worker(client, workflows=[fenced], id="replacement"):
                assert await handle.wait_for_completion(timeout=60) == "execution 2"
                await trio.sleep(200)  # the cut-off worker's task ends and tries to write
        history = await handle.history()
        steps = await engine_store.get_steps(handle.id)
        run = await engine_store.get_run(handle.id)

    assert run is not None and run.state == "completed" and run.result == '"execution 2"'
    assert [s.output for s in steps] == ['"execution 2"']
    assert executions["n"] == 2
    completions = [e for e in history if e.event in ("task.completed", "run.completed")]
    assert {e.worker_id for e in completions} == {"replacement"}
    assert not [e for e in history if e.worker_id == "cut-off" and e.event != "run.running"
                and e.event != "task.running" and "expired" not in (e.detail or "")]


class BlinkingStore:
    """Refuses the first ``failures`` step writes with StoreUnavailable (the database blinked)."""

    def __init__(self, inner: Store, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def apply(self, ops: list[object]) -> list[object]:
        from aiki.errors import StoreUnavailable
        from aiki.store import ops as o

        if self.failures and any(isinstance(op, (o.StartStep, o.SaveStep)) for op in ops):
            self.failures -= 1
            raise StoreUnavailable("database is restarting")
        return await self.inner.apply(ops)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@aiki.task(name="plain")
async def plain(x: int) -> int:
    return x * 2


@aiki.workflow(name="blinks", version="1")
async def blinks(run: aiki.WorkflowRun, x: int) -> int:
    return await plain.run(run, await plain.run(run, x))


async def test_a_store_that_blinks_during_step_writes_does_not_fail_the_run(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    # Found by the simulation (seed 1): StoreUnavailable on a step write reached workflow
    # code and failed the run, where the fault-free run completed.
    store = BlinkingStore(engine_store, failures=4)
    async with aiki.embedded(store, sources=sources) as client:  # type: ignore[arg-type]
        async with aiki.worker(client, workflows=[blinks]):
            handle = await blinks.enqueue(client, 5)
            assert await handle.wait_for_completion(timeout=60) == 20
    assert store.failures == 0


counted: Counter[str] = Counter()


@aiki.task(name="counted")
async def counted_task(x: int) -> int:
    counted[str(x)] += 1
    await trio.sleep(1)
    return x + 1


@aiki.workflow(name="twice-assigned", version="1")
async def twice_assigned(run: aiki.WorkflowRun, x: int) -> int:
    return await counted_task.run(run, await counted_task.run(run, x))


async def test_a_duplicated_assignment_runs_one_actor(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by the simulation (seed 3): the network delivered an Assign twice, a second Run
    # actor replayed from the stale snapshot and its StepConflict failed the run.
    from aiki import protocol
    from aiki.actors.session import Session

    real_push = Session._push

    def push_twice(self: Session, msg: object) -> bool:
        if isinstance(msg, protocol.Assign):
            real_push(self, msg)
        return real_push(self, msg)

    monkeypatch.setattr(Session, "_push", push_twice)
    counted.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[twice_assigned]):
            handle = await twice_assigned.enqueue(client, 1)
            assert await handle.wait_for_completion(timeout=60) == 3
    assert counted == {"1": 1, "2": 1}
