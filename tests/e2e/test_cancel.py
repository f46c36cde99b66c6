"""Cancellation end to end, on every store, in virtual time."""

from __future__ import annotations

import pytest
import trio

import aiki
from aiki.store import Store

log: list[tuple[str, float]] = []
gate = trio.Event()


@aiki.task(name="slow-charge")
async def slow_charge(amount: int) -> int:
    log.append(("charge started", trio.current_time()))
    try:
        await trio.sleep(1000)
    except trio.Cancelled:
        log.append(("charge cancelled", trio.current_time()))
        raise
    return amount


@aiki.task(name="ship")
async def ship(amount: int) -> str:
    log.append(("ship started", trio.current_time()))
    return "shipped"


@aiki.task(name="refund")
async def refund(amount: int) -> str:
    log.append(("refund", trio.current_time()))
    return f"refunded {amount}"


@aiki.workflow(name="order", version="1")
async def order(run: aiki.WorkflowRun, amount: int) -> str:
    try:
        await slow_charge.run(run, amount)
        await ship.run(run, amount)
    except aiki.RunCancelled:
        assert run.cancelling and run.cancel_reason == "customer left"
        with run.shield():
            await refund.run(run, amount)
        raise
    return "done"


@aiki.workflow(name="sleeper", version="1")
async def sleeper(run: aiki.WorkflowRun, seconds: float) -> str:
    await run.sleep(seconds)
    await ship.run(run, 1)
    return "woke"


@aiki.workflow(name="stubborn", version="1")
async def stubborn(run: aiki.WorkflowRun, _: None) -> str:
    try:
        await run.sleep(5000)
    except aiki.RunCancelled:
        pass  # ignored: the next await raises it again (level-triggered)
    await ship.run(run, 2)
    return "never"


@aiki.workflow(name="slow-compensation", version="1")
async def slow_compensation(run: aiki.WorkflowRun, _: None) -> str:
    try:
        await run.sleep(5000)
    finally:
        with run.shield():
            await run.sleep(3600)  # longer than any grace: the timer ends the run
    return "never"


async def wait_for(predicate: object, limit: float = 60) -> None:
    with trio.fail_after(limit):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.1)


async def test_a_cancel_stops_the_task_in_flight_and_compensates_in_a_shield(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    log.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[order]):
            handle = await order.enqueue(client, 30)
            await wait_for(lambda: log)
            assert await handle.cancel("customer left") is True
            cancelled_at = trio.current_time()
            with pytest.raises(aiki.WorkflowCancelled, match="customer left") as caught:
                await handle.wait_for_completion(timeout=30)
            assert isinstance(caught.value, aiki.WorkflowFailed)
            assert caught.value.reason == "customer left"
            status = await handle.status()
            history = [e.event for e in await handle.history()]
            assert await handle.cancel("again") is False  # finished: nothing changes
            assert [e.event for e in await handle.history()] == history
    assert [what for what, _ in log] == ["charge started", "charge cancelled", "refund"]
    assert log[1][1] == pytest.approx(cancelled_at, abs=0.01)  # pushed, not a heartbeat later
    assert (status.state, status.error_type, status.error_message) == (
        "cancelled", "RunCancelled", "customer left")
    assert [(t.name, t.state) for t in status.tasks] == [
        ("slow-charge", "running"), ("refund", "completed")]
    assert history[-1] == "run.cancelled" and "cancel.requested" in history


async def test_a_cancel_drops_a_durable_sleep_and_no_task_starts(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    log.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[sleeper, stubborn]):
            handles = [await sleeper.enqueue(client, 3600.0), await stubborn.enqueue(client, None)]
            with trio.fail_after(60):
                for handle in handles:
                    while (await handle.status()).state != "waiting":
                        await trio.sleep(0.5)
            for handle in handles:
                assert await handle.cancel() is True
            for handle in handles:
                with pytest.raises(aiki.WorkflowCancelled):
                    await handle.wait_for_completion(timeout=30)
                status = await handle.status()
                assert status.state == "cancelled" and status.waits == ()
    assert log == []  # the cancel reached both before any task


async def test_the_timer_ends_a_compensation_past_its_grace(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[slow_compensation]):
            handle = await slow_compensation.enqueue(client, None)
            with trio.fail_after(60):
                while (await handle.status()).state != "waiting":
                    await trio.sleep(0.5)
            start = trio.current_time()
            assert await handle.cancel("stop", grace=120) is True
            with pytest.raises(aiki.WorkflowCancelled):
                await handle.wait_for_completion(timeout=600)
            assert trio.current_time() - start == pytest.approx(120, abs=2)
            history = await handle.history()
    assert "grace period ended" in (history[-1].detail or "")


async def test_cancelling_a_queued_run_ends_it_at_once_and_bad_grace_is_refused(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        handle = await client.enqueue("nobody-runs-this", 1, version="1")
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="grace must be a finite number"):
                await handle.cancel(grace=bad)
        assert (await handle.status()).state == "queued"
        assert await handle.cancel(grace=0) is True
        with pytest.raises(aiki.WorkflowCancelled):
            await handle.wait_for_completion(timeout=1)
        with pytest.raises(aiki.RunNotFound):
            await client.handle("ghost").cancel()


@aiki.task(name="slow-refund")
async def slow_refund(amount: int) -> str:
    log.append(("refund started", trio.current_time()))
    await trio.sleep(30)
    log.append(("refund done", trio.current_time()))
    return f"refunded {amount}"


@aiki.task(name="tick")
async def tick(i: int) -> int:
    await trio.sleep(1)
    return i


@aiki.workflow(name="compensates-beside-a-sibling", version="1")
async def compensates_beside_a_sibling(run: aiki.WorkflowRun, amount: int) -> str:
    async def charge_then_refund() -> str:
        try:
            await slow_charge.run(run, amount)
        except aiki.RunCancelled:
            with run.shield():
                await slow_refund.run(run, amount)
            raise
        return "charged"

    async def ticking() -> str:
        for i in range(100):
            await tick.run(run, i)
        return "ticked"

    await run.gather(charge_then_refund(), ticking())
    return "done"


async def test_a_shielded_compensation_in_a_gather_branch_outlives_its_cancelled_sibling(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """A sibling that sees RunCancelled fails the gather, which cancels its other branches:
    one compensating inside ``run.shield()`` runs to its end all the same (within the
    grace), and then the run ends cancelled."""
    log.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[compensates_beside_a_sibling]):
            handle = await compensates_beside_a_sibling.enqueue(client, 30)
            await wait_for(lambda: log)
            await trio.sleep(5)
            assert await handle.cancel("customer left") is True
            with pytest.raises(aiki.WorkflowCancelled, match="customer left"):
                await handle.wait_for_completion(timeout=300)
            status = await handle.status()
    assert [what for what, _ in log] == [
        "charge started", "charge cancelled", "refund started", "refund done"]
    assert log[3][1] - log[2][1] == pytest.approx(30)
    refund = [t for t in status.tasks if t.name == "slow-refund"]
    assert [t.state for t in refund] == ["completed"]
    assert status.state == "cancelled"


@aiki.task(name="endless-refund")
async def endless_refund(amount: int) -> str:
    log.append(("refund started", trio.current_time()))
    try:
        await trio.sleep(10_000)
    except trio.Cancelled:
        log.append(("refund cut", trio.current_time()))
        raise
    return "refunded"


@aiki.workflow(name="endless-compensation", version="1")
async def endless_compensation(run: aiki.WorkflowRun, _: None) -> str:
    try:
        await slow_charge.run(run, 1)
    except aiki.RunCancelled:
        with run.shield():
            await endless_refund.run(run, 1)
        raise
    return "never"


async def test_a_shielded_task_is_cut_when_the_grace_period_ends(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """The shield is bounded by the cancel's grace: the compensation's task body is
    cancelled on the worker when it ends (not left running after the run ended)."""
    log.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[endless_compensation]):
            handle = await endless_compensation.enqueue(client, None)
            await wait_for(lambda: log)
            start = trio.current_time()
            assert await handle.cancel("stop", grace=100) is True
            with pytest.raises(aiki.WorkflowCancelled):
                await handle.wait_for_completion(timeout=600)
            await wait_for(lambda: log[-1][0] == "refund cut", limit=30)
    assert [what for what, _ in log] == [
        "charge started", "charge cancelled", "refund started", "refund cut"]
    assert log[-1][1] - start == pytest.approx(100, abs=2)


async def test_a_worker_that_stops_cuts_a_shielded_task_in_flight(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """Trio's shield holds off every cancellation from outside: the run's own (the worker
    stops, loses or is revoked the lease) still reaches the shielded code."""
    log.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[endless_compensation]):
            handle = await endless_compensation.enqueue(client, None)
            await wait_for(lambda: log)
            assert await handle.cancel("stop", grace=1000) is True
            await wait_for(lambda: log[-1][0] == "refund started")
            stopped_at = trio.current_time()
        # (the worker's block has exited: its runs were stopped)
        assert [what for what, _ in log] == [
            "charge started", "charge cancelled", "refund started", "refund cut"]
        assert log[-1][1] == pytest.approx(stopped_at, abs=0.01)
        assert (await handle.status()).state != "cancelled"  # its grace is not over
