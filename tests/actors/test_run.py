"""The Run actor on its own, its server replaced by a function that answers its writes."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.actors.run import run_workflow
from aiki.records import RunRecord, StepRecord
from aiki.sources import Sources, TrioWallClock

ran: list[float] = []


@aiki.task(name="charge")
async def charge(x: int) -> int:
    ran.append(trio.current_time())
    return x


@aiki.workflow(name="pay", version="1")
async def pay(run: aiki.WorkflowRun, x: int) -> int:
    return await charge.run(run, x)


def leased_run(workflow: str = "pay") -> RunRecord:
    return RunRecord("r1", workflow, "1", "5", "running", None, 1, 1, "w1", 10.0, None, None,
                     None, 0.0, 0.0, None)


async def test_a_start_acknowledged_after_the_lease_may_have_expired_runs_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The start is accepted under the lease, but its reply is held up (a stalled link) for
    # longer than a lease: meanwhile the lease expired and another worker ran the task.
    ran.clear()
    written: list[str] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        written.append(type(msg).__name__)
        if isinstance(msg, p.StartStep):
            await trio.sleep(25.0)
        return p.Ok(1)

    await run_workflow(pay, p.Assign(leased_run(), ()), persist, Sources.seeded(1),
                       lease_deadline=lambda: 10.0)
    assert ran == []
    assert written == ["StartStep"]  # abandoned: nothing more is written under that lease


async def test_a_start_acknowledged_within_the_lease_runs_the_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    ran.clear()

    async def persist(make: Any) -> Any:
        return p.Ok(1)

    await run_workflow(pay, p.Assign(leased_run(), ()), persist, Sources.seeded(1),
                       lease_deadline=lambda: 10.0)
    assert len(ran) == 1


cut: list[float] = []


@aiki.task(name="endless")
async def endless(x: int) -> int:
    try:
        await trio.sleep(10_000)
    except trio.Cancelled:
        cut.append(trio.current_time())
        raise
    return x


@aiki.workflow(name="compensate", version="1")
async def compensate(run: aiki.WorkflowRun, x: int) -> int:
    try:
        return await charge.run(run, x)
    except aiki.RunCancelled:
        with run.shield():
            await endless.run(run, x)
        return -1  # never: the shield raises RunCancelled when the grace period ends


async def test_a_shield_ends_with_the_cancels_grace_period_even_if_no_word_comes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A run being cancelled compensates inside ``run.shield()`` until its grace period
    ends (here 50 s after the assignment), on its own clock: the worker may never hear
    that the server ended the run. Then RunCancelled is raised at the shield's end, and
    the run reports it."""
    cut.clear()
    sources = Sources.seeded(1)
    written: list[Any] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        written.append(msg)
        return p.Ok(1)

    now = sources.clock.now()
    run = attrs.evolve(leased_run(), workflow="compensate", cancel_requested_at=now - 10,
                       cancel_reason="bye", cancel_deadline=now + 50)
    start = trio.current_time()
    await run_workflow(compensate, p.Assign(run, ()), persist, sources)
    assert [c - start for c in cut] == [50]
    assert [type(m).__name__ for m in written] == ["StartStep", "FailRun"]
    assert (written[-1].error_type, written[-1].error_message) == (
        "RunCancelled", "run r1 was cancelled: bye")


@aiki.task(name="takes")
async def takes(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


@aiki.workflow(name="kid", version="1")
async def kid(run: aiki.WorkflowRun, _: None) -> None:
    return None


@aiki.workflow(name="flushes", version="1")
async def flushes(run: aiki.WorkflowRun, _: None) -> None:
    async def starts_a_child() -> None:
        with run.move_on_after(5):
            await kid.start_child(run, None)
            await takes.run(run, 1000.0)  # cut at 5 s: the child is to be cancelled

    async def flushes_for_it() -> None:
        with run.move_on_after(7):
            await takes.run(run, 6.0)
            await takes.run(run, 1.0)  # its step flushes the cancel, cut at 7 s

    await run.gather(starts_a_child(), flushes_for_it())


async def test_a_childs_cancel_whose_write_a_deadline_cuts_is_sent_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A branch's step flushes the cancels an expired scope left, its sibling's included;
    its own deadline cuts the write: the cancel is not known to be committed, so the next
    flush (here the run's end) sends it again (found by review: it was taken off the list
    before its write, and lost)."""
    sent: list[str] = []
    done: list[str] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        sent.append(type(msg).__name__)
        if isinstance(msg, p.CancelRun):
            await trio.sleep(10)  # a slow write: the scope around it expires meanwhile
            done.append(msg.run_id)
        if isinstance(msg, p.StartChild):
            return p.StepResult(1, attrs.evolve(msg.step, state="completed",
                                                output=f'"{msg.child_id}"'))
        return p.Ok(1)

    run = attrs.evolve(leased_run(), workflow="flushes", payload="null")
    await run_workflow(flushes, p.Assign(run, ()), persist, Sources.seeded(1))
    assert done == ["r1/0.0.1"]
    assert sent.count("CancelRun") == 2
    assert sent[-1] == "CompleteRun"


@aiki.workflow(name="naps", version="1")
async def naps(run: aiki.WorkflowRun, _: None) -> bool:
    with run.move_on_after(5) as scope:
        await run.sleep(60)  # its first ask is slow: the scope expires while it is out
    return scope.cancelled_caught


async def test_a_wait_whose_first_ask_a_deadline_cuts_is_sent_with_the_abandon(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A sleep's first ask (AwaitStep) is on its way when its deadline scope expires: the
    abandon carries the step, as it carries a task's start on its way, so the store records
    it ended and an ask that arrives after the abandon (over a network that reorders or
    duplicates) finds it so, rather than storing it waiting in a run that has completed
    (simulation seed 2073, 20 minutes: a sleep left running after its run's end)."""
    written: list[Any] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        written.append(msg)
        if isinstance(msg, p.AwaitStep):
            await trio.sleep(10)  # a slow ask: the scope around it expires meanwhile
            return p.StepResult(1, msg.step)
        return p.Ok(1)

    run = attrs.evolve(leased_run(), workflow="naps", payload="null")
    await run_workflow(naps, p.Assign(run, ()), persist, Sources.seeded(1))
    [cut] = [m for m in written if isinstance(m, p.AbandonSteps)]
    assert cut.positions == ("1",)
    assert [(s.position, s.kind) for s in cut.starts] == [("1", "sleep")]
    [done] = [m for m in written if isinstance(m, p.CompleteRun)]
    assert done.result == "true"


@aiki.workflow(name="scoped", version="1")
async def scoped(run: aiki.WorkflowRun, x: int) -> list[Any]:
    with run.move_on_after(1000) as outer:
        with run.move_on_after(2000) as inner:
            await charge.run(run, x)  # position 2
        got = await charge.run(run, x + 1)  # never reached: the outer scope was cut above
    return [outer.cancelled_caught, inner.cancelled_caught, got if not outer.cancelled_caught
            else await charge.run(run, x + 2)]


async def replay_scoped(outer: str, inner: str, wall: float) -> list[Any]:
    """Replay ``scoped`` (payload 5) from its two deadline steps, recorded with the outputs
    ``outer`` and ``inner``, on a worker whose wall clock reads ``wall``: every write it
    sent (all acknowledged)."""
    ran.clear()
    written: list[Any] = []

    async def persist(make: Any) -> Any:
        await trio.lowlevel.checkpoint()  # (a write in flight: a cancel cuts it here)
        written.append(make(1))
        return p.Ok(1)

    recorded = tuple(StepRecord(position, "deadline", "deadline", "", "null", None,
                                "completed", 1, output=output)
                     for position, output in (("0", outer), ("1", inner)))
    await run_workflow(scoped, p.Assign(leased_run("scoped"), recorded), persist,
                       Sources.seeded(1, TrioWallClock(anchor_wall=wall)))
    return written


@pytest.mark.parametrize("wall", [1_700_000_000.0, 1_700_003_000.0],
                         ids=["before-both-deadlines", "past-both-deadlines"])
async def test_a_replay_cuts_a_scope_recorded_expired_whatever_its_clock_says(
    autojump_clock: trio.abc.Clock, wall: float,
) -> None:
    # The first execution's deadline (on its worker's clock, between the two) cut the task at
    # step 2 before its start was committed, and the run went on past the scope. Whether
    # this worker's clock says both deadlines are far off or both passed, the replay cuts
    # the outer scope there (the inner one does not catch it), as the history says, and
    # does not run the task inside.
    written = await replay_scoped('{"at": 1700001000.0, "cut": ["2"]}', "1700002000.0", wall)
    starts = [(m.step.position, m.step.input) for m in written if isinstance(m, p.StartStep)]
    assert starts == [("3", "7")]  # not the one in the scope: the one after it
    assert len(ran) == 1
    [cut] = [m for m in written if isinstance(m, p.AbandonSteps)]
    assert (cut.scope, cut.positions, cut.after) == ("0", ("2",), "3")
    [done] = [m for m in written if isinstance(m, p.CompleteRun)]
    assert done.result == "[true,false,7]"
    assert not any(isinstance(m, p.SaveStep) and m.step.kind == "deadline" for m in written)


# Two nested scopes recorded expired, replayed on a worker whose clock is past both.
# - Seed 236 (a fork's second lease): the inner scope's expiry cut step 2 before it started
#   (nothing recorded for it), and the outer one's then cut step 3. The replay used to cut
#   step 2 by the outermost expired scope, so the code skipped step 3 and went on after the
#   outer scope, diverging from the history. Each step is cut by the scope whose record
#   names it: neither step 2 nor step 3 runs, the call after the scope takes step 4.
# - Seed 522: both expired together; the inner one cut step 2, then the outer one cut the
#   next call before it took a position ("cut short: no step"), and the call after the
#   outer scope took position 3. The replay made that call at position 3 and cut it there,
#   so the code after the scope took position 4: every later step moved by one (an event
#   received at step 6 and a wait for it at step 7, for ever). It gives the position back.
@pytest.mark.parametrize(("outer", "after", "abandoned"), [
    ('{"at": 1700001000.0, "cut": ["3"]}', "4", [("1", ("2",)), ("0", ("3",))]),
    ('{"at": 1700001000.0, "cut": []}', "3", [("1", ("2",))]),
], ids=["seed-236-each-cut-named", "seed-522-outer-cut-no-step"])
async def test_a_replay_cuts_nested_scopes_recorded_expired_where_they_were_cut(
    autojump_clock: trio.abc.Clock, outer: str, after: str,
    abandoned: list[tuple[str, tuple[str, ...]]],
) -> None:
    written = await replay_scoped(outer, '{"at": 1700000500.0, "cut": ["2"]}', 1_700_003_000.0)
    starts = [(m.step.position, m.step.input) for m in written if isinstance(m, p.StartStep)]
    assert starts == [(after, "7")]  # only the call after the outer scope, where it was
    assert len(ran) == 1
    assert [(m.scope, m.positions) for m in written
            if isinstance(m, p.AbandonSteps)] == abandoned
    [done] = [m for m in written if isinstance(m, p.CompleteRun)]
    assert done.result == "[true,true,7]"


@aiki.workflow(name="napping-scopes", version="1")
async def napping_scopes(run: aiki.WorkflowRun, x: int) -> list[Any]:
    with run.move_on_after(1000) as outer:  # position 0
        with run.fail_after(2000):  # position 1
            await run.sleep(15)  # never made: the outer scope expired first
    slept = await run.sleep(6)  # position 2
    return [outer.cancelled_caught, slept, await charge.run(run, x)]  # position 3


async def test_a_replay_cuts_a_scope_where_its_record_says_the_code_after_it_went_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Seed 2878 (20 minutes): the outer scope expired while the inner one's deadline was
    being recorded, before the sleep inside took a position ("cut short: no step"); the
    sleep after the outer scope took position 2. A replay's sleep inside matched that
    record (a sleep's duration is not part of its identity), returned it as slept, and the
    code after the scope then met the task's record with a sleep: NonDeterminismError. The
    expiry records where the code after the scope went on (``after``); a call there inside
    the scope is cut, and its position given back."""
    ran.clear()
    written: list[Any] = []

    async def persist(make: Any) -> Any:
        await trio.lowlevel.checkpoint()
        written.append(make(1))
        return p.Ok(1)

    def deadline(position: str, output: str) -> StepRecord:
        return StepRecord(position, "deadline", "deadline", "", "null", None, "completed", 1,
                          output=output)

    recorded = (
        deadline("0", '{"at": 1700001000.0, "cut": [], "after": "2"}'),
        deadline("1", "1700002000.0"),  # never expired: the outer scope's expiry came first
        StepRecord("2", "sleep", "sleep", "", '{"seconds":6.0}', None, "completed", 1,
                   output="true", next_attempt_at=1700001006.0),
    )
    run = attrs.evolve(leased_run(), workflow="napping-scopes")
    await run_workflow(napping_scopes, p.Assign(run, recorded), persist,
                       Sources.seeded(1, TrioWallClock(anchor_wall=1_700_003_000.0)))
    assert [(type(m).__name__, getattr(m, "step", None) and m.step.position)
            for m in written] == [("StartStep", "3"), ("SaveStep", "3"), ("CompleteRun", None)]
    assert written[-1].result == "[true,true,5]"
    assert len(ran) == 1
