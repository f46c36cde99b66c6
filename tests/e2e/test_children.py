"""Child workflows end to end, on every store, in virtual time: started as steps, joined on
any end, structured (a run ends after its children), cancelled down the tree."""

from __future__ import annotations

import pytest
import trio

import aiki
from aiki.store import Store

started: list[str] = []


@aiki.task(name="pack")
async def pack(parcel: str) -> str:
    started.append(parcel)
    if parcel.startswith("slow"):
        await trio.sleep(1000)
    if parcel == "broken":
        raise aiki.NonRetryableError("no such parcel")
    return f"packed {parcel}"


@aiki.workflow(name="ship", version="1")
async def ship(run: aiki.WorkflowRun, parcel: str) -> str:
    return await pack.run(run, parcel)


@aiki.workflow(name="order", version="1")
async def order(run: aiki.WorkflowRun, parcels: list[str]) -> list[str]:
    return await run.gather(*(ship.call(run, p) for p in parcels))


@aiki.workflow(name="tolerant", version="1")
async def tolerant(run: aiki.WorkflowRun, parcels: list[str]) -> list[str]:
    out = []
    for p in parcels:
        child = await ship.start_child(run, p)
        try:
            out.append(await child.result())
        except aiki.ChildFailed as exc:
            out.append(f"{exc.child_id} failed: {exc.error_type}: {exc.message}")
        except aiki.ChildCancelled as exc:
            out.append(f"{exc.child_id} cancelled: {exc.reason}")
    return out


@aiki.workflow(name="fire-and-forget", version="1")
async def fire_and_forget(run: aiki.WorkflowRun, parcels: list[str]) -> str:
    for p in parcels:
        await ship.start_child(run, p, detached=p.endswith("!"))
    return "sent"


@aiki.workflow(name="impatient-order", version="1")
async def impatient_order(run: aiki.WorkflowRun, parcel: str) -> list[str]:
    """Cancels its child through ``child.handle`` (not a step: the cancel of a child that
    has ended already answers False on a replay) and reads its end."""
    child = await ship.start_child(run, parcel)
    assert child.handle.id == child.id
    cancelled = await child.handle.cancel("not needed")
    try:
        got = await child.result()
    except aiki.ChildCancelled as exc:
        got = f"cancelled: {exc.reason}"
    state = (await child.handle.status()).state
    return [got, state, str(cancelled)]


@aiki.workflow(name="tree", version="1")
async def tree(run: aiki.WorkflowRun, depth: int) -> str:
    if depth == 0:
        return await pack.run(run, "slow-leaf")
    await run.gather(*(tree.call(run, depth - 1) for _ in range(2)))
    return "never"


async def test_fan_out_to_children_and_fan_in(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    with pytest.raises(TypeError, match="a child is started from inside a workflow"):
        await ship.start_child("not a run", "x")  # type: ignore[arg-type]
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[order, ship], max_concurrent_runs=3):
            handle = await order.enqueue(client, ["a", "b", "c", "d", "e"])
            assert await handle.wait_for_completion(timeout=60) == [
                f"packed {p}" for p in "abcde"]
            children = await engine_store.get_children(handle.id)
            assert [c.state for c in children] == ["completed"] * 5
            assert {c.parent_id for c in children} == {handle.id}
            status = await handle.status()
            assert [(c.workflow, c.state) for c in status.children] == [
                ("ship", "completed")] * 5
            child = await client.handle(status.children[0].id).status()
            assert (child.parent_id, child.children) == (handle.id, ())


async def test_a_parent_wakes_on_every_end_of_its_child(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[tolerant, ship]):
            handle = await tolerant.enqueue(client, ["a", "broken", "slow-1"])
            with trio.fail_after(60):
                while len(await engine_store.get_children(handle.id)) < 3:
                    await trio.sleep(0.5)
            slow = (await engine_store.get_children(handle.id))[2]
            assert await client.handle(slow.id).cancel("out of stock") is True
            result = await handle.wait_for_completion(timeout=60)
    assert result == ["packed a",
                      f"{handle.id}/2 failed: NonRetryableError: task 'pack' failed after 1 "
                      "attempt(s): NonRetryableError: no such parcel",
                      f"{handle.id}/4 cancelled: out of stock"]


async def test_a_run_waits_for_its_children_but_not_detached_ones(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    started.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[fire_and_forget, ship]):
            handle = await fire_and_forget.enqueue(client, ["a", "slow-2", "slow-3!"])
            with trio.move_on_after(30):
                await handle.wait_for_completion()
            status = await handle.status()
            assert status.state == "waiting"  # its function returned; a child still runs
            assert [w.kind for w in status.waits] == ["children"]
            children = await engine_store.get_children(handle.id)
            assert [c.detached for c in children] == [False, False, True]
            await client.handle(children[1].id).cancel()
            assert await handle.wait_for_completion(timeout=60) == "sent"
            detached = await engine_store.get_run(children[2].id)
            assert detached is not None and detached.state == "running"  # outlives it


async def test_cancelling_a_three_level_tree_cancels_every_run(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    started.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[tree], max_concurrent_runs=10):
            handle = await tree.enqueue(client, 2)
            with trio.fail_after(60):
                while len(started) < 4:  # every leaf's task is in flight
                    await trio.sleep(0.5)
            assert await handle.cancel("abandoned") is True
            cancelled_at = len(started)
            with pytest.raises(aiki.WorkflowCancelled, match="abandoned"):
                await handle.wait_for_completion(timeout=120)
            ids, todo = [], [handle.id]
            while todo:
                run_id = todo.pop()
                ids.append(run_id)
                todo += [c.id for c in await engine_store.get_children(run_id)]
            runs = [await engine_store.get_run(r) for r in ids]
    assert len(runs) == 7
    assert all(r is not None and r.state == "cancelled" for r in runs)
    assert len(started) == cancelled_at  # no task started after the cancel


async def test_child_handle_is_a_handle_through_the_workers_client(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[impatient_order, ship]):
            handle = await impatient_order.enqueue(client, "slow-9")
            got, state, _ = await handle.wait_for_completion(timeout=60)
    assert (got, state) == ("cancelled: not needed", "cancelled")


def test_child_handle_of_a_worker_made_without_a_client_is_a_clear_error() -> None:
    from aiki.actors.run import WorkflowRun
    from aiki.sdk.definitions import ChildRun

    run = WorkflowRun(None, "r", "wf", "1", 1)  # type: ignore[arg-type]
    with pytest.raises(aiki.WorkflowUsageError, match=r"client.handle\(child.id\)"):
        _ = ChildRun(run, "r/0", str).handle
