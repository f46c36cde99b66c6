"""Child runs in the store, on every store: started as a step, joined on any end, structured
(a run ends after the children it did not detach), cancelled down the tree."""

from __future__ import annotations

import json

import attrs
import pytest

from aiki.errors import AikiError, StaleLease, StepConflict
from aiki.records import StepRecord, WaitFor
from aiki.store import Lease, Store, execute
from aiki.store import ops as o
from aiki.store.machine import CASCADE_GRACE
from tests.store.test_conformance import claim, claim_one, enqueue, events, step


def child_step(position: str, name: str = "ship", payload: str = '{"p": 1}') -> StepRecord:
    return StepRecord(position, "child", name, "h-" + payload, payload, None, "running", 1)


def start(lease: Lease, position: str, *, detached: bool = False, now: float = 11.0,
          workflow: str = "wf") -> o.StartChild:
    return o.StartChild(lease, child_step(position), f"{lease.run_id}/{position}", workflow,
                        "1", '{"p": 1}', detached, now)


def join_step(position: str, child_id: str) -> StepRecord:
    return StepRecord(position, "join", child_id, "", json.dumps({"child": child_id}), None,
                      "running", 1)


async def lease_of(store: Store, run_id: str, now: float = 12.0) -> Lease:
    claimed = {c.run.id: c for c in await claim(store, now=now)}
    return claimed[run_id].lease


async def test_a_child_is_started_once_as_a_step_and_listed(store: Store) -> None:
    lease = await claim_one(store, "p")
    first = await execute(store, start(lease, "0"))
    assert (first.state, json.loads(first.output or "null")) == ("completed", "p/0")
    assert await execute(store, start(lease, "0", now=12.0)) == first  # retried: same child
    [child] = await store.get_children("p")
    assert (child.id, child.parent_id, child.detached, child.state) == ("p/0", "p", False,
                                                                       "queued")
    assert [e[1:] for e in await events(store, "p/0")] == [
        ("run.queued", 0, "w1", None, None, "version 1; child of run p at step 0")]
    assert (await events(store, "p"))[-1][1:] == (
        "child.started", 1, "w1", "0", "ship", "run p/0 (version 1)")
    other = child_step("0", "other")
    with pytest.raises(StepConflict):
        await execute(store, o.StartChild(lease, other, "p/0", "wf", "1", "{}", False, 13.0))
    with pytest.raises(StaleLease):
        await execute(store, start(Lease("p", lease.epoch - 1, "w1"), "1"))
    assert len(await store.get_children("p")) == 1


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled"])
async def test_a_waiting_parent_wakes_on_every_end_of_its_child(store: Store, end: str) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    waiting = await execute(store, o.AwaitStep(lease, join_step("1", "p/0"), 12.0))
    assert waiting.state == "running"
    await execute(store, o.WaitRun(lease, (WaitFor("1", "join", "p/0"),), "joins", 12.0))
    parent = await store.get_run("p")
    assert parent is not None and parent.state == "waiting"
    child = await lease_of(store, "p/0", 13.0)
    if end == "completed":
        await execute(store, o.CompleteRun(child, '"parcel shipped"', 14.0))
    elif end == "failed":
        await execute(store, o.FailRun(child, "ValueError", "no address", 14.0))
    else:
        await execute(store, o.CancelRun("p/0", "lost", 0.0, "c", 14.0))
    parent = await store.get_run("p")
    assert parent is not None and parent.state == "queued"
    [_, joined] = await store.get_steps("p")
    assert (joined.state, joined.output, joined.error_type, joined.error_message) == {
        "completed": ("completed", '"parcel shipped"', None, None),
        "failed": ("failed", None, "ChildFailed", "ValueError: no address"),
        "cancelled": ("failed", None, "ChildCancelled", "lost"),
    }[end]
    again = await lease_of(store, "p", 15.0)
    assert await execute(store, o.AwaitStep(again, join_step("1", "p/0"), 15.0)) == joined


async def test_a_join_of_a_finished_child_ends_at_once(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    child = await lease_of(store, "p/0")
    await execute(store, o.CompleteRun(child, "7", 13.0))
    got = await execute(store, o.AwaitStep(lease, join_step("1", "p/0"), 14.0))
    assert (got.state, got.output) == ("completed", "7")


async def test_a_run_whose_function_returned_waits_for_its_children(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, start(lease, "1", detached=True))
    run = await execute(store, o.CompleteRun(lease, '"all sent"', 12.0))
    assert (run.state, run.result, run.finished_at) == ("waiting", '"all sent"', None)
    [wait] = await store.get_waits("p")
    assert wait.kind == "children"
    child = await lease_of(store, "p/0", 13.0)
    await execute(store, o.CompleteRun(child, "1", 14.0))
    run = await store.get_run("p")
    assert run is not None and (run.state, run.result, run.finished_at) == (
        "completed", '"all sent"', 14.0)
    detached = await store.get_run("p/1")
    assert detached is not None and detached.state == "running"  # it outlives its parent
    ends = {e.run_id: e.seq for r in ("p", "p/0") for e in await store.get_history(r)
            if e.event in ("run.completed",)}
    assert ends["p/0"] < ends["p"]


async def test_ends_of_a_child_and_of_runs_with_no_parent_in_one_busy_batch(
    store: Store,
) -> None:
    """A child's end wakes its parent in a batch whose other runs' outcomes and ends go
    together (PostgreSQL writes those in one statement, and moves nothing across the
    child's end), and a run that returned with a child running waits for it."""
    await store.apply([enqueue("p"), enqueue("r2"), enqueue("r3")])
    leases = {c.run.id: c.lease for c in await claim(store, now=10.0)}
    p, r2, r3 = leases["p"], leases["r2"], leases["r3"]
    await execute(store, start(p, "0"))
    await execute(store, start(p, "1"))
    await execute(store, o.AwaitStep(p, join_step("2", "p/0"), 11.0))
    await execute(store, o.WaitRun(p, (WaitFor("2", "join", "p/0"),), "joins", 11.0))
    child = await lease_of(store, "p/0")
    await store.apply([o.StartStep(r2, step("0", state="running"), 12.0),
                       o.StartStep(r3, step("0", state="running"), 12.0)])
    outcomes = await store.apply([
        o.SaveStep(r2, step("0"), 13.0),
        o.CompleteRun(child, '"shipped"', 13.0),
        o.StartStep(r2, step("1", state="running"), 13.0),
        o.SaveStep(r3, step("0"), 13.0), o.CompleteRun(r3, '"r3"', 13.0),
        o.CompleteRun(r3, '"again"', 13.0),  # its lease ended with it: refused
    ])
    assert [type(x).__name__ if isinstance(x, AikiError) else getattr(x, "state", x)
            for x in outcomes] == [True, "completed", True, True, "completed", "StaleLease"]
    parent = await store.get_run("p")
    assert parent is not None and parent.state == "queued"
    joined = (await store.get_steps("p"))[-1]
    assert (joined.position, joined.state, joined.output) == ("2", "completed", '"shipped"')
    assert await store.get_waits("p") == ()
    r3_run = await store.get_run("r3")
    assert r3_run is not None and (r3_run.state, r3_run.result) == ("completed", '"r3"')
    # The parent again, and r2: the parent's function returns while p/1 runs.
    again = await lease_of(store, "p", 14.0)
    outcomes = await store.apply([
        o.SaveStep(r2, step("1"), 15.0), o.CompleteRun(again, '"sent"', 15.0),
        o.CompleteRun(r2, '"r2"', 15.0)])
    assert [getattr(x, "state", x) for x in outcomes] == [True, "waiting", "completed"]
    [wait] = await store.get_waits("p")
    assert wait.kind == "children"
    assert [e[1] for e in await events(store, "r2")][-2:] == ["task.completed",
                                                             "run.completed"]


async def test_a_failed_run_cancels_its_tree_and_ends_after_it(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, start(lease, "1", detached=True))
    child = await lease_of(store, "p/0")
    await execute(store, start(child, "0"))  # a grandchild, never run
    run = await execute(store, o.FailRun(lease, "E", "boom", 13.0))
    assert run.state == "waiting"
    grandchild = await store.get_run("p/0/0")
    assert grandchild is not None and grandchild.state == "cancelled"
    middle = await store.get_run("p/0")
    assert middle is not None and (middle.state, middle.cancel_reason) == (
        "queued", "its parent run p failed")
    with pytest.raises(StaleLease):  # the child's old lease is revoked
        await execute(store, o.SaveStep(child, step("1"), 14.0))
    again = await lease_of(store, "p/0", 15.0)
    await execute(store, o.FailRun(again, "RunCancelled", "cancelled", 16.0))
    run = await store.get_run("p")
    assert run is not None and (run.state, run.error_type, run.error_message) == (
        "failed", "E", "boom")
    detached = await store.get_run("p/1")
    assert detached is not None and detached.state == "running"  # untouched
    assert detached.cancel_requested_at is None


async def test_a_cancel_reaches_every_descendant_the_deepest_ending_first(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, start(lease, "1"))
    await execute(store, start(lease, "2", detached=True))
    child = await lease_of(store, "p/0")
    await execute(store, start(child, "0"))
    out = await execute(store, o.CancelRun("p", "stop", 0.0, "c", 14.0))
    assert out.cancelled and out.holder == "w1" and [r for r, _ in out.revoked] == ["p/1", "p/0"]
    states = {r: (await store.get_run(r)).state  # type: ignore[union-attr]
              for r in ("p", "p/0", "p/1", "p/0/0", "p/2")}
    assert states == {"p": "cancelled", "p/0": "cancelled", "p/1": "cancelled",
                      "p/0/0": "cancelled", "p/2": "running"}
    ended = {r: e.seq for r in states for e in await store.get_history(r)
             if e.event == "run.cancelled"}
    assert ended["p/0/0"] < ended["p/0"] < ended["p"] and ended["p/1"] < ended["p"]


async def test_a_cancel_with_no_grace_ends_the_run_after_children_still_being_cancelled(
        store: Store) -> None:
    """Seed 15319: a child whose function failed waits for its own child, which that
    failure's cascade gave a grace period; a cancel of the parent with no grace leaves
    that grace as it was. The parent ended at once, before its child: it now waits for
    it, its lease revoked, and the timer's pass at its deadline (now) ends the three, the
    deepest first."""
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    child = await lease_of(store, "p/0")
    await execute(store, start(child, "0"))
    await lease_of(store, "p/0/0", 13.0)  # the grandchild runs: a cancel gives it its grace
    assert (await execute(store, o.FailRun(child, "ChildFailed", "boom", 14.0))
            ).state == "waiting"
    grandchild = await store.get_run("p/0/0")
    assert grandchild is not None and grandchild.cancel_deadline == 14.0 + CASCADE_GRACE
    out = await execute(store, o.CancelRun("p", "stop", 0.0, "c", 15.0))
    assert out.cancelled and out.holder == "w1"
    states = {r: (await store.get_run(r)).state  # type: ignore[union-attr]
              for r in ("p", "p/0", "p/0/0")}
    assert states == {"p": "waiting", "p/0": "waiting", "p/0/0": "queued"}
    with pytest.raises(StaleLease):  # its function is given up
        await execute(store, o.SaveStep(lease, step("1"), 15.0))
    [*ended] = await execute(store, o.EndCancels(15.0))
    assert [(r.id, r.state) for r in ended] == [
        ("p/0/0", "cancelled"), ("p/0", "cancelled"), ("p", "cancelled")]
    seqs = {r: e.seq for r in states for e in await store.get_history(r)
            if e.event == "run.cancelled"}
    assert seqs["p/0/0"] < seqs["p/0"] < seqs["p"]


async def test_a_cancel_with_grace_lets_the_tree_compensate_then_the_timer_ends_it(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    child = await lease_of(store, "p/0")
    out = await execute(store, o.CancelRun("p", "stop", 10.0, "c", 14.0))
    assert out.revoked == (("p/0", child.epoch),)  # the lease revoked: its epoch
    for run_id in ("p", "p/0"):
        run = await store.get_run(run_id)
        assert run is not None and (run.state, run.cancel_deadline) == ("queued", 24.0)
    claimed = {c.run.id: c.lease for c in await claim(store, now=15.0)}
    # The parent's function ends first: it waits for its child to end.
    assert (await execute(store, o.FailRun(claimed["p"], "RunCancelled", "stop", 16.0))
            ).state == "waiting"
    [*ended] = await execute(store, o.EndCancels(24.0))
    assert [r.id for r in ended] == ["p/0", "p"]
    assert all(r.state == "cancelled" for r in ended)


async def test_steps_of_an_expired_deadline_scope_are_abandoned(store: Store) -> None:
    from tests.store.test_conformance import wait_step

    lease = await claim_one(store, "p")
    await execute(store, o.SaveStep(lease, step("0"), 11.0))
    await execute(store, o.StartStep(lease, step("1", "ship", "running"), 11.0))
    await execute(store, o.AwaitStep(lease, wait_step("2", "event", "go", None, None), 11.0))
    await execute(store, o.AbandonSteps(lease, ("0", "1", "2", "9"), "3", 12.0))
    done, task, wait = await store.get_steps("p")
    assert done == step("0")  # final already: kept
    for s in (task, wait):
        assert (s.state, s.error_type, s.output) == ("failed", "DeadlineExceeded", '"3"')
    assert [e[1] for e in await events(store, "p")][-2:] == ["task.failed", "event.abandoned"]
    # The abandoned wait takes no event: it is buffered for the next wait.
    sent = await execute(store, o.SendEvent("p", "go", '"x"', None, 13.0))
    assert sent.delivered is False
    with pytest.raises(StaleLease):
        await execute(store, o.AbandonSteps(Lease("p", 0, "w1"), ("1",), "3", 14.0))


async def test_a_task_start_its_scope_cut_on_the_way_is_refused_if_it_lands_after_the_expiry(
        store: Store) -> None:
    """Seed 166: the start of a task was held up; the scope's deadline passed; its abandon,
    sent after, was applied first and found no step; then the start arrived and left the
    step running under a scope that had ended (the run completed past it). The abandon now
    carries the starts it cut on their way: one not stored is stored failed, and the late
    start is refused."""
    from aiki.records import deadline_expiry

    lease = await claim_one(store, "p")
    deadline = StepRecord("0", "deadline", "deadline", "", "null", None, "completed", 1,
                          output="1000.5")
    await execute(store, o.SaveStep(lease, deadline, 11.0))
    held_up = step("1", "slow", "running", output=None)
    await execute(store, o.AbandonSteps(lease, ("1",), "0", 13.0, (held_up,)))
    [cut] = [s for s in await store.get_steps("p") if s.position == "1"]
    assert (cut.name, cut.state, cut.error_type, cut.output) == (
        "slow", "failed", "DeadlineExceeded", '"0"')
    assert deadline_expiry({s.position: s for s in await store.get_steps("p")}["0"]) == (
        1000.5, ("1",))
    with pytest.raises(StepConflict):
        await execute(store, o.StartStep(lease, held_up, 14.0))
    [after] = [s for s in await store.get_steps("p") if s.position == "1"]
    assert after == cut
    # A start that had landed (stored running) is abandoned as before, not replaced.
    running = step("2", "fast", "running", output=None)
    await execute(store, o.StartStep(lease, running, 15.0))
    await execute(store, o.AbandonSteps(lease, ("2",), "0", 16.0, (running,)))
    [two] = [s for s in await store.get_steps("p") if s.position == "2"]
    assert (two.state, two.error_type) == ("failed", "DeadlineExceeded")


async def test_a_waits_first_ask_its_scope_cut_on_the_way_finds_it_ended_if_it_lands_after(
        store: Store) -> None:
    """Seed 2073 (20 minutes): a sleep's first ask was on its way when its scope expired;
    the abandon, applied first, found no step, and the ask then stored the sleep waiting
    in a run that went on to complete. The abandon carries the wait's first ask as it
    carries a task's start: stored ended, and the late ask finds it so."""
    from tests.store.test_conformance import wait_step

    lease = await claim_one(store, "p")
    deadline = StepRecord("0", "deadline", "deadline", "", "null", None, "completed", 1,
                          output="1000.5")
    await execute(store, o.SaveStep(lease, deadline, 11.0))
    held_up = wait_step("1", "sleep", "sleep", 60.0, 2000.0)
    await execute(store, o.AbandonSteps(lease, ("1",), "0", 13.0, (held_up,)))
    [cut] = [s for s in await store.get_steps("p") if s.position == "1"]
    assert (cut.kind, cut.state, cut.error_type, cut.output) == (
        "sleep", "failed", "DeadlineExceeded", '"0"')
    late = await execute(store, o.AwaitStep(lease, held_up, 14.0))
    assert late == cut
    [after] = [s for s in await store.get_steps("p") if s.position == "1"]
    assert after == cut
    assert [e[1] for e in await events(store, "p")].count("sleep.waiting") == 0


async def test_the_expiry_of_a_deadline_scope_is_recorded_with_the_steps_it_cut(
        store: Store) -> None:
    """On the scope's own step, with every position it cut short: one final already (a
    sleep woken on the server while the worker's deadline passed: seed 136) and one never
    recorded (its start write cut), so a replay cuts the scope at the same place."""
    from aiki.records import deadline_after, deadline_expiry
    from tests.store.test_conformance import wait_step

    lease = await claim_one(store, "p")
    deadline = StepRecord("0", "deadline", "deadline", "", "null", None, "completed", 1,
                          output="1000.5")
    await execute(store, o.SaveStep(lease, deadline, 11.0))
    sleep = wait_step("1", "sleep", "sleep", 40.0, 51.0)
    await execute(store, o.AwaitStep(lease, sleep, 11.0))
    assert await execute(store, o.Wakeup("p", 12.0))  # the sleep ends on the server
    await execute(store, o.AbandonSteps(lease, ("1", "2"), "0", 13.0, after="4"))
    steps = {s.position: s for s in await store.get_steps("p")}
    assert (steps["1"].state, steps["1"].output, steps["1"].error_type) == (
        "completed", "false", None)  # final: kept as it ended
    assert "2" not in steps
    assert deadline_expiry(steps["0"]) == (1000.5, ("1", "2"))
    assert deadline_after(steps["0"]) == "4"  # where the code after the scope went on
    assert deadline_expiry(deadline) == (1000.5, None)
    assert (await events(store, "p"))[-1][1:] == (
        "deadline.expired", 1, "w1", "0", "deadline", "cut short: 1, 2")
    # Sent again (its reply lost) it changes nothing; a later cut adds its positions (and
    # keeps where the first expiry said the code after the scope went on).
    count = len(await events(store, "p"))
    await execute(store, o.AbandonSteps(lease, ("2", "1"), "0", 14.0, after="4"))
    assert len(await events(store, "p")) == count
    await execute(store, o.AbandonSteps(lease, ("3",), "0", 15.0, after="9"))
    steps = {s.position: s for s in await store.get_steps("p")}
    assert deadline_expiry(steps["0"]) == (1000.5, ("1", "2", "3"))
    assert deadline_after(steps["0"]) == "4"
    # A fork keeps the expiry only where it cut within the steps it copies: after them, the
    # steps run afresh and decide afresh whether the scope expires over them.
    await execute(store, o.SaveStep(lease, attrs.evolve(step("4"), name="after"), 16.0))
    await execute(store, o.ForkRun("p", "f2", 2, None, "c", 17.0))
    await execute(store, o.ForkRun("p", "f1", 1, None, "c", 17.0))
    await execute(store, o.ForkRun("p", "f3", 3, None, "c", 17.0))
    copies = {f: {s.position: s for s in await store.get_steps(f)} for f in ("f1", "f2", "f3")}
    assert deadline_expiry(copies["f1"]["0"]) == (1000.5, None)
    assert copies["f1"]["0"].output == "1000.5"
    assert deadline_expiry(copies["f2"]["0"]) == (1000.5, ("1",))
    assert deadline_after(copies["f2"]["0"]) == "4"
    assert deadline_expiry(copies["f3"]["0"]) == (1000.5, ("1", "2", "3"))  # 0, 1 and 4
    # Nothing was in flight when it expired: the expiry is recorded all the same.
    await execute(store, enqueue("q"))
    lease_q = await lease_of(store, "q")
    await execute(store, o.SaveStep(lease_q, attrs.evolve(deadline, output="7.0"), 11.0))
    await execute(store, o.AbandonSteps(lease_q, (), "0", 12.0))
    [only] = await store.get_steps("q")
    assert deadline_expiry(only) == (7.0, ())
    assert deadline_after(only) is None  # (not said: a worker before it was recorded)
    with pytest.raises(StaleLease):
        await execute(store, o.AbandonSteps(Lease("q", 0, "w1"), ("1",), "0", 14.0))


# -- a paused tree: the pause holds a run's end, a cancel does not ----------------------------
async def test_a_parent_paused_while_awaiting_its_last_child_ends_when_resumed(
        store: Store) -> None:
    """Its function returned, it waits for its child; paused; the child ends while it is
    paused: it stays paused (a pause holds its end), and ends at once when resumed (no
    child is left to wake it)."""
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, o.CompleteRun(lease, '"sent"', 12.0))
    await execute(store, o.PauseRun("p", "ops", 13.0))
    child = await lease_of(store, "p/0", 14.0)
    await execute(store, o.CompleteRun(child, "1", 15.0))
    run = await store.get_run("p")
    assert run is not None and run.state == "paused"
    first = await store.apply([o.ResumeRun("p", "ops", 16.0, "id-9")])
    assert [r.id for r in getattr(first, "ended", ())] == ["p"]
    resumed = first[0].run
    assert (resumed.state, resumed.result, resumed.finished_at) == ("completed", '"sent"', 16.0)
    assert [e[1] for e in await events(store, "p")][-3:] == [
        "run.paused", "run.waiting", "run.completed"]
    # The same resume sent again (its reply lost) ends nothing more: nothing is counted twice.
    again = await store.apply([o.ResumeRun("p", "ops", 17.0, "id-9")])
    assert getattr(again, "ended", None) == ()


async def test_a_parent_paused_while_awaiting_children_still_waits_for_them_when_resumed(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, start(lease, "1"))
    await claim(store, now=11.5)  # the children run
    await execute(store, o.FailRun(lease, "E", "boom", 12.0))  # they are cancelled, with grace
    await execute(store, o.PauseRun("p", "ops", 13.0))
    claimed = {c.run.id: c.lease for c in await claim(store, now=14.0)}
    await execute(store, o.FailRun(claimed["p/0"], "RunCancelled", "x", 15.0))
    resumed = (await execute(store, o.ResumeRun("p", "ops", 16.0))).run
    assert resumed.state == "waiting"  # p/1 is still unfinished
    await execute(store, o.FailRun(claimed["p/1"], "RunCancelled", "x", 17.0))
    run = await store.get_run("p")
    assert run is not None and (run.state, run.error_type) == ("failed", "E")


async def test_a_paused_run_nobody_holds_is_cancelled_at_once_with_its_children(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, o.WaitRun(lease, (WaitFor("1", "sleep", None, 99.0),), "sleeps", 12.0))
    await execute(store, o.PauseRun("p", "ops", 13.0))
    out = await execute(store, o.CancelRun("p", "gone", 30.0, "c", 14.0))
    assert (out.cancelled, out.holder, out.revoked) == (True, None, ())
    run = await store.get_run("p")
    assert run is not None and (run.state, run.error_message, run.finished_at) == (
        "cancelled", "gone", 14.0)
    assert await store.get_waits("p") == ()
    child = await store.get_run("p/0")
    assert child is not None and child.state == "cancelled"  # never ran: at once too


async def test_a_paused_run_whose_child_is_held_ends_cancelled_after_that_child(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, o.WaitRun(lease, (WaitFor("1", "join", "p/0"),), "joins", 12.0))
    child = await lease_of(store, "p/0", 13.0)
    await execute(store, o.PauseRun("p", "ops", 13.0))
    out = await execute(store, o.CancelRun("p", "gone", 30.0, "c", 14.0))
    assert (out.cancelled, out.holder, [r for r, _ in out.revoked]) == (True, None, ["p/0"])
    run = await store.get_run("p")
    assert run is not None and run.state == "waiting"  # for its child's grace period
    assert [w.kind for w in await store.get_waits("p")] == ["children"]
    again = await lease_of(store, "p/0", 15.0)
    with pytest.raises(StaleLease):
        await execute(store, o.CompleteRun(child, "1", 15.0))
    await execute(store, o.FailRun(again, "RunCancelled", "gone", 16.0))
    run = await store.get_run("p")
    assert run is not None and (run.state, run.error_message, run.finished_at) == (
        "cancelled", "gone", 16.0)


async def test_a_paused_run_awaiting_children_is_cancelled_with_them(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, o.CompleteRun(lease, '"sent"', 12.0))
    await execute(store, o.PauseRun("p", "ops", 13.0))
    out = await execute(store, o.CancelRun("p", "gone", 30.0, "c", 14.0))
    assert out.cancelled
    for run_id in ("p/0", "p"):  # the child never ran: both end at once
        run = await store.get_run(run_id)
        assert run is not None and run.state == "cancelled", run_id


async def test_a_paused_run_awaiting_children_that_ended_is_cancelled_at_once(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await execute(store, o.CompleteRun(lease, '"sent"', 12.0))
    await execute(store, o.PauseRun("p", "ops", 13.0))
    child = await lease_of(store, "p/0", 14.0)
    await execute(store, o.CompleteRun(child, "1", 15.0))
    await execute(store, o.CancelRun("p", "gone", 30.0, "c", 16.0))
    run = await store.get_run("p")
    assert run is not None and (run.state, run.finished_at) == ("cancelled", 16.0)


async def test_a_held_paused_run_cancelled_cascades_and_ends_at_its_grace(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    await lease_of(store, "p/0", 12.0)
    await execute(store, o.PauseRun("p", "ops", 12.0))  # its worker still holds it
    out = await execute(store, o.CancelRun("p", "gone", 5.0, "c", 13.0))
    assert (out.holder, [r for r, _ in out.revoked]) == ("w1", ["p/0"])
    run = await store.get_run("p")
    assert run is not None and run.state == "paused"
    [*ended] = await execute(store, o.EndCancels(18.0))
    assert [(r.id, r.state) for r in ended] == [("p/0", "cancelled"), ("p", "cancelled")]


async def test_a_batch_notes_the_leases_a_failed_parent_revoked_and_their_deadline(
        store: Store) -> None:
    # The server tells the children's workers from what the commit noted, not from the
    # request that failed the parent (which its connection's loss may cut short).
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    child = await lease_of(store, "p/0")
    await execute(store, start(lease, "1"))  # queued, never run: cancelled, not revoked
    out = await store.apply([o.FailRun(lease, "E", "boom", 13.0)])
    assert isinstance(out, o.Outcomes)
    assert out.revoked == (("p/0", child.epoch, "its parent run p failed"),)
    assert out.due == 13.0 + CASCADE_GRACE
    assert [r.id for r in out.ended] == ["p/1"]  # (never ran: cancelled at once)


async def test_a_batch_notes_the_leases_a_cancel_revoked_the_runs_own_first(
        store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, start(lease, "0"))
    child = await lease_of(store, "p/0")
    out = await store.apply([o.CancelRun("p", "stop", 10.0, "c", 14.0)])
    assert isinstance(out, o.Outcomes)
    assert sorted(out.revoked) == [("p", lease.epoch, "stop"), ("p/0", child.epoch, "stop")]
    assert (out.due, out.ended) == (24.0, ())


async def test_a_batch_that_cancels_nothing_notes_nothing(store: Store) -> None:
    lease = await claim_one(store, "p")
    await execute(store, o.CompleteRun(lease, '"done"', 13.0))
    out = await store.apply([o.CancelRun("p", "stop", 10.0, "c", 14.0),
                             o.FailRun(lease, "E", "boom", 15.0)])
    assert isinstance(out, o.Outcomes)
    assert (out.revoked, out.due, out.ended) == ((), None, ())
