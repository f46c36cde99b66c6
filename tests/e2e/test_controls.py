"""Run controls end to end, on every store, in virtual time: pause, resume and fork."""

from __future__ import annotations

import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.actors.worker import Worker
from aiki.store import Store

started: list[str] = []
gates: dict[str, trio.Event] = {}


@aiki.task(name="slow")
async def slow(what: str) -> str:
    started.append(what)
    await gates[what].wait()
    return what


@aiki.task(name="quick")
async def quick(what: str) -> str:
    started.append(what)
    return what


@aiki.workflow(name="pausable", version="1")
async def pausable(run: aiki.WorkflowRun, tag: str) -> str:
    first = await slow.run(run, f"{tag}-a")
    second = await quick.run(run, f"{tag}-b")
    return first + "+" + second


approved = aiki.event("approved", bool)


@aiki.workflow(name="approval", version="1", events=[approved])
async def approval(run: aiki.WorkflowRun, tag: str) -> str:
    await quick.run(run, f"{tag}-asked")
    ok = await approved.wait(run, timeout=3600)
    return f"{tag}: {'yes' if ok else 'no'}"


async def wait_until(check: object, what: str, limit: float = 60) -> None:
    with trio.fail_after(limit):
        while not await check():  # type: ignore[operator]
            await trio.sleep(0.1)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    started.clear()
    gates.clear()


@pytest.mark.parametrize("told", [True, False], ids=["told", "missed-the-push"])
async def test_pause_lets_the_task_in_flight_finish_and_starts_nothing_until_resumed(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources, told: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not told:  # the worker never hears of the pause: the store's refusal stops it
        real = Worker._on_push
        monkeypatch.setattr(Worker, "_on_push", lambda self, msg: None if isinstance(
            msg, p.RunControl) else real(self, msg))
    gates["p-a"] = trio.Event()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[pausable]) as worker:
            handle = await pausable.enqueue(client, "p")

            async def in_flight() -> bool:
                return started == ["p-a"]

            await wait_until(in_flight, "the slow task to start")
            await handle.pause()
            assert (await handle.status()).state == "paused"
            assert handle.id in worker.held  # its task is still running
            gates["p-a"].set()

            async def given_back() -> bool:
                return handle.id not in worker.held

            await wait_until(given_back, "the worker to give the run back")
            await trio.sleep(30)  # long enough for anything that would start to start
            status = await handle.status()
            assert status.state == "paused"
            assert [(t.name, t.state) for t in status.tasks] == [("slow", "completed")]
            assert started == ["p-a"]  # the next step did not start
            assert [w.in_use for w in await client.list_workers()] == [0]  # its slot is free
            with pytest.raises(aiki.RunNotPausable, match="is paused"):
                await handle.pause()
            await handle.resume()
            assert await handle.wait_for_completion(timeout=60) == "p-a+p-b"
            history = await handle.history()
    assert started == ["p-a", "p-b"]  # the slow task did not run again
    paused = next(e for e in history if e.event == "run.paused")
    assert paused.worker_id is not None and paused.worker_id.startswith("client-")
    assert paused.detail is not None and paused.detail.startswith(f"paused by {paused.worker_id}")
    resumed = next(e for e in history if e.detail and e.detail.startswith("resumed by"))
    assert resumed.event == "run.queued" and resumed.at >= paused.at
    assert [e.event for e in history].count("lease.released") == 1
    refused = [e for e in history if e.event == "task.running" and e.at > paused.at
               and e.at < resumed.at]
    assert refused == []  # refused or never asked: no step started while paused


async def test_a_run_paused_while_waiting_keeps_its_wait_and_buffers_events(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[approval]) as worker:
            handle = await approval.enqueue(client, "w")

            async def waiting() -> bool:
                return (await handle.status()).state == "waiting"

            await wait_until(waiting, "the run to wait")
            await handle.pause()
            status = await handle.status()
            assert status.state == "paused"
            assert [(w.kind, w.name) for w in status.waits] == [("event", "approved")]
            assert await handle.send(approved, True) is False  # buffered, not delivered
            await trio.sleep(7200)  # past its timeout: a paused run does not wake
            assert (await handle.status()).state == "paused"
            assert not worker.held
            await handle.resume()
            # The event came while it was paused: it is delivered, not timed out.
            assert await handle.wait_for_completion(timeout=60) == "w: yes"
    assert started == ["w-asked"]


async def test_a_paused_waiting_run_resumed_before_anything_came_waits_again(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[approval]):
            handle = await approval.enqueue(client, "r")

            async def waiting() -> bool:
                return (await handle.status()).state == "waiting"

            await wait_until(waiting, "the run to wait")
            await handle.pause()
            await trio.sleep(60)
            await handle.resume()
            assert (await handle.status()).state == "waiting"
            with pytest.raises(aiki.RunNotPaused, match="is waiting, not paused"):
                await handle.resume()
            await handle.send(approved, False)
            assert await handle.wait_for_completion(timeout=60) == "r: no"
            with pytest.raises(aiki.RunNotPausable, match="is completed"):
                await handle.pause()
            with pytest.raises(aiki.RunNotFound):
                await client.handle("ghost").pause()


counted: list[str] = []


@aiki.task(name="step", retry=aiki.Retry.none())
async def count_step(what: str) -> str:
    counted.append(what)
    if what == "boom":
        raise ValueError("a bug at the third step")
    return what


@aiki.workflow(name="three", version="1")
async def three_v1(run: aiki.WorkflowRun, tag: str) -> list[str]:
    return [await count_step.run(run, f"{tag}-1"), await count_step.run(run, f"{tag}-2"),
            await count_step.run(run, "boom")]


@aiki.workflow(name="three", version="2")
async def three_v2(run: aiki.WorkflowRun, tag: str) -> list[str]:
    return [await count_step.run(run, f"{tag}-1"), await count_step.run(run, f"{tag}-2"),
            await count_step.run(run, f"{tag}-3")]


async def test_fork_copies_the_first_steps_and_runs_the_rest_fresh(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    counted.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[three_v1, three_v2]):
            original = await three_v1.enqueue(client, "f")
            with pytest.raises(aiki.WorkflowFailed, match="a bug at the third step"):
                await original.wait_for_completion(timeout=60)
            with pytest.raises(aiki.InvalidFork, match="from_step must be 0 to 3, got 4"):
                await client.fork(original.id, from_step=4)
            with pytest.raises(aiki.InvalidFork, match="0 or more"):
                await client.fork(original.id, from_step=-1)
            with pytest.raises(TypeError, match="from_step must be an int"):
                await client.fork(original.id, from_step="2")  # type: ignore[arg-type]
            fork = await client.fork(original.id, from_step=2, version="2")
            assert await fork.wait_for_completion(timeout=60) == ["f-1", "f-2", "f-3"]
            status = await fork.status()
            history = await fork.history()
            original_history = await original.history()
            assert (await original.status()).state == "failed"  # the original is untouched
    assert counted == ["f-1", "f-2", "boom", "f-3"]  # the copied steps did not run again
    assert (status.forked_from, status.forked_steps, status.version) == (original.id, 2, "2")
    assert history[0].detail is not None and history[0].detail.startswith(
        f"forked by {history[0].worker_id} from run {original.id} at step 2")
    assert original_history[-1].event == "fork.created"
