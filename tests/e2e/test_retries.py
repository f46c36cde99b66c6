"""Retry strategies end to end, in virtual time: attempts, delays, and how failure shows."""

from __future__ import annotations

import random

import pytest
import trio

import aiki
from aiki.store import Store

attempt_times: list[float] = []
fail_first: dict[str, int] = {"n": 0}


class Flaky(Exception):
    pass


def flaky_workflow(retry: aiki.Retry, name: str) -> aiki.Workflow[int, int]:
    @aiki.task(name=f"flaky-{name}", retry=retry)
    async def flaky(x: int) -> int:
        attempt_times.append(trio.current_time())
        if len(attempt_times) <= fail_first["n"]:
            raise Flaky(f"attempt {len(attempt_times)} failed")
        return x + 1

    @aiki.workflow(name=f"retrying-{name}", version="1")
    async def wf(run: aiki.WorkflowRun, x: int) -> int:
        return await flaky.run(run, x)

    return wf


def gaps() -> list[float]:
    return [round(b - a, 6) for a, b in zip(attempt_times, attempt_times[1:], strict=False)]


@pytest.mark.parametrize(
    ("retry", "failures", "expected_gaps"),
    [
        (aiki.Retry.fixed(4, 2.0), 3, [2.0, 2.0, 2.0]),
        (aiki.Retry.exponential(5, 1.0), 4, [1.0, 2.0, 4.0, 8.0]),
        (aiki.Retry.exponential(5, 1.0, max_delay=3.0), 4, [1.0, 2.0, 3.0, 3.0]),
        (aiki.Retry.from_dict({"type": "exponential", "maxAttempts": 3, "baseDelayMs": 500}),
         2, [0.5, 1.0]),
    ],
    ids=["fixed", "exponential", "exponential-capped", "seed-dict"],
)
async def test_retry_strategy_attempts_and_delays(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    retry: aiki.Retry, failures: int, expected_gaps: list[float],
) -> None:
    attempt_times.clear()
    fail_first["n"] = failures
    wf = flaky_workflow(retry, "ok")
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[wf]):
            handle = await wf.enqueue(client, 41)
            assert await handle.wait_for_completion(timeout=100) == 42
            status = await handle.status()
    assert len(attempt_times) == failures + 1
    assert gaps() == expected_gaps
    assert status.state == "completed"
    assert [(t.name, t.state, t.attempts) for t in status.tasks] == [
        ("flaky-ok", "completed", failures + 1)
    ]


async def test_jittered_delays_come_from_the_seeded_source(
    autojump_clock: trio.abc.Clock, engine_store: Store,
) -> None:
    attempt_times.clear()
    fail_first["n"] = 3
    retry = aiki.Retry.jittered(4, 2.0, max_delay=5.0)
    wf = flaky_workflow(retry, "jitter")
    async with aiki.embedded(engine_store, sources=aiki.Sources.seeded(7)) as client:
        async with aiki.worker(client, workflows=[wf]):
            handle = await wf.enqueue(client, 1)
            assert await handle.wait_for_completion(timeout=100) == 2
    observed = gaps()
    ceilings = [2.0, 4.0, 5.0]
    assert len(observed) == 3
    assert all(0 <= g <= c for g, c in zip(observed, ceilings, strict=True))
    assert len(set(observed)) == 3  # jitter, not a fixed schedule


async def test_exhausted_retries_fail_the_run_with_the_error_in_status_and_exception(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    attempt_times.clear()
    fail_first["n"] = 100
    wf = flaky_workflow(aiki.Retry.fixed(3, 1.0), "exhausted")
    async with aiki.embedded(engine_store, sources=sources) as client:
        # Every attempt's start recorded before it runs, so the history shows each one.
        async with aiki.worker(client, workflows=[wf], record_start_after=0):
            handle = await wf.enqueue(client, 1)
            with pytest.raises(aiki.WorkflowFailed) as failed:
                await handle.wait_for_completion(timeout=100)
            status = await handle.status()
            history = await handle.history()
    assert len(attempt_times) == 3
    assert failed.value.error_type == "Flaky"
    assert "attempt 3 failed" in failed.value.message
    assert "flaky-exhausted" in failed.value.message
    assert status.state == "failed"
    assert status.error_type == "Flaky"
    assert [(t.state, t.attempts, t.error_type) for t in status.tasks] == [
        ("failed", 3, "Flaky")
    ]
    events = [(e.event, e.attempt) for e in history if e.event.startswith("task.")]
    assert events == [
        ("task.running", 1), ("task.retrying", 1), ("task.running", 2), ("task.retrying", 2),
        ("task.running", 3), ("task.failed", 3),
    ]


calls = {"n": 0}


@aiki.task(name="refuses", retry=aiki.Retry.fixed(5, 1.0))
async def refuses(x: int) -> int:
    calls["n"] += 1
    raise aiki.NonRetryableError(f"card {x} declined")


@aiki.workflow(name="non-retryable", version="1")
async def non_retryable(run: aiki.WorkflowRun, x: int) -> str:
    try:
        await refuses.run(run, x)
    except aiki.TaskFailed as exc:
        return f"handled {exc.error_type} after {exc.attempts}"
    return "unreachable"


async def test_non_retryable_error_stops_at_once_and_workflow_code_can_catch_it(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    calls["n"] = 0
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[non_retryable]):
            handle = await non_retryable.enqueue(client, 7)
            assert await handle.wait_for_completion(timeout=10) == (
                "handled NonRetryableError after 1"
            )
    assert calls["n"] == 1


async def test_a_long_retry_delay_frees_the_worker_and_the_timer_wakes_the_run(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    attempt_times.clear()
    fail_first["n"] = 1
    wf = flaky_workflow(aiki.Retry.fixed(2, 3600.0), "long")
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[wf], inline_retry_max=60):
            handle = await wf.enqueue(client, 1)
            with trio.move_on_after(600):
                await handle.wait_for_completion()
            status = await handle.status()
            assert status.state == "waiting"
            assert await handle.wait_for_completion(timeout=7200) == 2
            history = [e.event for e in await handle.history()]
    assert gaps() == [3600.0]
    assert "run.waiting" in history
    assert history.count("run.running") == 2


def test_retry_randomness_is_injected() -> None:
    # Same seed, same jitter: the engine never draws from module-level random.
    a = aiki.Retry.jittered(5, 1.0).delay_after(2, random.Random(3))
    b = aiki.Retry.jittered(5, 1.0).delay_after(2, random.Random(3))
    assert a == b
