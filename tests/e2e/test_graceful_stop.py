"""Leaving ``aiki.worker`` normally hands its runs back at once: the server hears that the
worker is going before the runs come back, so it does not give them straight back to it."""

from __future__ import annotations

import trio

import aiki
from aiki.store import Store

entered = trio.Event()


@aiki.task(name="slow-step")
async def slow_step(x: int) -> int:
    entered.set()
    await trio.sleep(100)
    return x


@aiki.workflow(name="handed-back", version="1")
async def handed_back(run: aiki.WorkflowRun, x: int) -> int:
    return await slow_step.run(run, x)


async def test_a_run_released_by_a_leaving_worker_is_not_reassigned_to_it(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    global entered
    entered = trio.Event()
    async with aiki.embedded(engine_store, sources=sources, lease_ttl=30) as client:
        async with aiki.worker(client, workflows=[handed_back], id="leaving"):
            handle = await handed_back.enqueue(client, 7)
            await entered.wait()
        released_at = trio.current_time()
        async with aiki.worker(client, workflows=[handed_back], id="staying"):
            assert await handle.wait_for_completion(timeout=300) == 7
            finished_at = trio.current_time()
        history = await handle.history()
    # It resumed at once (the slow step takes 100 s), not after a 30 s lease.
    assert finished_at - released_at < 100 + 5
    owners = [e.worker_id for e in history if e.event == "run.running"]
    assert owners == ["leaving", "staying"]
