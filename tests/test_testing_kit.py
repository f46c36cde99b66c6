"""aiki.testing: the kit users test their own workflows with."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import attrs
import pytest
import trio

import aiki
import aiki.testing
from aiki.testing import Factory


@attrs.frozen
class Claim:
    id: str
    manager: str


decision = aiki.event("decision", bool)


@aiki.task(name="notify", retry=aiki.Retry.fixed(3, 60.0))
async def notify(to: str) -> str:
    raise AssertionError("the real notify must not run in these tests")


@aiki.task(name="double")
async def double(x: int) -> int:
    return 2 * x


@aiki.workflow(name="approval", version="1", events=[decision])
async def approval(run: aiki.WorkflowRun, claim: Claim) -> str:
    await notify.run(run, claim.manager)
    try:
        ok = await decision.wait(run, timeout=timedelta(days=3))
    except aiki.EventTimeout:
        await notify.run(run, "finance")
        return "escalated"
    return "approved" if ok else "rejected"


@aiki.workflow(name="weekly", version="1")
async def weekly(run: aiki.WorkflowRun, x: int) -> int:
    await run.sleep(timedelta(days=7))
    return await double.run(run, x)


async def test_a_week_long_sleep_takes_no_time(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    env = await aiki_env(workflows=[weekly])
    started = trio.current_time()
    handle = await weekly.enqueue(env.client, 21)
    assert await handle.wait_for_completion() == 42
    assert trio.current_time() - started >= 7 * 86400  # a week passed, in virtual time
    assert env.task_calls(double) == [21]


async def test_mocks_advance_and_events(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    env = await aiki_env(workflows=[approval])
    env.mock_task(notify, returns="sent")
    escalated = await approval.enqueue(env.client, Claim("c1", "ann"))
    answered = await approval.enqueue(env.client, Claim("c2", "bob"))
    await env.advance(timedelta(days=1))
    assert (await escalated.status()).state == "waiting"
    await answered.send(decision, True)
    assert await answered.wait_for_completion() == "approved"
    await env.advance(timedelta(days=2))
    assert await escalated.wait_for_completion() == "escalated"
    assert sorted(env.task_calls(notify)) == ["ann", "bob", "finance"]


async def test_a_mock_that_raises_is_retried_like_a_real_failure(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    env = await aiki_env(workflows=[approval])
    env.mock_task(notify, raises=ConnectionError("smtp down"))
    handle = await approval.enqueue(env.client, Claim("c3", "cy"))
    with pytest.raises(aiki.WorkflowFailed, match="smtp down"):
        await handle.wait_for_completion()
    assert env.task_calls(notify) == ["cy"] * 3  # the task's policy: 3 attempts


async def test_side_effects_and_a_crashed_worker_resume_from_checkpoints(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    env = await aiki_env(workflows=[approval])
    blocked = trio.Event()
    sent: list[str] = []

    async def slow_notify(to: str) -> str:
        sent.append(to)
        if len(sent) == 1:
            blocked.set()
            await trio.sleep_forever()  # the worker crashes in here
        return f"sent to {to}"

    env.mock_task(notify, side_effect=slow_notify)
    handle = await approval.enqueue(env.client, Claim("c4", "dee"))
    await blocked.wait()
    await env.crash_worker()
    await handle.send(decision, False)
    assert await handle.wait_for_completion() == "rejected"
    assert sent == ["dee", "dee"]  # the interrupted attempt ran again, on the new worker
    history = await handle.history()
    assert {e.worker_id for e in history if e.event == "run.running"} == {
        "test-worker-1", "test-worker-2"}


async def test_bad_mock_arguments_are_refused(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    env = await aiki_env(workflows=[weekly])
    with pytest.raises(ValueError, match="exactly one of"):
        env.mock_task(double)
    with pytest.raises(ValueError, match="exactly one of"):
        env.mock_task(double, returns=1, raises=ValueError())
    with pytest.raises(TypeError, match="@aiki.task definition"):
        env.mock_task(weekly, returns=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="env.advance"):
        await env.advance(-1)


def test_without_pytest_under_the_kit_clock() -> None:
    code = """
import trio, aiki, aiki.testing
from tests.test_testing_kit import weekly

async def main():
    async with aiki.testing.environment([weekly]) as env:
        h = await weekly.enqueue(env.client, 5)
        print(await h.wait_for_completion())

trio.run(main, clock=aiki.testing.clock())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10"


def test_the_fixture_says_it_needs_the_clock(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile("async def test_forgot(aiki_env):\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*let the test take pytest-trio's autojump_clock*"])


async def test_advance_needs_the_mock_clock() -> None:
    async with aiki.testing.environment([weekly]) as env:
        with pytest.raises(RuntimeError, match="MockClock"):
            await env.advance(1)


async def test_the_readme_example(aiki_env: Factory, autojump_clock: trio.abc.Clock) -> None:
    from examples.expense import Claim as ExpenseClaim
    from examples.expense import Message, expense
    from examples.expense import notify as expense_notify

    env = await aiki_env(workflows=[expense])
    env.mock_task(expense_notify, returns="sent")
    handle = await expense.enqueue(env.client, ExpenseClaim("e-1", "bob", "ann", 4200))
    await env.advance(timedelta(days=3))
    assert await handle.wait_for_completion() == "escalated"
    assert env.task_calls(expense_notify)[-1] == Message(
        "finance", "expense e-1: no decision in 3 days")


async def test_the_same_test_gives_the_same_history(autojump_clock: trio.abc.Clock) -> None:
    async def once() -> list[tuple[object, ...]]:
        async with aiki.testing.environment([approval]) as env:
            env.mock_task(notify, returns="sent")
            handle = await approval.enqueue(env.client, Claim("c9", "eve"))
            await env.advance(timedelta(days=4))
            assert await handle.wait_for_completion() == "escalated"
            return [(handle.id, e.at, e.event, e.position, e.detail)
                    for e in await handle.history()]

    first = await once()
    second = await once()
    assert [e[2:] for e in first] == [e[2:] for e in second]
    assert first[0][0] == second[0][0]  # the run id too: seeded sources
