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
