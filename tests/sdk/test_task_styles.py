"""Tasks in every style: Trio ``async def``, a plain ``def`` (a worker thread) and an asyncio
coroutine (``loop="asyncio"``, through trio-asyncio). The same retries, idempotency keys and
checkpoints in each, and a worker killed mid-task resumes on another in each."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest
import trio
import trio.testing

import aiki
from aiki.store import MemoryStore

STYLES = ["trio", "thread", "asyncio"]
executed: Counter[str] = Counter()


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(style: str) -> trio.abc.Clock | None:
    """Virtual time (autojump) for Trio and asyncio task bodies; the real clock for thread
    bodies. A thread works in real time while Trio sits idle, and an autojumping clock
    would meanwhile jump from deadline to deadline (heartbeats, polls, then the test's own
    timeout) before the thread is done."""
    return None if style == "thread" else trio.testing.MockClock(autojump_threshold=0)


def _flaky_body(key: str, n: int) -> int:
    executed[key] += 1
    if executed[key] < 3:
        raise RuntimeError(f"{key} fails attempt {executed[key]}")
    return n * 2


def make_tasks(style: str) -> tuple[aiki.Task[int, int], aiki.Task[int, int]]:
    """A task that fails twice then succeeds, and one counted by its idempotency key."""
    retry = aiki.Retry.fixed(max_attempts=3, delay=0.05)
    if style == "trio":
        @aiki.task(name="flaky-trio", retry=retry)
        async def flaky(n: int) -> int:
            await trio.lowlevel.checkpoint()
            return _flaky_body("flaky-trio", n)

        @aiki.task(name="keyed-trio")
        async def keyed(n: int) -> int:
            executed["keyed-trio"] += 1
            return n + 1
    elif style == "thread":
        @aiki.task(name="flaky-thread", retry=retry)
        def flaky(n: int) -> int:
            assert threading.current_thread() is not threading.main_thread()
            return _flaky_body("flaky-thread", n)

        @aiki.task(name="keyed-thread")
        def keyed(n: int) -> int:
            executed["keyed-thread"] += 1
            return n + 1
    else:
        @aiki.task(name="flaky-asyncio", retry=retry, loop="asyncio")
        async def flaky(n: int) -> int:
            await asyncio.sleep(0)  # asyncio's own API works here
            asyncio.get_running_loop()
            return _flaky_body("flaky-asyncio", n)

        @aiki.task(name="keyed-asyncio", loop="asyncio")
        async def keyed(n: int) -> int:
            queue: asyncio.Queue[int] = asyncio.Queue()
            await queue.put(n + 1)
            executed["keyed-asyncio"] += 1
            return await queue.get()
    return flaky, keyed


def make_workflow(style: str) -> aiki.Workflow[int, list[int]]:
    flaky, keyed = make_tasks(style)

    @aiki.workflow(name=f"styles-{style}")
    async def wf(run: aiki.WorkflowRun, n: int) -> list[int]:
        a = await flaky.run(run, n)
        b = await keyed.run(run, a, idempotency_key="once")
        c = await keyed.run(run, a + 100, idempotency_key="once")  # the recorded result
        return [a, b, c]

    return wf


async def test_retries_idempotency_and_checkpoints_are_the_same_in_every_style(
    clock: trio.abc.Clock | None, style: str
) -> None:
    executed.clear()
    wf = make_workflow(style)
    async with aiki.embedded(MemoryStore(), sources=aiki.Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[wf]):
            handle = await wf.enqueue(client, 5)
            assert await handle.wait_for_completion(timeout=60) == [10, 11, 11]
        status = await handle.status()
        history = await handle.history()
    assert executed[f"flaky-{style}"] == 3 and executed[f"keyed-{style}"] == 1
    assert [(t.name, t.state, t.attempts) for t in status.tasks] == [
        (f"flaky-{style}", "completed", 3), (f"keyed-{style}", "completed", 1)]
    assert [e.event for e in history].count("task.retrying") == 2


def test_the_style_follows_the_function() -> None:
    flaky_trio, _ = make_tasks("trio")
    flaky_thread, _ = make_tasks("thread")
    flaky_asyncio, _ = make_tasks("asyncio")
    assert (flaky_trio.style, flaky_thread.style, flaky_asyncio.style) == (
        "trio", "thread", "asyncio")
    assert flaky_thread.payload_type is int and flaky_thread.result_type is int
    with pytest.raises(TypeError, match="loop='asyncio'.*'async def'"):
        aiki.task(loop="asyncio")(lambda n: n)
    with pytest.raises(ValueError, match="loop must be 'trio' or 'asyncio'"):
        aiki.task(loop="curio")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workflow needs an 'async def'"):
        aiki.workflow()(lambda run, n: n)


# -- a worker killed mid-task, in each style -------------------------------------------------
reached: dict[str, trio.Event] = {}
release = threading.Event()  # lets an abandoned thread finish once its worker is gone


def _step(style: str, i: int, n: int) -> int:
    executed[f"{style}-{i}"] += 1
    return n * 10 + i


def make_step(style: str, i: int) -> aiki.Task[int, int]:
    """Step i of the chain; the first execution of step 2 hangs until its worker is killed."""
    hangs = i == 2
    if style == "trio":
        @aiki.task(name=f"{style}-{i}")
        async def step(n: int) -> int:
            value = _step(style, i, n)
            if hangs and executed[f"{style}-2"] == 1:
                reached[style].set()
                await trio.sleep(1000)
            return value
    elif style == "thread":
        @aiki.task(name=f"{style}-{i}")
        def step(n: int) -> int:
            value = _step(style, i, n)
            if hangs and executed[f"{style}-2"] == 1:
                trio.from_thread.run_sync(reached[style].set)
                release.wait(30)  # abandoned by the crash; finishes after it, unheard
            return value
    else:
        @aiki.task(name=f"{style}-{i}", loop="asyncio")
        async def step(n: int) -> int:
            value = _step(style, i, n)
            if hangs and executed[f"{style}-2"] == 1:
                reached[style].set()
                await asyncio.sleep(1000)  # cancelled as an asyncio task by the crash
            return value
    return step


def make_chain(style: str) -> aiki.Workflow[int, int]:
    steps = [make_step(style, i) for i in (1, 2, 3)]

    @aiki.workflow(name=f"chain-{style}")
    async def chain(run: aiki.WorkflowRun, n: int) -> int:
        for step in steps:
            n = await step.run(run, n)
        return n

    return chain


async def test_a_worker_killed_mid_task_resumes_elsewhere_in_every_style(
    clock: trio.abc.Clock | None, style: str
) -> None:
    executed.clear()
    release.clear()
    reached[style] = trio.Event()
    chain = make_chain(style)
    # A short lease: for the thread style it runs out in real time.
    async with aiki.embedded(MemoryStore(), lease_ttl=2, poll_interval=0.1,
                             sources=aiki.Sources.seeded(4)) as client:
        handle = await chain.enqueue(client, 0)
        with trio.CancelScope() as crash:
            async with aiki.worker(client, workflows=[chain], id="w1"):
                await reached[style].wait()
                crash.cancel()  # w1 dies while step 2 runs
        release.set()
        status = await handle.status()
        assert [t.state for t in status.tasks] == ["completed", "running"]
        async with aiki.worker(client, workflows=[chain], id="w2"):
            assert await handle.wait_for_completion(timeout=120) == 123
        history = await handle.history()
    assert executed[f"{style}-1"] == 1, "a checkpointed step ran again"
    assert executed[f"{style}-2"] == 2  # at least once: the interrupted one ran again
    assert executed[f"{style}-3"] == 1
    assert [(e.worker_id, e.attempt) for e in history if e.event == "run.running"] == [
        ("w1", 1), ("w2", 2)]


# -- threads are bounded by the worker's task_threads ------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
async def test_plain_def_tasks_run_at_most_task_threads_at_once(threads: int) -> None:
    # Real time, not the autojump clock: the threads wait in real time, and virtual time
    # would jump past every timeout meanwhile.
    lock = threading.Lock()
    running = [0]
    most = [0]
    # Two threads meet at the barrier only if two may run at once; alone, one times out.
    barrier = threading.Barrier(2)

    @aiki.task(name=f"bounded-{threads}")
    def bounded(n: int) -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            barrier.wait(timeout=0.5 if threads == 1 else 30)
            return True
        except threading.BrokenBarrierError:
            return False
        finally:
            with lock:
                running[0] -= 1

    @aiki.workflow(name=f"fan-{threads}")
    async def fan(run: aiki.WorkflowRun, n: int) -> list[bool]:
        return await run.gather(*(bounded.run(run, i) for i in range(4)))

    async with aiki.embedded(MemoryStore(), sources=aiki.Sources.seeded(5)) as client:
        async with aiki.worker(client, workflows=[fan], task_threads=threads):
            met = await (await fan.enqueue(client, 0)).wait_for_completion(timeout=120)
    assert most[0] == threads
    if threads == 2:
        assert met == [True] * 4
    else:
        assert not any(met)  # alone each time: nobody to meet


async def test_an_asyncio_task_keeps_one_loop_per_worker(autojump_clock: trio.abc.Clock) -> None:
    loops: list[int] = []

    @aiki.task(name="which-loop", loop="asyncio")
    async def which_loop(n: int) -> int:
        loops.append(id(asyncio.get_running_loop()))
        return n

    @aiki.workflow(name="loops")
    async def two(run: aiki.WorkflowRun, n: int) -> int:
        return await which_loop.run(run, n) + await which_loop.run(run, n + 1)

    async with aiki.embedded(MemoryStore(), sources=aiki.Sources.seeded(6)) as client:
        async with aiki.worker(client, workflows=[two]):
            assert await (await two.enqueue(client, 1)).wait_for_completion(timeout=30) == 3
    assert len(loops) == 2 and len(set(loops)) == 1


async def test_a_thread_task_past_its_timeout_is_abandoned_and_retried() -> None:
    # Real time: the thread blocks in real time (see ``clock`` above).
    executed.clear()
    gate = threading.Event()

    @aiki.task(name="slow-thread", timeout=0.2, retry=aiki.Retry.fixed(max_attempts=2,
                                                                      delay=0.01))
    def slow(n: int) -> int:
        executed["slow"] += 1
        if executed["slow"] == 1:
            gate.wait(30)  # past its timeout: the worker stops waiting for this thread
            return -1  # ...and throws this result away when it comes
        return n

    @aiki.workflow(name="times-out")
    async def times_out(run: aiki.WorkflowRun, n: int) -> int:
        return await slow.run(run, n)

    try:
        async with aiki.embedded(MemoryStore(), sources=aiki.Sources.seeded(8)) as client:
            async with aiki.worker(client, workflows=[times_out]):
                handle = await times_out.enqueue(client, 7)
                assert await handle.wait_for_completion(timeout=30) == 7
            status = await handle.status()
            history = await handle.history()
    finally:
        gate.set()
    assert [(t.state, t.attempts) for t in status.tasks] == [("completed", 2)]
    retried = [e for e in history if e.event == "task.retrying"]
    assert len(retried) == 1 and "TooSlowError" in (retried[0].detail or "")
