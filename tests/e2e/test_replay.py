"""Replay after a crash: divergence is caught, gather and recorded helpers replay exactly."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import pytest
import trio

import aiki
from aiki.store import Store

ran: Counter[str] = Counter()
block = {"name": ""}
entered: dict[str, trio.Event] = {}


def make(name: str) -> aiki.Task[int, int]:
    @aiki.task(name=name)
    async def step(x: int) -> int:
        ran[name] += 1
        entered.setdefault(name, trio.Event()).set()
        if name == block["name"] and ran[name] == 1:
            await trio.sleep(10_000)  # the first worker is killed in here
        return x + 1

    return step


a, b, c, d, blocker = (make(n) for n in ("a", "b", "c", "d", "blocker"))
variant = {"v": "original"}


@aiki.workflow(name="changing", version="1")
async def changing(run: aiki.WorkflowRun, x: int) -> int:
    if variant["v"] == "original":
        y = await a.run(run, x)
        z = await b.run(run, y)
    elif variant["v"] == "new-input":
        y = await a.run(run, x + 100)
        z = await b.run(run, y)
    else:  # reordered
        z = await b.run(run, x + 1)
        y = await a.run(run, x)
    return await blocker.run(run, y + z)


async def crash_then_resume(
    engine_store: Store, sources: aiki.Sources, wf: aiki.Workflow[int, Any], payload: int,
    change: Any = None,
) -> aiki.RunHandle[Any]:
    async with aiki.embedded(engine_store, lease_ttl=5, sources=sources) as client:
        handle = await wf.enqueue(client, payload)
        with trio.CancelScope() as crash:
            async with aiki.worker(client, workflows=[wf], id="first"):
                await entered.setdefault(block["name"], trio.Event()).wait()
                crash.cancel()
        if change is not None:
            change()
        async with aiki.worker(client, workflows=[wf], id="second"):
            with trio.move_on_after(60), contextlib.suppress(aiki.WorkflowFailed):
                await handle.wait_for_completion()
            return handle


def reset(blocking: str) -> None:
    ran.clear()
    entered.clear()
    block["name"] = blocking
    variant["v"] = "original"


@pytest.mark.parametrize(
    ("new", "history_side", "code_side"),
    [
        ("new-input", "task 'a' with input 1", "task 'a' with input 101"),
        ("reordered", "task 'a' with input 1", "task 'b' with input 2"),
    ],
)
async def test_changed_inputs_or_order_raise_non_determinism_naming_both_sides(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    new: str, history_side: str, code_side: str,
) -> None:
    reset("blocker")

    def change() -> None:
        variant["v"] = new

    handle = await crash_then_resume(engine_store, sources, changing, 1, change)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.state == "failed"
    assert run.error_type == "NonDeterminismError"
    message = run.error_message or ""
    assert "at step 0" in message
    assert f"the history has {history_side}" in message
    assert f"the code now calls {code_side}" in message
    assert ran["blocker"] == 1  # nothing after the divergence ran


@aiki.workflow(name="fan-out", version="1")
async def fan_out(run: aiki.WorkflowRun, x: int) -> list[int]:
    first = await a.run(run, x)
    many = await run.gather(b.run(run, first), c.run(run, first), d.run(run, first + 10))
    last = await blocker.run(run, sum(many))
    return [first, *many, last]


async def test_gather_runs_branches_concurrently_and_replays_them_after_a_crash(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    reset("blocker")
    handle = await crash_then_resume(engine_store, sources, fan_out, 1)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.state == "completed", run
    assert run.result == "[2,3,3,13,20]"
    assert dict(ran) == {"a": 1, "b": 1, "c": 1, "d": 1, "blocker": 2}
    positions = sorted(s.position for s in await engine_store.get_steps(handle.id))
    assert positions == ["0", "1.0.0", "1.1.0", "1.2.0", "2"]


slow_first = {"on": True}


def timed(name: str, delays: dict[str, float]) -> aiki.Task[int, int]:
    @aiki.task(name=name)
    async def step(x: int) -> int:
        ran[name] += 1
        await trio.sleep(delays[name] if slow_first["on"] else 1 / delays[name])
        return x * 2

    return step


DELAYS = {"p": 3.0, "q": 2.0, "r": 1.0}
p_, q_, r_ = (timed(n, DELAYS) for n in ("p", "q", "r"))


@aiki.workflow(name="order-free", version="1")
async def order_free(run: aiki.WorkflowRun, x: int) -> list[int]:
    out = await run.gather(p_.run(run, x), q_.run(run, x + 1), r_.run(run, x + 2))
    tail = await blocker.run(run, sum(out))
    return [*out, tail]


async def test_gather_replay_does_not_depend_on_the_order_branches_finished_in(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    reset("blocker")
    slow_first["on"] = True  # first worker: r finishes first, p last

    def flip() -> None:
        slow_first["on"] = False  # (not needed on replay: nothing re-runs)

    handle = await crash_then_resume(engine_store, sources, order_free, 1, flip)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.state == "completed", run
    assert run.result == "[2,4,6,13]"
    assert (ran["p"], ran["q"], ran["r"]) == (1, 1, 1)


seen: list[tuple[float, float, str]] = []


@aiki.workflow(name="helpers", version="1")
async def helpers(run: aiki.WorkflowRun, x: int) -> int:
    values = (await run.now(), await run.random(), await run.uuid4())
    seen.append(values)
    return await blocker.run(run, x)


async def test_now_random_and_uuid4_are_recorded_once_and_replayed(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    reset("blocker")
    seen.clear()
    handle = await crash_then_resume(engine_store, sources, helpers, 5)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.state == "completed"
    assert len(seen) == 2
    assert seen[0] == seen[1]
    now, rnd, uid = seen[0]
    assert 0 <= rnd < 1 and len(uid) == 36 and now > 1_600_000_000


@aiki.workflow(name="removed-call", version="1")
async def removed_call(run: aiki.WorkflowRun, x: int) -> int:
    if variant["v"] == "original":
        await a.run(run, x)
        await blocker.run(run, x)
    return x


async def test_a_removed_call_is_reported_when_the_run_finishes_short(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    reset("blocker")

    def change() -> None:
        variant["v"] = "removed"

    handle = await crash_then_resume(engine_store, sources, removed_call, 3, change)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.error_type == "NonDeterminismError"
    assert "without reaching 2 recorded step(s)" in (run.error_message or "")
    assert "task 'a' with input 3" in (run.error_message or "")
