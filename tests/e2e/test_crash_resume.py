"""A run survives its worker: killed after task k, a new worker finishes it from checkpoints."""

from __future__ import annotations

from collections import Counter

import attrs
import pytest
import trio

import aiki
from aiki.store import Store


@attrs.frozen
class Item:
    n: int


executed: Counter[str] = Counter()
reached: dict[str, trio.Event] = {}
kill_at = {"step": 4}  # the step whose first execution blocks until the worker is killed


def make_step(i: int) -> aiki.Task[Item, Item]:
    @aiki.task(name=f"step-{i}")
    async def step(item: Item) -> Item:
        executed[f"step-{i}"] += 1
        reached[f"step-{i}"].set()
        if i == kill_at["step"] and executed[f"step-{i}"] == 1:
            await trio.sleep(1000)  # the first worker is killed in here
        return Item(item.n * 10 + i)

    return step


STEPS = [make_step(i) for i in range(1, 5)]


@aiki.workflow(name="chain", version="1")
async def chain(run: aiki.WorkflowRun, item: Item) -> Item:
    for step in STEPS:
        item = await step.run(run, item)
    return item


@pytest.mark.parametrize("killed_in", [2, 4])
async def test_worker_killed_after_task_k_resumes_on_a_new_worker(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources, killed_in: int
) -> None:
    executed.clear()
    kill_at["step"] = killed_in
    for i in range(1, 5):
        reached[f"step-{i}"] = trio.Event()
    async with aiki.embedded(engine_store, lease_ttl=10, sources=sources) as client:
        handle = await chain.enqueue(client, Item(0))
        with trio.CancelScope() as crash:
            async with aiki.worker(client, workflows=[chain], id="w1"):
                await reached[f"step-{killed_in}"].wait()
                crash.cancel()  # worker w1 dies while step k is running
        committed = killed_in - 1
        status = await handle.status()
        assert status.state == "running"
        assert [t.state for t in status.tasks[:committed]] == ["completed"] * committed
        killed_at = trio.current_time()

        async with aiki.worker(client, workflows=[chain], id="w2"):
            result = await handle.wait_for_completion(timeout=120)
        # w2 got the run only after w1's lease expired, not before.
        assert trio.current_time() - killed_at >= 10
        history = await handle.history()

    assert result == Item(1234)
    for i in range(1, committed + 1):
        assert executed[f"step-{i}"] == 1, f"step-{i} re-ran after it was committed"
    assert executed[f"step-{killed_in}"] == 2  # at least once: the interrupted one ran again
    running = [(e.worker_id, e.attempt) for e in history if e.event == "run.running"]
    assert running == [("w1", 1), ("w2", 2)]
    assert any(e.event == "run.queued" and "expired" in (e.detail or "") for e in history)


async def test_handle_of_an_existing_run_after_a_restart_on_the_same_sqlite_file(
    autojump_clock: trio.abc.Clock, tmp_path: object, sources: aiki.Sources
) -> None:
    from aiki.store import SqliteStore

    path = f"{tmp_path}/restart.db"
    executed.clear()
    kill_at["step"] = 3
    for i in range(1, 5):
        reached[f"step-{i}"] = trio.Event()
    store = await SqliteStore.open(path, offload=False)
    async with aiki.embedded(store, lease_ttl=5, sources=sources) as client:
        handle = await chain.enqueue(client, Item(0))
        run_id = handle.id
        with trio.CancelScope() as crash:
            async with aiki.worker(client, workflows=[chain], id="w1"):
                await reached["step-3"].wait()
                crash.cancel()
    await store.aclose()  # the whole "process" is gone

    store = await SqliteStore.open(path, offload=False)
    async with aiki.embedded(store, lease_ttl=5, sources=sources) as client:
        again = client.handle(run_id, Item)
        assert (await again.status()).state == "running"  # until the old lease expires
        async with aiki.worker(client, workflows=[chain], id="w2"):
            assert await again.wait_for_completion(timeout=60) == Item(1234)
    await store.aclose()
    assert executed["step-1"] == executed["step-2"] == 1
