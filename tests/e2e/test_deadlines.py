"""Durable deadlines end to end, on every store, in virtual time: ``run.move_on_after`` and
``run.fail_after`` over task attempts, durable sleeps (the timer wakes the run at its
deadline), children, nested scopes; bad durations and use outside a workflow."""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Any

import pytest
import trio

import aiki
from aiki.errors import StoreUnavailable
from aiki.store import MemoryStore, Store
from aiki.store.ops import AwaitStep, Op

kept: list[Any] = []


@aiki.task(name="slow")
async def slow(seconds: float) -> str:
    await trio.sleep(seconds)
    return f"slept {seconds}"


@aiki.workflow(name="impatient", version="1")
async def impatient(run: aiki.WorkflowRun, seconds: float) -> list[Any]:
    start = await run.now()
    with run.move_on_after(datetime.timedelta(seconds=10)) as scope:
        got = await slow.run(run, seconds)
    after = await run.now()
    return [None if scope.cancelled_caught else got, scope.cancelled_caught,
            round(after - start), scope.deadline is not None]


@aiki.workflow(name="strict", version="1")
async def strict(run: aiki.WorkflowRun, catch: bool) -> str:
    try:
        with run.fail_after(5):
            await slow.run(run, 100.0)
    except aiki.DeadlineExceeded:
        if not catch:
            raise
        return "caught"
    return "in time"


@aiki.workflow(name="patient", version="1")
async def patient(run: aiki.WorkflowRun, _: None) -> list[Any]:
    kept.append(run)
    start = await run.now()
    with run.move_on_after(3600) as scope:
        await run.sleep(86400)  # a durable sleep: the slot is given back
    return [scope.cancelled_caught, round(await run.now() - start)]


@aiki.workflow(name="nested", version="1")
async def nested(run: aiki.WorkflowRun, inner_first: bool) -> list[bool]:
    with run.move_on_after(100 if inner_first else 10) as outer:
        with run.move_on_after(10 if inner_first else 100) as inner:
            await slow.run(run, 1000.0)
        await slow.run(run, 1000.0 if not inner_first else 0.0)
    return [outer.cancelled_caught, inner.cancelled_caught]


@aiki.workflow(name="leaf", version="1")
async def leaf(run: aiki.WorkflowRun, seconds: float) -> str:
    return await slow.run(run, seconds)


@aiki.workflow(name="waits-for-a-child", version="1")
async def waits_for_a_child(run: aiki.WorkflowRun, seconds: float) -> str:
    with run.move_on_after(30) as scope:
        child = await leaf.start_child(run, seconds)
        kept.append(child.id)
        return await child.result()
    assert scope.cancelled_caught
    return "gave up"


async def test_a_deadline_cancels_a_task_attempt_and_moves_on(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[impatient]):
            late = await impatient.enqueue(client, 1000.0)
            quick = await impatient.enqueue(client, 1.0)
            assert await late.wait_for_completion(timeout=60) == [None, True, 10, True]
            assert await quick.wait_for_completion(timeout=60) == ["slept 1.0", False, 1,
                                                                   True]
            events = [e.event for e in await late.history()]
    assert events.count("step.recorded") == 3  # now, the deadline, now


async def test_fail_after_raises_deadline_exceeded(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[strict]):
            caught = await strict.enqueue(client, True)
            failed = await strict.enqueue(client, False)
            assert await caught.wait_for_completion(timeout=60) == "caught"
            with pytest.raises(aiki.WorkflowFailed) as err:
                await failed.wait_for_completion(timeout=60)
    assert err.value.error_type == "DeadlineExceeded"


async def test_a_waiting_run_is_woken_by_the_timer_at_its_deadline(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    kept.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[patient]) as worker:
            handle = await patient.enqueue(client, None)
            with trio.fail_after(60):
                while (await handle.status()).state != "waiting":
                    await trio.sleep(0.5)
            assert not worker.held
            kinds = sorted(w.kind for w in (await handle.status()).waits)
            assert kinds == ["deadline", "sleep"]
            assert await handle.wait_for_completion(timeout=7200) == [True, 3600]
            steps = await engine_store.get_steps(handle.id)
    [deadline] = [s for s in steps if s.kind == "deadline"]  # recorded once, replayed
    assert deadline.output is not None
    with pytest.raises(aiki.WorkflowUsageError, match="outside the workflow code"):
        kept[0].move_on_after(5).__enter__()
    with pytest.raises(aiki.WorkflowUsageError, match="outside the workflow code"):
        await leaf.start_child(kept[0], 1.0)
    with pytest.raises(aiki.WorkflowUsageError, match=r"run.shield\(\) is used outside"):
        with kept[0].shield():
            pass
    with pytest.raises(RuntimeError):  # (as before: a RuntimeError too)
        kept[0].fail_after(5).__enter__()


async def test_nested_deadlines_behave_as_trios(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[nested]):
            inner_first = await nested.enqueue(client, True)
            outer_first = await nested.enqueue(client, False)
            # The inner one expires first: it alone catches it, the outer goes on.
            assert await inner_first.wait_for_completion(timeout=600) == [False, True]
            # The outer one expires first: the inner scope does not catch it.
            assert await outer_first.wait_for_completion(timeout=600) == [True, False]


async def test_a_deadline_cancels_the_children_started_in_its_scope(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    kept.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[waits_for_a_child, leaf]):
            quick = await waits_for_a_child.enqueue(client, 1.0)
            assert await quick.wait_for_completion(timeout=60) == "slept 1.0"
            handle = await waits_for_a_child.enqueue(client, 1000.0)
            assert await handle.wait_for_completion(timeout=600) == "gave up"
            child = await client.handle(kept[-1]).status()
    assert child.state == "cancelled"
    assert child.cancel_reason is not None and "deadline" in child.cancel_reason


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, datetime.timedelta(seconds=-5)])
async def test_bad_durations_are_refused(bad: Any) -> None:
    from aiki.actors.run import WorkflowRun

    run = WorkflowRun.__new__(WorkflowRun)
    for make in (run.move_on_after, run.fail_after):
        with pytest.raises(ValueError, match="run.(move_on|fail)_after\\(\\)"):
            make(bad)


@aiki.workflow(name="shielded-in-a-deadline", version="1")
async def shielded_in_a_deadline(run: aiki.WorkflowRun, durable: bool) -> list[Any]:
    start = await run.now()
    done = None
    with run.move_on_after(10) as scope:
        with run.shield():  # the deadline passes in here: what is inside goes on
            if durable:
                await run.sleep(30)  # the slot is given back; not woken at the deadline
                done = "slept"
            else:
                done = await slow.run(run, 30.0)
            shielded_end = round(await run.now() - start)
        await slow.run(run, 1.0)  # the deadline takes effect now: never completes
        done = "not cancelled"
    return [done, scope.cancelled_caught, shielded_end, round(await run.now() - start)]


@aiki.workflow(name="deadline-in-a-shield", version="1")
async def deadline_in_a_shield(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(100) as outer:
        with run.shield():
            with run.move_on_after(5) as inner:  # opened inside: it expires as usual
                await slow.run(run, 50.0)
            await slow.run(run, 1.0)
    return [outer.cancelled_caught, inner.cancelled_caught]


@pytest.mark.parametrize("durable", [False, True], ids=["task", "durable-sleep"])
async def test_a_shield_holds_off_an_enclosing_deadline_until_it_exits(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    durable: bool,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_in_a_deadline,
                                                  deadline_in_a_shield]):
            handle = await shielded_in_a_deadline.enqueue(client, durable)
            done = "slept" if durable else "slept 30.0"
            assert await handle.wait_for_completion(timeout=600) == [done, True, 30, 30]
            if durable:  # the sleep's wait alone: the deadline does not wake it
                steps = await engine_store.get_steps(handle.id)
                assert [s.kind for s in steps].count("sleep") == 1
            inside = await deadline_in_a_shield.enqueue(client, None)
            assert await inside.wait_for_completion(timeout=600) == [False, True]


@aiki.workflow(name="shielded-branch", version="1")
async def shielded_branch(run: aiki.WorkflowRun, _: None) -> list[Any]:
    start = await run.now()

    async def branch() -> str:
        with run.shield():
            await run.sleep(30)  # waits past the deadline: the run is not woken for it
        return "slept"

    with run.move_on_after(10) as scope:
        got = await run.gather(branch(), branch())
    return [got, scope.cancelled_caught, round(await run.now() - start)]


async def test_a_shield_in_a_gather_branch_holds_off_the_deadline_around_the_gather(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_branch]):
            handle = await shielded_branch.enqueue(client, None)
            # (The deadline takes effect when the scope's code next awaits: after it, none.)
            assert await handle.wait_for_completion(timeout=600) == [
                ["slept", "slept"], False, 30]
            claims = [e for e in await handle.history() if e.event == "run.running"]
    assert len(claims) == 2  # the first attempt, then woken by the sleeps' end only


@aiki.task(name="refund", retry=aiki.Retry.none())
async def refund(seconds: float) -> str:
    await trio.sleep(seconds)
    raise aiki.NonRetryableError("the refund was refused")


@aiki.workflow(name="shielded-branch-fails", version="1")
async def shielded_branch_fails(run: aiki.WorkflowRun, _: None) -> str:
    async def branch() -> None:
        with run.shield():
            await refund.run(run, 30.0)  # fails after the deadline cut its sibling

    try:
        with run.move_on_after(10):
            await run.gather(branch(), run.sleep(60))
    except aiki.TaskFailed as exc:
        return f"heard: {exc.error_type}"
    return "the failure was lost"


async def test_a_shielded_branch_that_fails_after_the_deadline_raises_its_failure(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    # The deadline scope around the gather cuts the sleep at 10 s; the shielded task fails
    # at 30 s. Its failure reaches the code, as a Trio nursery raises a child's exception
    # beside the cancellation (the scope catches only its own). Before, the gather raised
    # the scope's cancellation, which the scope caught: the failure was lost.
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_branch_fails]):
            handle = await shielded_branch_fails.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == (
                "heard: NonRetryableError")


refund_attempts: list[float] = []


@aiki.task(name="refund-flaky", retry=aiki.Retry.fixed(3, 0.0))
async def refund_flaky(seconds: float) -> str:
    refund_attempts.append(trio.current_time())
    await trio.sleep(seconds)
    if len(refund_attempts) == 1:
        raise ConnectionError("the bank hung up")
    return "refunded"


@aiki.workflow(name="shielded-branch-retries", version="1")
async def shielded_branch_retries(run: aiki.WorkflowRun, _: None) -> list[Any]:
    got: list[str] = []

    async def branch() -> None:
        with run.shield():
            got.append(await refund_flaky.run(run, 30.0))

    with run.move_on_after(10) as scope:
        await run.gather(branch(), slow.run(run, 100.0))  # (the deadline cuts the task)
    return [got, scope.cancelled_caught]


async def test_a_shielded_branch_given_back_after_the_deadline_cut_its_sibling_runs_on(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    # Paused and resumed while the shielded task's first attempt runs, the run is given
    # back at its next step boundary (the worker heard the pause, not the resume): the
    # retry's start. That Release came out of the gather as the deadline scope's own
    # cancellation (its sibling, cut at 10 s), the scope caught it, and the run completed
    # with the shielded task still retrying (simulation seed 11). It is given back, and
    # the task's retry runs on its next lease.
    refund_attempts.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_branch_retries]):
            handle = await shielded_branch_retries.enqueue(client, None)
            with trio.fail_after(60):
                while not refund_attempts:
                    await trio.sleep(0.5)
            await handle.pause()
            await handle.resume()
            assert await handle.wait_for_completion(timeout=600) == [["refunded"], True]
            status = await handle.status()
    assert sorted((t.name, t.state, t.attempts) for t in status.tasks) == [
        ("refund-flaky", "completed", 2), ("slow", "failed", 1)]  # (slow: cut at 10 s)
    assert len(refund_attempts) == 2


@aiki.workflow(name="shielded-then-cut", version="1")
async def shielded_then_cut(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(10) as scope:
        with run.shield():
            got = await slow.run(run, 30.0)  # its outcome waits to ride with the next write
        await slow.run(run, 1.0)  # that write (its start) is cut by the expired deadline
    return [got, scope.cancelled_caught]


async def test_an_outcome_riding_with_a_write_the_deadline_cuts_rides_again(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """The run goes on past its deadline scope: the outcome the cut write carried is not
    known to be committed, so the run's next write carries it again, and the run never ends
    on a result the store does not hold (found by review: it completed with step 1 still
    running)."""
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_then_cut]):
            handle = await shielded_then_cut.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == ["slept 30.0", True]
    slow_steps = [s for s in await engine_store.get_steps(handle.id) if s.name == "slow"]
    # The second one's start, cut by the deadline, is recorded cut (its abandon carries it,
    # whether or not it went out: see the held-up start below).
    assert [(s.state, s.output, s.error_type) for s in slow_steps] == [
        ("completed", '"slept 30.0"', None), ("failed", '"0"', "DeadlineExceeded")]


class AwaitStepsFail(MemoryStore):
    """A memory store whose database refuses the runs' AwaitStep writes while ``failing``."""

    failing: bool = False

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        if self.failing and any(isinstance(op, AwaitStep) for op in ops):
            raise StoreUnavailable("simulated: the database is unavailable")
        return await super().apply(ops)


@aiki.workflow(name="cut-while-woken", version="1")
async def cut_while_woken(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(8) as scope:
        await run.sleep(5)  # inline: the worker waits, then asks the server
        await slow.run(run, 0.0)  # never reached: the deadline cut the sleep
    got = await slow.run(run, 1.0)
    await run.sleep(60)  # gives the slot back: the run wakes on a new lease, and replays
    return [scope.cancelled_caught, got]


async def test_a_deadline_that_cut_a_wait_the_server_ended_meanwhile_cuts_it_on_replay(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    """Seed 136: the scope's deadline passed on the worker while it retried its sleep's
    AwaitStep (the database away), and meanwhile a client's wakeup ended that sleep on the
    server. The worker went on past the scope; the abandon it sent found the sleep final and
    recorded nothing, so the replay on the next lease saw a sleep woken early, went on in
    the scope, and failed with NonDeterminismError. The expiry is recorded on the scope's
    own step, with the steps it cut short: the replay cuts the scope at the same step."""
    store = AwaitStepsFail()
    async with aiki.embedded(store, sources=sources) as client:
        async with aiki.worker(client, workflows=[cut_while_woken]):
            handle = await cut_while_woken.enqueue(client, None)
            with trio.fail_after(60):
                while not any(s.position == "1" and s.state == "running"
                              for s in await store.get_steps(handle.id)):
                    await trio.sleep(0.01)
            store.failing = True  # the worker's next ask of its sleep is refused, retried
            await trio.sleep(6.0)
            assert await handle.wakeup()  # the server ends the sleep; the worker never hears
            await trio.sleep(4.0)  # its deadline passes while it backs off
            store.failing = False
            assert await handle.wait_for_completion(timeout=600) == [True, "slept 1.0"]
            history = await handle.history()
    steps = {s.position: s for s in await store.get_steps(handle.id)}
    assert (steps["1"].kind, steps["1"].output) == ("sleep", "false")  # woken, not abandoned
    assert [s.input for s in steps.values() if s.name == "slow"] == ["1.0"]
    assert [e.detail for e in history if e.event == "deadline.expired"] == ["cut short: 1"]
    assert sum(e.event == "run.running" for e in history) == 2  # it was replayed


@aiki.workflow(name="shield-beside-a-plain-branch", version="1")
async def shield_beside_a_plain_branch(run: aiki.WorkflowRun, _: None) -> list[Any]:
    async def compensating() -> str:
        with run.shield():
            return await slow.run(run, 30.0)

    async def plain() -> str:
        for i in range(20):  # each step re-arms the deadline scope around the gather
            await slow.run(run, 1.0 + i / 1000)
        return "plain done"

    start = await run.now()
    got = None
    with run.move_on_after(10) as scope:
        got = await run.gather(compensating(), plain())
    return [got, scope.cancelled_caught, round(await run.now() - start)]


async def test_a_shielded_gather_branch_is_not_cut_by_a_sibling_rearming_the_deadline(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """Found by review: ``shield()`` lifted the deadline of the scope the gather's branches
    share, and the unshielded sibling's next step set it back, so the shielded task was cut
    at the deadline and left ``running``. The shielded branch runs to its end (30 s); the
    sibling is cut at 10 s; the gather, cut, is caught by its scope."""
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shield_beside_a_plain_branch]):
            handle = await shield_beside_a_plain_branch.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == [None, True, 30]
    steps = {s.position: s for s in await engine_store.get_steps(handle.id)}
    shielded = steps["2.0.0"]
    assert (shielded.name, shielded.state, shielded.output) == (
        "slow", "completed", '"slept 30.0"')
    # The sibling's step in flight at the deadline is recorded abandoned, not left running.
    assert all(s.state in ("completed", "failed") for s in steps.values()), steps


@aiki.workflow(name="error-group-in-a-deadline", version="1")
async def error_group_in_a_deadline(run: aiki.WorkflowRun, _: None) -> list[Any]:
    async def cleanup_fails() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ValueError("cleanup failed") from None

    child_id = None
    scope = run.move_on_after(10)
    try:
        with scope:
            child = await leaf.start_child(run, 1000.0)
            child_id = child.id
            async with trio.open_nursery() as nursery:  # the deadline cuts both
                nursery.start_soon(cleanup_fails)
                nursery.start_soon(trio.sleep_forever)
    except* ValueError:
        pass
    return [scope.cancelled_caught, child_id]


async def test_a_deadline_cut_that_leaves_an_error_group_still_cancels_its_children(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """Trio's scope takes the Cancelled out of an exception group and raises the rest: the
    scope expired all the same, and the child started in it is cancelled (found by review:
    the bookkeeping after the Trio scope's exit was skipped, and the child ran its course)."""
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[error_group_in_a_deadline, leaf]):
            handle = await error_group_in_a_deadline.enqueue(client, None)
            expired, child_id = await handle.wait_for_completion(timeout=600)
            child = await client.handle(child_id).status()
    assert expired is True
    assert child.state == "cancelled"


marks: list[tuple[str, float]] = []


@aiki.workflow(name="skewed-deadline", version="1")
async def skewed_deadline(run: aiki.WorkflowRun, _: None) -> bool:
    with run.move_on_after(100) as scope:
        marks.append(("entered", trio.current_time()))
        await run.sleep(1000)  # the run waits; the server's timer wakes it at the deadline
    marks.append(("left", trio.current_time()))
    return scope.cancelled_caught


def skewed_worker(client: aiki.Client, name: str, offset: float) -> Any:
    import random

    from aiki.actors.worker import Worker
    from aiki.sources import TrioWallClock

    clock = TrioWallClock(anchor_wall=1_700_000_000.0 + offset)
    return Worker(client.transport, client.address, [skewed_deadline], name,
                  aiki.Sources(clock, random.Random(name)), client=client)


async def test_a_deadline_recorded_on_one_worker_does_not_fire_early_on_another(
    autojump_clock: trio.abc.Clock, engine_store: Store,
) -> None:
    """The deadline is kept on the server's clock, which workers learn from its replies: a
    worker whose own clock is 50 s behind records it, one 50 s ahead replays the run when
    the server's timer wakes it; it expires 100 s after it was set (found by review: on the
    workers' own clocks it fired 50 s early, and the timer woke the run 50 s early)."""
    marks.clear()
    sources = aiki.Sources.seeded(3, aiki.sources.TrioWallClock(anchor_wall=1_700_000_000.0))
    async with aiki.embedded(engine_store, sources=sources) as client:
        handle = None
        async with trio.open_nursery() as nursery:
            behind = skewed_worker(client, "behind", -50.0)
            await nursery.start(behind.run)
            handle = await skewed_deadline.enqueue(client, None)
            with trio.fail_after(60):
                while (await handle.status()).state != "waiting":
                    await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            ahead = skewed_worker(client, "ahead", 50.0)
            await nursery.start(ahead.run)
            assert await handle.wait_for_completion(timeout=600) is True
            nursery.cancel_scope.cancel()
    entered = min(t for what, t in marks if what == "entered")
    left = max(t for what, t in marks if what == "left")
    assert 100 <= left - entered < 105, marks


@aiki.workflow(name="shielded-wait-beside-a-plain-branch", version="1")
async def shielded_wait_beside_a_plain_branch(run: aiki.WorkflowRun, _: None) -> list[Any]:
    async def waits() -> str:
        with run.shield():
            await run.sleep(1000)  # a durable wait: this branch gives its slot back
        return "slept"

    async def plain() -> str:
        for i in range(20):
            await slow.run(run, 1.0 + i / 1000)
        return "plain done"

    start = await run.now()
    with run.move_on_after(10) as scope:
        await run.gather(waits(), plain())
    return [scope.cancelled_caught, round(await run.now() - start)]


async def test_a_shielded_durable_wait_in_a_gather_outlives_its_sibling_cut_by_the_deadline(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """The shielded branch waits durably (the run is to give its slot back once every
    branch ended or waits); its sibling is cut by the deadline meanwhile. The gather does
    not end there, leaving the shielded wait behind: the run waits for it, and the scope is
    left after it (found by review: the run went on past the scope at 10 s with the sleep
    still running)."""
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[shielded_wait_beside_a_plain_branch]):
            handle = await shielded_wait_beside_a_plain_branch.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=3600) == [True, 1000]
    steps = await engine_store.get_steps(handle.id)
    assert [s.state for s in steps if s.kind == "sleep"] == ["completed"]


@aiki.workflow(name="nested-cuts", version="1")
async def nested_cuts(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(12) as outer:
        with run.move_on_after(1) as inner:
            await slow.run(run, 3.0)  # cut by the inner scope
        await slow.run(run, 20.0)  # cut by the outer one
    await run.sleep(60)  # gives the slot back: the run wakes on a new lease, and replays
    return [inner.cancelled_caught, outer.cancelled_caught]


async def test_an_outer_scope_records_only_the_steps_it_cut_itself(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    """Simulation seed 172: the outer scope listed among the steps it cut the one its inner
    scope had cut already (the worker never marked it ended), so the replay cut the outer
    scope at that step too, skipped its second task, and failed with NonDeterminismError."""
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[nested_cuts]):
            handle = await nested_cuts.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == [True, True]
    steps = {s.position: s for s in await engine_store.get_steps(handle.id)}
    assert aiki.protocol.decode_value(steps["0"].output)["cut"] == ["3"]
    assert aiki.protocol.decode_value(steps["1"].output)["cut"] == ["2"]


# -- a task start held up in the network while its deadline scope expires --------------------
class _HeldStart:
    """A worker's transport: the first StartStep of ``position`` reaches the server ``delay``
    s late (held up in the network), so what the worker sends after it arrives first."""

    def __init__(self, inner: Any, nursery: trio.Nursery, position: str, delay: float) -> None:
        self.inner, self.nursery, self.position, self.delay = inner, nursery, position, delay
        self.held = False

    async def connect(self, address: str) -> Any:
        return _HeldStartConnection(await self.inner.connect(address), self)


class _HeldStartConnection:
    def __init__(self, conn: Any, owner: _HeldStart) -> None:
        self.conn, self.owner = conn, owner

    def _hold(self, msg: Any) -> bool:
        owner = self.owner
        if (isinstance(msg, aiki.protocol.StartStep) and not owner.held
                and msg.step.position == owner.position):
            owner.held = True
            owner.nursery.start_soon(self._later, msg)
            return True
        return False

    async def _later(self, msg: Any) -> None:
        await trio.sleep(self.owner.delay)
        await self.conn.send(msg)

    def try_send(self, msg: Any) -> bool:
        return self._hold(msg) or self.conn.try_send(msg)

    async def send(self, msg: Any) -> None:
        if not self._hold(msg):
            await self.conn.send(msg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@aiki.workflow(name="start-overtaken", version="1")
async def start_overtaken(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(1) as scope:
        await slow.run(run, 20.0)  # its start is held up past the deadline
    await run.sleep(5)  # the abandon goes with this: it overtakes the start
    return [scope.cancelled_caught]


async def test_a_task_start_that_lands_after_its_scopes_abandon_is_not_left_running(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    from aiki.actors.worker import Worker

    store = MemoryStore()
    async with aiki.embedded(store, sources=sources) as client:
        async with trio.open_nursery() as nursery:
            transport = _HeldStart(client.transport, nursery, "1", 3.0)
            worker = Worker(transport, client.address, [start_overtaken], "w1", sources)
            await nursery.start(worker.run)
            handle = await start_overtaken.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == [True]
            await trio.sleep(10)  # the held start has landed
            steps = {s.position: s for s in await store.get_steps(handle.id)}
            nursery.cancel_scope.cancel()
    # (Simulation seed 166.) The abandon carried the start it cut on its way: stored failed
    # before the start arrived, which was then refused.
    assert (steps["1"].state, steps["1"].error_type) == ("failed", "DeadlineExceeded")


class SlowNestedDeadline(MemoryStore):
    """A memory store whose write of a deadline recorded at position ``slow`` takes 10 s."""

    slow = "2"

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        from aiki.store.ops import SaveStep

        if any(isinstance(op, SaveStep) and op.step.kind == "deadline"
               and op.step.position == self.slow for op in ops):
            await trio.sleep(10)
        return await super().apply(ops)


@aiki.workflow(name="cut-while-recording", version="1")
async def cut_while_recording(run: aiki.WorkflowRun, _: None) -> list[Any]:
    with run.move_on_after(5) as outer:  # its deadline: step 0
        await run.sleep(2)  # step 1
        with run.fail_after(5):  # its deadline (step 2) is recorded at the first await inside
            await slow.run(run, 0.0)  # never started: the outer deadline passes meanwhile
    got = await slow.run(run, 1.0)  # step 3, the first run
    await run.sleep(60)  # gives the slot back: the run wakes on a new lease, and replays
    return [outer.cancelled_caught, got]


async def test_a_scope_cut_while_recording_an_inner_deadline_is_cut_there_on_replay(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    """The outer scope expired while the inner scope's deadline was being recorded (a slow
    database): the inner task was never called, and step 3 went to the task after the
    scope. The replay, finding the inner task's call where the history has that one, cuts
    the outer scope there as the first run did (the simulation's seed 343: the replay
    failed with NonDeterminismError)."""
    async with aiki.embedded(SlowNestedDeadline(), sources=sources) as client:
        async with aiki.worker(client, workflows=[cut_while_recording]):
            handle = await cut_while_recording.enqueue(client, None)
            assert await handle.wait_for_completion(timeout=600) == [True, "slept 1.0"]
            claims = [e for e in await handle.history() if e.event == "run.running"]
    assert len(claims) == 2  # replayed once, after the long sleep
