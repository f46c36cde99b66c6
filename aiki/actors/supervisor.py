"""The supervisor: starts actors, restarts the ones that crash, gives up upward when they
crash too often.

Letting an actor crash loses nothing: the store is the truth, and an actor rebuilds its state
from it when it starts. So the policy is simple: one-for-one restarts with a backoff, and a
restart intensity (at most ``max_restarts`` in ``within`` seconds) past which the failure is
somebody else's problem.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import attrs
import trio

from aiki.errors import AikiError

log = logging.getLogger("aiki.supervisor")

_KEPT_FAILURES = 100


class SupervisorEscalation(AikiError):
    """A supervisor gave up: a child failed to start, or failed more often than allowed.

    ``first_failure`` is the exception that began the failing streak (also the ``__cause__``);
    ``child`` is the child whose failure made the supervisor give up.
    """

    def __init__(
        self, message: str, supervisor: str, child: str, first_failure: BaseException
    ) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.child = child
        self.first_failure = first_failure
        self.__cause__ = first_failure


@attrs.frozen
class ChildSpec:
    """How to run one child. ``start(task_status=...)`` calls ``task_status.started()`` once it
    can serve. ``restart``: "permanent" restarts after an exception or a return, "transient"
    only after an exception, "temporary" never."""

    name: str
    start: Callable[..., Awaitable[None]]
    restart: Literal["permanent", "transient", "temporary"] = "permanent"


class Supervisor:
    """Runs children one-for-one: ``await nursery.start(supervisor.run, children)``.

    Each child runs in its own cancel scope, so a crash restarts that child only (after a
    backoff doubling from ``backoff_initial`` to ``backoff_max``); its siblings never notice.
    Restart intensity is measured on ``trio.current_time()``, so it is deterministic under a
    mock clock. Needing more than ``max_restarts`` restarts within ``within`` seconds, the
    supervisor cancels all its children and raises :class:`SupervisorEscalation`; so does a
    child failing to start in :meth:`run`.

    Cancelling the supervisor cancels every child; no child outlives ``run``. Exceptions that
    are not ``Exception`` (KeyboardInterrupt, ...) are never caught and propagate. ``restarts``,
    ``failures`` (the last 100) and ``first_failure`` survive across runs, for inspection; a new
    ``run`` starts with a fresh intensity window.
    """

    def __init__(
        self, name: str, *, max_restarts: int = 3, within: float = 5.0,
        backoff_initial: float = 0.05, backoff_max: float = 2.0,
    ) -> None:
        self.name = name
        self.max_restarts = max_restarts
        self.within = within
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.restarts = 0
        self.failures: list[tuple[str, BaseException]] = []
        self.first_failure: BaseException | None = None
        self._first_child = ""
        self._last_failure_at = -math.inf
        self._window: deque[float] = deque()
        self._children: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._escalation: SupervisorEscalation | None = None

    @property
    def children(self) -> tuple[str, ...]:
        """Names of the children currently supervised (running or waiting to restart)."""
        return tuple(self._children)

    async def run(
        self, children: Sequence[ChildSpec], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start ``children`` in order, report started, then supervise until cancelled."""
        if self._nursery is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self._window.clear()
        self._last_failure_at = -math.inf
        self._escalation = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for spec in children:
                    try:
                        await self.start_child(spec)
                    except Exception as exc:  # any child failure is ours
                        # Not logged: raised to whoever started run(), which reports it (a
                        # port in use is one line from `aiki server`, not a traceback).
                        self._failed(spec.name, exc, trio.current_time(), logged=False)
                        self._give_up(spec.name, f"child {spec.name!r} failed to start: {exc!r}",
                                      logged=False)
                        break
                else:
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._children.clear()
        if self._escalation is not None:
            raise self._escalation

    async def start_child(self, spec: ChildSpec) -> None:
        """Add a child to the running supervisor; return once it has started.

        A failure to start is raised here (and not counted against the restart intensity).
        """
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running; start run() first")
        if spec.name in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a child named {spec.name!r}")
        scope = self._children[spec.name] = trio.CancelScope()
        try:
            await self._nursery.start(self._keep, spec, scope)
        except BaseException:
            self._forget(spec.name, scope)
            raise

    def stop_child(self, name: str) -> bool:
        """Cancel child ``name`` for good (no restart); False if there is no such child."""
        scope = self._children.pop(name, None)
        if scope is None:
            return False
        scope.cancel()
        return True

    async def _keep(
        self, spec: ChildSpec, scope: trio.CancelScope, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``spec`` and restart it by its policy, until stopped or given up on."""
        up = False
        streak = 0  # consecutive failures of this child: its backoff exponent
        try:
            with scope:
                while True:
                    began = trio.current_time()
                    failure: Exception | None = None
                    try:
                        async with trio.open_nursery() as one:
                            await one.start(spec.start)
                            if not up:
                                up = True
                                task_status.started()
                    except BaseExceptionGroup as group:
                        sole = group.exceptions[0] if len(group.exceptions) == 1 else None
                        if not isinstance(sole, Exception):
                            raise  # Cancelled, KeyboardInterrupt, ...: not ours to handle
                        failure = sole
                    if failure is not None and not up:
                        raise failure  # a failure to start is reported by start_child
                    now = trio.current_time()
                    if failure is None:
                        if spec.restart != "permanent":
                            return
                        failure = RuntimeError(f"permanent child {spec.name!r} returned")
                    self._failed(spec.name, failure, now)
                    if spec.restart == "temporary":
                        return
                    streak = 1 if now - began >= self.within else streak + 1
                    if not self._may_restart(now):
                        self._give_up(spec.name, f"child {spec.name!r} needed more than "
                                      f"{self.max_restarts} restarts within {self.within} s")
                        return
                    delay = min(self.backoff_initial * 2 ** (streak - 1), self.backoff_max)
                    log.warning("supervisor %r: restarting child %r in %.3f s", self.name,
                                spec.name, delay)
                    await trio.sleep(delay)
                    self.restarts += 1
        finally:
            self._forget(spec.name, scope)

    def _failed(self, child: str, exc: BaseException, now: float, logged: bool = True) -> None:
        if logged:
            log.error("supervisor %r: child %r failed: %r", self.name, child, exc, exc_info=exc)
        self.failures.append((child, exc))
        del self.failures[:-_KEPT_FAILURES]
        if self.first_failure is None or now - self._last_failure_at > self.within:
            self.first_failure, self._first_child = exc, child
        self._last_failure_at = now

    def _may_restart(self, now: float) -> bool:
        while self._window and self._window[0] <= now - self.within:
            self._window.popleft()
        if len(self._window) >= self.max_restarts:
            return False
        self._window.append(now)
        return True

    def _give_up(self, child: str, why: str, logged: bool = True) -> None:
        first = self.first_failure
        assert first is not None, "giving up without a failure"
        if self._escalation is None:
            self._escalation = SupervisorEscalation(
                f"supervisor {self.name!r} gave up: {why}; the failing streak began when child "
                f"{self._first_child!r} raised {first!r}",
                self.name, child, first,
            )
            if logged:
                log.error("%s", self._escalation)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _forget(self, name: str, scope: trio.CancelScope) -> None:
        if self._children.get(name) is scope:
            del self._children[name]
