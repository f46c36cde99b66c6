"""Supervisor: readiness, one-for-one restarts, backoff and intensity in virtual time,
restart policies, dynamic children, nesting, cancellation."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from aiki.actors.supervisor import ChildSpec, Supervisor, SupervisorEscalation
from aiki.errors import AikiError

Start = Callable[..., Awaitable[None]]


class Boom(Exception):
    pass


def flaky(log: list[float], *, failures: int, after: float = 0.0) -> Start:
    """A child that fails ``failures`` times (``after`` seconds after starting), then serves
    forever. Each start appends the current virtual time to ``log``."""

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        log.append(trio.current_time())
        task_status.started()
        await trio.sleep(after)
        if len(log) <= failures:
            raise Boom(f"boom {len(log)}")
        await trio.sleep_forever()

    return child


class Ticker:
    """A healthy sibling: counts its starts, ticks every second, records its cleanup."""

    def __init__(self) -> None:
        self.starts = 0
        self.ticks = 0
        self.cleaned_up = 0

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.starts += 1
        task_status.started()
        try:
            while True:
                await trio.sleep(1)
                self.ticks += 1
        finally:
            self.cleaned_up += 1


async def test_children_start_in_order_and_are_ready_when_run_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[str] = []

    def slow_starter(name: str, delay: float) -> Start:
        async def child(*, task_status: trio.TaskStatus[None]) -> None:
            events.append(f"{name} starting")
            await trio.sleep(delay)
            events.append(f"{name} ready")
            task_status.started()
            await trio.sleep_forever()

        return child

    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("a", slow_starter("a", 2)),
                                      ChildSpec("b", slow_starter("b", 1))])
        events.append("supervisor ready")
        assert sup.children == ("a", "b")
        nursery.cancel_scope.cancel()
    assert events == ["a starting", "a ready", "b starting", "b ready", "supervisor ready"]
    assert trio.current_time() == pytest.approx(3)


async def test_crashed_child_is_restarted_and_its_sibling_keeps_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    ticker = Ticker()
    sup = Supervisor("root", backoff_initial=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("ticker", ticker.run),
                                      ChildSpec("flaky", flaky(starts, failures=1, after=2.5))])
        await trio.sleep(10.5)  # off the tick times: equal deadlines wake in any order
        nursery.cancel_scope.cancel()
    assert starts == [0, pytest.approx(3.0)]  # failed at 2.5, restarted after 0.5 backoff
    assert sup.restarts == 1
    assert [(name, str(exc)) for name, exc in sup.failures] == [("flaky", "boom 1")]
    assert isinstance(sup.first_failure, Boom)
    assert ticker.starts == 1 and ticker.ticks == 10  # untouched by its sibling's crash
    assert ticker.cleaned_up == 1


async def test_backoff_doubles_up_to_the_maximum(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []
    sup = Supervisor("root", max_restarts=10, within=100,
                     backoff_initial=0.1, backoff_max=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("flaky", flaky(starts, failures=5))])
        await trio.sleep(50)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert sup.restarts == 5


async def test_backoff_resets_after_the_child_stayed_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(0 if len(starts) != 3 else 20)  # the third run stays up a while
        raise Boom("again")

    sup = Supervisor("root", max_restarts=10, within=10, backoff_initial=1, backoff_max=100)
    with trio.move_on_after(30):
        await sup.run([ChildSpec("c", child)])
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == pytest.approx([1, 2, 21, 2])


async def test_past_the_intensity_the_supervisor_escalates_with_the_first_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    ticker = Ticker()
    sup = Supervisor("root", max_restarts=3, within=5, backoff_initial=0.1)
    with pytest.raises(SupervisorEscalation) as info:
        await sup.run([ChildSpec("ticker", ticker.run),
                       ChildSpec("flaky", flaky(starts, failures=100))])
    error = info.value
    assert len(starts) == 4 and sup.restarts == 3  # the fourth failure was one too many
    assert str(error.first_failure) == "boom 1"
    assert error.__cause__ is error.first_failure is sup.first_failure
    assert error.supervisor == "root" and error.child == "flaky"
    message = str(error)
    assert "'root'" in message and "'flaky'" in message and "boom 1" in message
    assert isinstance(error, AikiError)
    assert ticker.cleaned_up == 1  # siblings were cancelled, their cleanup ran
    assert sup.children == ()


async def test_failures_spread_over_time_never_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    sup = Supervisor("root", max_restarts=1, within=5, backoff_initial=0.1)
    with trio.move_on_after(100):
        await sup.run([ChildSpec("flaky", flaky(starts, failures=1000, after=6))])
    assert sup.restarts == len(starts) - 1 >= 15


async def test_the_failing_streak_restarts_after_a_quiet_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(20 if len(starts) == 2 else 0)  # quiet, then a burst
        raise Boom(f"boom {len(starts)}")

    sup = Supervisor("root", max_restarts=2, within=5, backoff_initial=0.1)
    with pytest.raises(SupervisorEscalation) as info:
        await sup.run([ChildSpec("c", child)])
    assert str(info.value.first_failure) == "boom 2"


async def test_transient_child_returning_normally_is_not_restarted() -> None:
    runs: list[str] = []

    async def done(*, task_status: trio.TaskStatus[None]) -> None:
        runs.append("done")
        task_status.started()

    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("t", done, restart="transient")])
        await trio.testing.wait_all_tasks_blocked()
        assert sup.children == ()
        nursery.cancel_scope.cancel()
    assert runs == ["done"] and sup.restarts == 0 and sup.failures == []


async def test_transient_child_raising_is_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("t", flaky(starts, failures=1),
                                                restart="transient")])
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(starts) == 2 and sup.restarts == 1


async def test_permanent_child_returning_is_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[float] = []

    async def once(*, task_status: trio.TaskStatus[None]) -> None:
        runs.append(trio.current_time())
        task_status.started()
        if len(runs) == 1:
            return
        await trio.sleep_forever()

    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("p", once)])
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(runs) == 2 and sup.restarts == 1
    assert "returned" in str(sup.failures[0][1])


async def test_temporary_child_is_never_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("tmp", flaky(starts, failures=5),
                                                restart="temporary")])
        await trio.sleep(10)
        assert sup.children == ()
        nursery.cancel_scope.cancel()
    assert len(starts) == 1 and sup.restarts == 0
    assert [name for name, _ in sup.failures] == ["tmp"]


async def test_start_child_and_stop_child(autojump_clock: trio.testing.MockClock) -> None:
    session = Ticker()
    sup = Supervisor("sessions")
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start_child(ChildSpec("s1", session.run))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [])
        await sup.start_child(ChildSpec("s1", session.run, restart="temporary"))
        assert session.starts == 1 and sup.children == ("s1",)
        with pytest.raises(ValueError, match="'s1'"):
            await sup.start_child(ChildSpec("s1", session.run))
        await trio.sleep(3.5)
        assert sup.stop_child("s1")
        assert not sup.stop_child("s1")
        assert not sup.stop_child("nobody")
        await trio.testing.wait_all_tasks_blocked()
        assert session.cleaned_up == 1 and session.ticks == 3
        assert not sup.children
        # the name is free again
        await sup.start_child(ChildSpec("s1", session.run))
        assert session.starts == 2
        nursery.cancel_scope.cancel()
    assert session.cleaned_up == 2 and sup.restarts == 0


async def test_stop_child_during_its_backoff_stops_it_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    sup = Supervisor("root", backoff_initial=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [ChildSpec("flaky", flaky(starts, failures=10, after=1))])
        await trio.sleep(2)  # failed at 1, waiting until 6 to restart
        assert sup.stop_child("flaky")
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert starts == [0] and sup.restarts == 0


async def test_a_dynamic_child_failing_to_start_raises_from_start_child() -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise Boom("no port")

    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [])
        with pytest.raises(Boom, match="no port"):
            await sup.start_child(ChildSpec("b", broken))
        assert sup.children == ()
        await sup.start_child(ChildSpec("t", Ticker().run))  # the supervisor still serves
        nursery.cancel_scope.cancel()


async def test_a_child_failing_to_start_fails_the_supervisor() -> None:
    first = Ticker()

    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise Boom("cannot bind")

    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        with pytest.raises(SupervisorEscalation) as info:
            await nursery.start(sup.run, [ChildSpec("first", first.run),
                                          ChildSpec("broken", broken),
                                          ChildSpec("never", Ticker().run)])
    assert isinstance(info.value.first_failure, Boom)
    assert "'broken' failed to start" in str(info.value)
    assert first.starts == 1 and first.cleaned_up == 1


async def test_nested_supervisor_escalation_is_one_failure_of_the_parent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    sibling = Ticker()
    inner = Supervisor("inner", max_restarts=1, within=5, backoff_initial=0.1)
    outer = Supervisor("outer", max_restarts=3, within=5, backoff_initial=1)
    inner_children = [ChildSpec("flaky", flaky(starts, failures=2))]
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run, [
            ChildSpec("sibling", sibling.run),
            ChildSpec("inner", functools.partial(inner.run, inner_children)),
        ])
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    # inner: fail, restart, fail again -> escalates; outer restarts inner once, then all is well
    assert len(starts) == 3 and inner.restarts == 1
    assert outer.restarts == 1
    assert len(outer.failures) == 1
    name, error = outer.failures[0]
    assert name == "inner" and isinstance(error, SupervisorEscalation)
    assert str(error.first_failure) == "boom 1"
    assert sibling.starts == 1 and sibling.ticks == 10


async def test_nested_escalation_past_the_parents_intensity_reaches_the_top(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    inner = Supervisor("inner", max_restarts=0)
    outer = Supervisor("outer", max_restarts=1, within=5)
    inner_children = [ChildSpec("flaky", flaky(starts, failures=1000))]
    with pytest.raises(SupervisorEscalation) as info:
        await outer.run([ChildSpec("inner", functools.partial(inner.run, inner_children))])
    assert info.value.child == "inner"
    inner_error = info.value.first_failure
    assert isinstance(inner_error, SupervisorEscalation)
    assert str(inner_error.first_failure) == "boom 1"
    assert len(starts) == 2


async def test_cancelling_the_supervisor_cancels_every_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    top, nested = Ticker(), Ticker()
    starts: list[float] = []
    inner = Supervisor("inner")
    outer = Supervisor("outer", backoff_initial=100, backoff_max=100)
    with trio.move_on_after(5.5):
        await outer.run([
            ChildSpec("top", top.run),
            ChildSpec("inner", functools.partial(inner.run, [ChildSpec("n", nested.run)])),
            ChildSpec("flaky", flaky(starts, failures=10, after=1)),  # cancelled in its backoff
        ])
    assert top.cleaned_up == 1 and nested.cleaned_up == 1
    assert top.ticks == nested.ticks == 5
    assert starts == [0] and outer.restarts == 0
    assert outer.children == () and inner.children == ()


async def test_base_exceptions_are_not_supervised() -> None:
    sibling = Ticker()

    async def interrupted(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    sup = Supervisor("root")
    with pytest.raises(BaseExceptionGroup) as info:
        await sup.run([ChildSpec("s", sibling.run), ChildSpec("k", interrupted)])
    matched, _ = info.value.split(KeyboardInterrupt)
    assert matched is not None
    assert sup.restarts == 0 and sup.failures == [] and sibling.cleaned_up == 1


async def test_failures_are_bounded_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    starts: list[float] = []
    sup = Supervisor("root", max_restarts=1000, within=1, backoff_initial=0.01,
                     backoff_max=0.01)
    with caplog.at_level(logging.WARNING, logger="aiki.supervisor"):
        with trio.move_on_after(2 - 0.001):
            await sup.run([ChildSpec("flaky", flaky(starts, failures=1000))])
    assert sup.restarts == 199
    assert len(sup.failures) == 100
    assert str(sup.failures[-1][1]) == "boom 200" and str(sup.failures[0][1]) == "boom 101"
    failed = [r for r in caplog.records if r.name == "aiki.supervisor" and "failed" in r.message]
    assert failed and "'flaky'" in failed[0].message and failed[0].exc_info is not None


async def test_run_twice_at_once_is_refused() -> None:
    sup = Supervisor("root")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [])
        with pytest.raises(RuntimeError, match="already running"):
            await sup.run([])
        nursery.cancel_scope.cancel()


def test_child_spec_is_a_frozen_value() -> None:
    async def noop(**_: Any) -> None:
        pass

    spec = ChildSpec("a", noop)
    assert spec.restart == "permanent"
    with pytest.raises(AttributeError):
        spec.name = "b"  # type: ignore[misc]
