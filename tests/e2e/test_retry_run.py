"""The repair story: a run fails on a bug, the code is fixed (as version 2), and retrying
the run on version 2 finishes it without running its completed steps again."""

from __future__ import annotations

import pytest
import trio

import aiki
from aiki.store import Store

charged: list[int] = []


@aiki.task(name="charge")
async def charge(cents: int) -> str:
    charged.append(cents)
    return f"charged {cents}"


@aiki.task(name="ship", retry=aiki.Retry.none())
async def ship(address: str) -> str:
    if not address:
        raise ValueError("no address")
    return f"shipped to {address}"


@aiki.workflow(name="order", version="1")
async def order_v1(run: aiki.WorkflowRun, cents: int) -> str:
    receipt = await charge.run(run, cents)
    return receipt + ", " + await ship.run(run, "")  # the bug: no address


@aiki.workflow(name="order", version="2")
async def order_v2(run: aiki.WorkflowRun, cents: int) -> str:
    receipt = await charge.run(run, cents)  # the same first step: replayed
    return receipt + ", " + await ship.run(run, "Main St 1")  # fixed


@aiki.task(name="refund")
async def refund(cents: int) -> str:
    return f"refunded {cents}"


@aiki.workflow(name="order", version="3")
async def order_v3(run: aiki.WorkflowRun, cents: int) -> str:
    receipt = await refund.run(run, cents)  # a change that does not replay the history
    return receipt + ", " + await ship.run(run, "Main St 1")


async def test_a_retry_on_a_version_that_does_not_replay_fails_again_clearly(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    charged.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[order_v1, order_v2, order_v3]):
            handle = await order_v1.enqueue(client, 700)
            with pytest.raises(aiki.WorkflowFailed, match="no address"):
                await handle.wait_for_completion(timeout=60)
            await handle.retry(version="3")
            with pytest.raises(aiki.WorkflowFailed) as failed:
                await handle.wait_for_completion(timeout=60)
            status = await handle.status()
            assert (status.state, status.version) == ("failed", "3")
            # Repaired once more, on a version that replays: it finishes.
            await handle.retry(version="2")
            assert await handle.wait_for_completion(timeout=60) == \
                "charged 700, shipped to Main St 1"
    assert failed.value.error_type == "NonDeterminismError"
    assert failed.value.message == (
        f"run {handle.id} diverged from its history at step 0: the history has task "
        "'charge' with input 700, but the code now calls task 'refund' with input 700")
    assert charged.count(700) == 1


async def test_a_failed_run_is_retried_on_the_fixed_version(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    charged.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[order_v1, order_v2]):
            handle = await order_v1.enqueue(client, 1999)
            with pytest.raises(aiki.WorkflowFailed, match="no address"):
                await handle.wait_for_completion(timeout=60)
            with pytest.raises(aiki.RunNotRetryable):
                await (await order_v2.enqueue(client, 5)).retry()  # not failed (yet)
            await handle.retry(version="2")
            assert await handle.wait_for_completion(timeout=60) == \
                "charged 1999, shipped to Main St 1"
            status = await handle.status()
            history = await handle.history()
    assert charged.count(1999) == 1  # the completed step did not run again
    assert (status.version, status.attempts) == ("2", 2)
    assert any(e.event == "run.queued" and e.detail and "re-pinned from version 1 to 2"
               in e.detail for e in history)
