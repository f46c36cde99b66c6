"""The Run actor (one per assigned run, on a worker) and ``WorkflowRun``, what workflow code sees.

The Run actor replays the run's checkpoints and drives the workflow coroutine; every new step
is persisted (and acknowledged by the server) before workflow code sees its result, except a
completed task's outcome under a worker's :class:`~aiki.actors.outcomes.Flusher`: that one
rides with the run's next write, in the same transaction, and is committed before anything
that follows it (see :mod:`aiki.actors.outcomes`).

A task attempt's *start* is recorded, and acknowledged, before the task runs: that write is
fenced by the lease epoch, so a worker whose lease is gone (an assignment delivered late, a
lease that expired unseen) learns it before running anything, and a task whose result is
committed never runs again. ``record_start_after`` > 0 trades that for one write less per
task: the start is recorded only if the attempt is still running that long, so a short
task costs one write, its outcome. Then a short attempt from a stale lease may run (its
result is refused): tasks become at-least-once, the usual guarantee of activity-style
engines. A crash re-runs the interrupted attempt under the same attempt number either way.

Replay identity: each step has a *position*, its place in the workflow's call sequence
("0", "1", ...; the i-th branch of a ``run.gather`` at position "2" numbers its own steps
"2.i.0", "2.i.1", ...), so concurrent branches get the same positions whatever order Trio
schedules them in. A step is also addressed by its content (name and a hash of its
canonical input, or its idempotency key): replay returns the recorded result only when both
agree, and otherwise stops with a :class:`NonDeterminismError` naming both sides.

Owns: the decoded checkpoints and the workflow coroutine. On a crash or a lost lease all of
it is dropped; the next lease rebuilds it from the store.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import math
import traceback
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import trio

from aiki import protocol as p
from aiki import tracing
from aiki.actors.outcomes import Flusher
from aiki.actors.scopes import serving_nursery
from aiki.errors import (
    ChildCancelled,
    ChildFailed,
    ConnectionLost,
    DeadlineExceeded,
    NonDeterminismError,
    NonRetryableError,
    PayloadError,
    RunCancelled,
    RunPaused,
    StaleLease,
    StepConflict,
    StoreUnavailable,
    TaskFailed,
    WorkflowUsageError,
)
from aiki.logs import bind_run
from aiki.metrics import TASK_DURATION
from aiki.records import (
    FINAL_STEP_STATES,
    Lease,
    StepKind,
    StepRecord,
    WaitFor,
    deadline_after,
    deadline_expiry,
    evolve,
)
from aiki.retry import Retry
from aiki.sources import Sources
from aiki.task_styles import BODY_GATE

log = logging.getLogger("aiki.run")
T = TypeVar("T")
WRITE_ATTEMPTS = 8  # about 20 s of backoff before giving the run back to its lease
# 0: every task attempt's start is recorded before it runs (see the module doc).
DEFAULT_RECORD_START_AFTER = 0.0
SLEEP_RECHECK = 0.01  # a sleep due by the worker's clock, not yet by the server's: ask after
DEADLINE_EXCEEDED = "DeadlineExceeded"  # the error of a step its deadline scope abandoned
CHILD_CANCEL_GRACE = 60.0  # how long a child cancelled by an expired deadline may compensate
CANCEL_GRACE = 60.0  # a cancel's grace period when none is known (the default of ``cancel``)


class TaskDefinition(Protocol):
    """What the engine needs of a task (``aiki.task`` makes one)."""

    @property
    def name(self) -> str: ...
    @property
    def retry(self) -> Retry: ...
    @property
    def payload_type(self) -> Any: ...
    @property
    def result_type(self) -> Any: ...

    async def call(self, payload: Any) -> Any: ...


class WorkflowDefinition(Protocol):
    """What the engine needs of a workflow (``aiki.workflow`` makes one)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def payload_type(self) -> Any: ...
    @property
    def result_type(self) -> Any: ...

    async def execute(self, run: WorkflowRun, payload: Any) -> Any: ...


class Abandon(BaseException):
    """The run cannot go on here (lease lost, server gone): stop without writing anything.

    A BaseException so that ``except Exception`` in workflow code does not swallow it.
    """


class Suspend(BaseException):
    """The run waits longer than it is worth holding a slot: give it back until one of
    ``conditions`` holds."""

    def __init__(self, conditions: tuple[WaitFor, ...], reason: str) -> None:
        super().__init__(reason)
        self.conditions = conditions
        self.reason = reason
        # The deadline scopes it was shielded from (``run.shield()``): they do not wake it.
        self.shielded: set[int] = set()


@attrs.define(eq=False)
class Nudges:
    """The server's hints that a wait of this run ended (a wakeup, an event delivered)."""

    event: trio.Event = attrs.field(factory=trio.Event)

    def nudge(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = trio.Event()


class Release(BaseException):
    """The worker is draining: give the run back (queued at once) at this step boundary,
    before starting another task attempt, so that no finished task runs again."""


Persist = Callable[[Callable[[int], Any]], Awaitable[Any]]
# How a task attempt's body is called: ``task.call(payload)``, or a test's stand-in.
TaskRunner = Callable[[TaskDefinition, Any], Awaitable[Any]]


async def call_task(task: TaskDefinition, payload: Any) -> Any:
    return await task.call(payload)


@attrs.define(eq=False)
class _Branch:
    prefix: str
    counter: int = 0

    def next(self) -> str:
        position = f"{self.prefix}{self.counter}"
        self.counter += 1
        return position

    def give_back(self, position: str) -> None:
        """Undo the last :meth:`next`, which gave ``position``."""
        if self.counter > 0 and position == f"{self.prefix}{self.counter - 1}":
            self.counter -= 1


_BRANCH: contextvars.ContextVar[tuple[RunState, _Branch]] = contextvars.ContextVar("aiki_branch")
# Inside ``with run.shield():`` (and the branches it starts): a cancel does not interrupt.
_SHIELDED: contextvars.ContextVar[bool] = contextvars.ContextVar("aiki_shielded", default=False)


@attrs.define(eq=False)
class _Deadline:
    """An open deadline scope: its position (where its deadline is recorded), its Trio
    cancel scope, the deadline once recorded (epoch seconds), and the children started in
    it (cancelled when it expires)."""

    position: str
    seconds: float
    cancel: trio.CancelScope
    at: float | None = None
    children: list[str] = attrs.field(factory=list)
    steps: list[str] = attrs.field(factory=list)  # positions of the steps begun inside
    replayed: bool = False  # cancelled where the history says it expired
    # Recorded expired (on replay): the positions its expiry cut short, where a replay
    # cuts it again whatever the steps there became (see ``RunState.cancelled_on_replay``).
    cut: tuple[str, ...] | None = None
    # The branch that opened it; recorded expired, the position the code after it was to
    # take next there (``aiki.records.deadline_after``; None in an older record).
    branch: _Branch | None = None
    after: str | None = None


@attrs.frozen
class _Abandoned:
    """An expired scope's record, waiting for the run's next write (``AbandonSteps``): its
    position, the steps it cut short, the starts of those on their way, and the position
    the code after it was to take next."""

    scope: str
    positions: tuple[str, ...]
    starts: tuple[StepRecord, ...]
    after: str | None


def _at_or_after(position: str, after: str) -> bool:
    """Whether ``position`` is ``after`` or later in the same branch ("3.1.4" is after
    "3.1.2"; "3.0.5" and "4" are not: another branch)."""
    prefix, _, n = position.rpartition(".")
    other, _, m = after.rpartition(".")
    return prefix == other and n.isdigit() and m.isdigit() and int(n) >= int(m)


_DEADLINES: contextvars.ContextVar[tuple[_Deadline, ...]] = contextvars.ContextVar(
    "aiki_deadlines", default=())
# How many of ``_DEADLINES`` the innermost ``run.shield()`` shields the code from (those
# opened before it): as Trio's shield, an enclosing deadline does not cancel the awaits
# inside; it takes effect when the shield exits.
_SHIELD_AT: contextvars.ContextVar[int] = contextvars.ContextVar("aiki_shield_at", default=0)


def _open_deadlines() -> tuple[_Deadline, ...]:
    """The deadline scopes whose expiry reaches the code here (not shielded from it)."""
    return _DEADLINES.get()[_SHIELD_AT.get():]


@attrs.define(eq=False)
class RunState:
    """The engine's view of one leased run while it executes."""

    lease: Lease
    recorded: dict[str, StepRecord]
    persist: Persist
    sources: Sources
    inline_retry_max: float
    record_start_after: float = DEFAULT_RECORD_START_AFTER
    # Set when the worker drains: no new task attempt starts; the run is given back.
    draining: trio.Event = attrs.field(factory=trio.Event)
    nudges: Nudges = attrs.field(factory=Nudges)
    workflow: str = "?"  # its name, for the logs
    run_task: TaskRunner = call_task
    # The local time (``trio.current_time()``) after which the lease may have expired, as far
    # as the worker knows (its renewals), less a margin: no task body starts after it.
    lease_deadline: Callable[[], float] = lambda: math.inf
    # Told the local time a start record was first sent once the server accepted it: the
    # server renewed the lease then (at the latest), so it holds a TTL from that time.
    lease_renewed: Callable[[float], None] = lambda sent: None
    # With a flusher, completed task outcomes wait in ``pending`` for the run's next write.
    flusher: Flusher | None = None
    pending: list[StepRecord] = attrs.field(factory=list)
    riding: list[StepRecord] = attrs.field(factory=list)  # carried by a write in flight
    lost: Abandon | None = None  # why the Flusher could not send this run's outcomes
    # The run is being cancelled (its reason): new steps outside a shield raise RunCancelled.
    cancelling: bool = False
    cancel_reason: str | None = None
    cancel_deadline: float | None = None  # the end of its grace period (epoch seconds)
    # The Trio scopes of the open ``run.shield()`` blocks, and whether the run was stopped.
    shields: set[trio.CancelScope] = attrs.field(factory=set)
    stopped: bool = False
    # Children whose deadline scope expired: cancelled at the next write; and the steps
    # that stood in it, recorded abandoned.
    pending_cancels: list[tuple[str, str]] = attrs.field(factory=list)
    pending_abandons: list[_Abandoned] = attrs.field(factory=list)
    # Task starts and waits' first asks sent and not yet acknowledged: a scope that cuts
    # one sends it with its abandon, so that a start arriving after the abandon is refused
    # and an ask finds its wait ended.
    starting: dict[str, StepRecord] = attrs.field(factory=dict)
    cut_short: set[str] = attrs.field(factory=set)  # positions an expired scope cut
    # Whether a client paused the run (the worker was told, or the store refused a step as
    # paused): it is given back as paused, not as a drain.
    paused: Callable[[], bool] = lambda: False
    paused_seen: bool = False
    # The server's wall clock now, (at least, at most): the clock deadlines are kept on
    # (aiki.actors.server_time); None: this worker's own wall clock stands in.
    server_time: Callable[[], tuple[float, float]] | None = None
    # The server's clock when it leased the run (its claim): it reads that much at least.
    claimed_at: float = -math.inf
    steps: dict[str, StepRecord] = attrs.field(init=False)
    consumed: set[str] = attrs.field(factory=set)
    root: _Branch = attrs.field(factory=lambda: _Branch(""))
    _keyed: dict[tuple[str, str], trio.Event] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.steps = dict(self.recorded)

    def server_now(self) -> tuple[float, float]:
        """The server's clock now: (at least, at most)."""
        if self.server_time is None:
            now = self.sources.clock.now()
            return now, now
        return self.server_time()

    def next_position(self) -> str:
        return self._branch().next()

    def _branch(self) -> _Branch:
        branch = _BRANCH.get(None)
        return self.root if branch is None or branch[0] is not self else branch[1]

    def open_shield(self) -> trio.CancelScope:
        """The Trio scope of a ``run.shield()`` block: shielded from the run's deadline
        scopes and gathers, bounded by the cancel's grace period when the run is being
        cancelled, and cancelled when the run is stopped on this worker (:meth:`stop`)."""
        scope = trio.CancelScope(shield=True)
        if self.cancelling:
            end = self.cancel_deadline
            left = CANCEL_GRACE if end is None else end - self.server_now()[0]
            scope.deadline = trio.current_time() + max(left, 0.0)
        if self.stopped:
            scope.cancel()
        self.shields.add(scope)
        return scope

    def stop(self) -> None:
        """The run is stopped on this worker (its actor's scope is cancelled: a lease lost or
        revoked, a crash, the worker stopping): its ``run.shield()`` blocks stop too, since
        Trio's shield holds off every cancellation from outside it."""
        self.stopped = True
        for scope in self.shields:
            scope.cancel()

    def check_cancelled(self) -> None:
        """Raise :class:`RunCancelled` where the workflow stands, unless shielded."""
        if self.cancelling and not _SHIELDED.get():
            raise RunCancelled(self.lease.run_id, self.cancel_reason)

    def check_inside(self, what: str) -> None:
        """WorkflowUsageError unless called from this run's workflow code."""
        branch = _BRANCH.get(None)
        if branch is None or branch[0] is not self:
            raise WorkflowUsageError(
                f"{what} is used outside the workflow code of run {self.lease.run_id}: call "
                "it from the workflow function (or a run.gather branch of it), while the run "
                "executes")

    async def arm(self) -> None:
        """Before a step: the deadlines of the scopes it stands in are recorded (once; a
        replay reads them back); the children of scopes that expired are cancelled, and
        their steps recorded abandoned. The deadlines take effect once the code does new
        work (:meth:`activate`): a replay of recorded steps is not cut short by a deadline
        that had not passed when they were recorded."""
        for d in _DEADLINES.get():
            if d.at is not None:
                continue
            recorded = await self.replayed(d.position, "deadline", "deadline", "null", "", None)
            if recorded is not None and recorded.output is not None:
                at, d.cut = deadline_expiry(recorded)
                d.after = deadline_after(recorded)
            else:  # on the server's clock, from its latest reading: never early on it
                at = self.server_now()[1] + d.seconds
                output = p.encode_value(at)
                await self.save(StepRecord(d.position, "deadline", "deadline", "", "null",
                                           None, "completed", 1, output=output))
            d.at = at
        await self.flush_cancels()

    def activate(self, position: str) -> None:
        """New work begins at ``position`` (not a replayed step): the deadlines of the
        scopes it stands in take effect. Of those that have passed (a replay after them),
        only the earliest is cancelled now (the outermost of equal ones), as it was the
        first to expire; the others' turn comes at the next step, if the code reaches one
        inside them. They are judged on the server's clock, at the earliest it may read now
        (whichever worker recorded them)."""
        now = self.server_now()[0]
        scopes = [d for d in _open_deadlines() if d.at is not None]
        expired = [d for d in scopes if d.cut is not None]
        if expired:  # the history says it expired: new work inside was cut short there
            # By the scope whose expiry the history says cut this very step, if one did: a
            # fork's copied scopes name the steps they cut in the original, past the steps
            # it copied, and an inner scope's cut is not the outer one's (seed 236); else
            # the outermost (an inner one did not catch it).
            cut = next((d for d in expired if d.cut is not None and position in d.cut),
                       expired[0])
            cut.replayed = True
            cut.cancel.cancel()
            return
        passed = [d for d in scopes if d.at is not None and d.at <= now]
        if passed:
            min(passed, key=lambda d: d.at or 0.0).cancel.cancel()
        for d in scopes:
            if d not in passed and d.at is not None:
                d.cancel.deadline = trio.current_time() + (d.at - now)

    def in_scopes(self, position: str) -> None:
        """A step begins at ``position``: the deadline scopes it stands in note it."""
        for d in _open_deadlines():
            d.steps.append(position)

    async def cancelled_on_replay(self, step: StepRecord) -> None:
        """A recorded step that its deadline scope abandoned, or that the scope's expiry cut
        short though it had ended meanwhile (a sleep woken, an outcome committed as the
        worker's deadline passed): that scope is cancelled here again, as it was the first
        time."""
        scope = (p.decode_value(step.output) if step.error_type == DEADLINE_EXCEEDED
                 and step.output is not None else None)
        for d in _open_deadlines():
            if d.position == scope or (d.cut is not None and step.position in d.cut):
                d.replayed = True
                d.cancel.cancel()
                await trio.lowlevel.checkpoint()

    async def flush_cancels(self) -> None:
        """Record the steps of expired deadline scopes abandoned, and cancel their children.
        Each is taken off its list only once its write is acknowledged: a write cut short
        (a deadline or the run's end cancels it) leaves it for the next flush. A concurrent
        branch may send one again meanwhile: both writes are idempotent."""
        while self.pending_abandons:
            abandon = self.pending_abandons[0]
            await self.write(partial(_abandon_steps, lease=self.lease, abandon=abandon))
            _drop(self.pending_abandons, abandon)
        while self.pending_cancels:
            cancel = self.pending_cancels[0]
            child_id, reason = cancel
            await self.write(partial(_cancel_run, run_id=child_id, reason=reason))
            _drop(self.pending_cancels, cancel)

    async def write(self, make: Callable[[int], Any]) -> Any:
        """Persist one write, after the outcomes waiting for a ride or riding with another
        write in flight (sent first, alone: nothing may commit before them)."""
        if self.pending or self.riding:
            await self.carry(lambda req, saved: _save_all(req, self.lease, saved))
        return await self._write(make)

    async def carry(self, make: Callable[[int, tuple[StepRecord, ...]], Any]) -> Any:
        """Persist one write whose message carries the outcomes not yet acknowledged
        (``make(req, saved)``): the server commits them first, in the same transaction.
        Those already riding with another write in flight ride again (a repeated save
        changes nothing): this write may overtake that one."""
        taken = tuple(self.pending)
        saved = (*self.riding, *taken)
        self.pending.clear()
        self.riding.extend(taken)
        if self.flusher is not None:
            self.flusher.done(self)
        try:
            return await self._write(lambda req: make(req, saved))
        except trio.Cancelled:
            # Cut by a deadline scope the run goes on past (or by its end): not known to be
            # committed, so what it carried waits for the run's next write again (a repeated
            # save changes nothing). Else the run could end on a result never committed.
            self._again(taken, ride_soon=True)
            raise
        except Release:
            # Refused as paused: the first refusal in the chain is the answer, so some of
            # what it carried may not be committed. They wait for the run's next write, not
            # for the Flusher: refused too while the run stays paused (then it is given
            # back), or accepted once it is resumed, first (seed 5156: the Flusher's write
            # refused, the run resumed before its next write, which ended it on a result
            # never committed).
            self._again(taken, ride_soon=False)
            raise
        finally:
            self.riding = [s for s in self.riding if all(s is not x for x in taken)]

    def _again(self, taken: tuple[StepRecord, ...], *, ride_soon: bool) -> None:
        """Outcomes a write carried, not known to be committed: they wait again."""
        back = [s for s in taken if all(s is not x for x in self.pending)]
        if back:
            self.pending[:0] = back
            if ride_soon and self.flusher is not None:
                self.flusher.waiting(self)

    async def flush(self) -> None:
        """Send the outcomes waiting for a ride on their own (the Flusher calls this when no
        ride came in time). A lost lease is left for the run's own next write to find."""
        if self.pending:
            try:
                await self.carry(lambda req, saved: _save_all(req, self.lease, saved))
            except Abandon as exc:  # the run's next write raises it: nothing may follow
                self.lost = exc
            except Release:  # paused: they wait for the run's next write (see carry)
                pass

    async def _write(self, make: Callable[[int], Any]) -> Any:
        """Persist one write, retrying while the store is away or the reply is lost.

        Every write of a run is safe to repeat: starting a step again, saving the same final
        step again (accepted), completing or failing again (refused as stale once done).
        An infrastructure error never reaches workflow code: if it lasts, the run is
        abandoned to its lease, and resumes from its checkpoints.
        """
        if self.lost is not None:
            raise self.lost
        delay = 0.1
        for _ in range(WRITE_ATTEMPTS):
            try:
                return await self.persist(make)
            except RunPaused as exc:
                # A client paused the run (its worker may have missed the server's word):
                # give it back at this step boundary, as a draining worker does.
                log.info("run %s: %s", self.lease.run_id, exc)
                self.paused_seen = True
                self.draining.set()
                raise Release() from exc
            except (StaleLease, ConnectionLost, StepConflict) as exc:
                # StepConflict: another actor wrote this step, so this one's view is stale.
                log.info("run %s: abandoning: %s", self.lease.run_id, exc)
                raise Abandon(str(exc)) from exc
            except (StoreUnavailable, TimeoutError) as exc:
                log.info("run %s: write failed, retrying in %.1f s: %s",
                         self.lease.run_id, delay, exc)
                last: Exception = exc
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise Abandon(f"the store stayed unavailable: {last}")

    async def save(self, step: StepRecord, *, start: bool = False) -> None:
        if (self.flusher is not None and not start and step.kind == "task"
                and step.state == "completed"):
            self.pending.append(step)  # rides with the next write (see aiki.actors.outcomes)
            self.flusher.waiting(self)
        else:
            msg = p.StartStep if start else p.SaveStep
            if start:
                self.starting[step.position] = step
            await self.carry(lambda req, saved: msg(req, self.lease, step, saved))
            if start:
                del self.starting[step.position]
        self.steps[step.position] = step

    async def replayed(self, position: str, kind: StepKind, name: str, input_json: str,
                       input_hash: str, key: str | None) -> StepRecord | None:
        """The recorded step at ``position`` if it matches this call; None if there is none.

        A call that does not match, inside a deadline scope the history says expired, was
        never made the first time: the scope's expiry cut the code short before it (while
        the scope's deadline was being recorded, say), and the position went to the code
        after the scope. The scope is cut here too, and the position given back. So is a
        call with no recorded step there that no expired scope's record names (seed 522:
        nested scopes expired together, the inner one cut its step, the outer one then cut
        the next call before it took a position, "cut short: no step")."""
        recorded = self.recorded.get(position)
        if recorded is None:
            if kind != "deadline":  # (a scope's own record: its position was taken)
                await self._cut_if_never_made(position)
            return None
        await self._cut_if_taken_after(position)
        self.consumed.add(position)
        same = recorded.kind == kind and recorded.name == name and (
            recorded.idempotency_key == key
            and (key is not None or recorded.input_hash == input_hash)
        )
        if not same:
            if any(d.cut is not None for d in _open_deadlines()):
                self.consumed.discard(position)
                await self._cut_if_never_made(position, named=False)
            raise NonDeterminismError(
                f"run {self.lease.run_id} diverged from its history at step {position}: "
                f"the history has {_describe_step(recorded)}, "
                f"but the code now calls {_describe(kind, name, input_json, key)}"
            )
        return recorded

    async def _cut_if_taken_after(self, position: str) -> None:
        """A call at ``position`` inside a deadline scope the history says expired, where the
        scope's record says the code after it took that position: whatever the step
        recorded there, this call was never made the first time. The scope is cut here
        (the outermost of such), the position given back. Seed 2878: the outer scope
        expired before the first sleep inside an inner one took a position, and the code
        after it slept at that position; the replay's sleep inside matched that record
        (a sleep's duration is not part of its identity) and went on inside the scope."""
        taken = [d for d in _open_deadlines()
                 if d.after is not None and _at_or_after(position, d.after)]
        if taken:
            self._branch().give_back(position)
            taken[0].replayed = True
            taken[0].cancel.cancel()
            await trio.lowlevel.checkpoint()

    async def _cut_if_never_made(self, position: str, *, named: bool = True) -> None:
        """A call at ``position`` inside deadline scopes the history says expired, that the
        first time never took the position: cut here by the outermost of them (as
        :meth:`activate` cuts), the position given back for the code after the scope. With
        ``named``, not if an expired scope's record names the position (that call was made,
        and cut there: see :meth:`activate`)."""
        expired = [d for d in _open_deadlines() if d.cut is not None]
        if not expired or (named and any(position in (d.cut or ()) for d in expired)):
            return
        self._branch().give_back(position)
        expired[0].replayed = True
        expired[0].cancel.cancel()
        await trio.lowlevel.checkpoint()

    def check_all_consumed(self) -> None:
        left = sorted(set(self.recorded) - self.consumed, key=position_key)
        if left:
            shown = "; ".join(
                f"step {pos}: {_describe_step(self.recorded[pos])}" for pos in left[:5]
            )
            raise NonDeterminismError(
                f"run {self.lease.run_id} diverged from its history: the code finished without "
                f"reaching {len(left)} recorded step(s) ({shown})"
            )

    async def task(self, task: TaskDefinition, payload: Any, key: str | None) -> Any:
        await self.arm()
        position = self.next_position()
        what = f"input of task {task.name!r}"
        input_json = p.encode_value(payload, task.payload_type, what=what)
        input_hash = p.content_hash(task.name, input_json)
        recorded = await self.replayed(position, "task", task.name, input_json, input_hash, key)
        attempt, not_before = 1, None
        if recorded is not None:
            if recorded.state in FINAL_STEP_STATES:
                await self.cancelled_on_replay(recorded)
                return _outcome(recorded, task.result_type)
            self.check_cancelled()  # (never started again after a cancel)
            # A crash during an attempt re-runs that attempt; a retrying step runs the next.
            attempt = recorded.attempts + (recorded.state == "retrying")
            not_before = recorded.next_attempt_at
        elif key is not None:
            found = await self._keyed_outcome(task.name, key)
            if found is not None:
                return _outcome(found, task.result_type)
            self.check_cancelled()
            self._keyed[(task.name, key)] = trio.Event()
        else:
            self.check_cancelled()
        self.in_scopes(position)
        self.activate(position)
        try:
            return await self._attempts(task, position, input_json, input_hash, key,
                                        attempt, not_before)
        finally:
            if key is not None:
                event = self._keyed.pop((task.name, key), None)
                if event is not None:
                    event.set()

    async def _keyed_outcome(self, name: str, key: str) -> StepRecord | None:
        while True:
            for step in self.steps.values():
                if step.name == name and step.idempotency_key == key and (
                        step.state in FINAL_STEP_STATES):
                    return step
            event = self._keyed.get((name, key))
            if event is None:
                return None
            await event.wait()  # the same key is running in a concurrent branch

    async def _attempts(self, task: TaskDefinition, position: str, input_json: str,
                        input_hash: str, key: str | None, attempt: int,
                        not_before: float | None) -> Any:
        clock = self.sources.clock
        # A retry recorded before this lease is due by this worker's clock, or by the
        # server's when it leased the run: one the server woke the run for runs, even
        # where this clock is behind (else the run waited for it again, was queued again
        # at once, and so on, for as long as the skew).
        floor = self.claimed_at if not_before is not None else -math.inf
        while True:
            if not_before is not None:
                wait = not_before - max(clock.now(), floor)
                retry = (WaitFor(position, "retry", task.name, not_before),)
                if wait > self.inline_retry_max:
                    if await self.hold_for_deadline():
                        continue
                    raise Suspend(retry, f"task {task.name!r} retries at attempt {attempt}")
                if wait > 0:
                    with trio.move_on_after(wait):
                        await self.draining.wait()
                    if self.draining.is_set():
                        raise Suspend(retry, f"task {task.name!r} retries at attempt "
                                      f"{attempt}; the worker is draining")
            if self.draining.is_set():
                raise Release()
            step = StepRecord(position, "task", task.name, input_hash, input_json, key,
                              "running", attempt)
            try:
                with tracing.span(f"aiki.task {task.name}", {
                        "aiki.task": task.name, "aiki.task.attempt": attempt,
                        "aiki.task.position": position}):
                    value = await self._call(task, step)
                output = p.encode_value(value, task.result_type,
                                        what=f"result of task {task.name!r}")
            except Exception as exc:
                retryable = not isinstance(exc, (NonRetryableError, PayloadError))
                delay = task.retry.delay_after(attempt, self.sources.rng) if retryable else None
                trace = format_traceback(exc)
                failed = evolve(step, error_type=type(exc).__name__,
                                error_message=str(exc), error_traceback=trace)
                log.warning("run %s (%s): task %r attempt %d failed%s: %s: %s\n%s",
                            self.lease.run_id, self.workflow, task.name, attempt,
                            "" if delay is None else f", retrying in {delay:g} s",
                            type(exc).__name__, exc, trace)
                if delay is None:
                    await self.save(evolve(failed, state="failed"))
                    raise TaskFailed(task.name, type(exc).__name__, str(exc), attempt,
                                     trace) from exc
                not_before, floor = clock.now() + delay, -math.inf
                await self.save(evolve(failed, state="retrying",
                                       next_attempt_at=not_before))
                attempt += 1
                continue
            final = evolve(step, state="completed", output=output)
            await self.save(final)
            return p.decode_value(output, task.result_type, what=f"result of task {task.name!r}")

    def _may_start(self, task: TaskDefinition) -> None:
        """Raise :class:`Abandon` if the lease's local deadline has passed: a start record
        acknowledged late (a stalled link), or a worker paused between its start record and
        the body (a GC pause, SIGSTOP, a VM migration), is no licence to run the task, whose
        result another worker may have committed meanwhile."""
        deadline = self.lease_deadline()
        if trio.current_time() >= deadline:
            raise Abandon(f"run {self.lease.run_id}: task {task.name!r} not started: its "
                          f"lease's local deadline passed {trio.current_time() - deadline:.3f}"
                          " s ago (a late reply, or a pause)")

    async def _run_body(self, task: TaskDefinition, payload: Any) -> Any:
        """The task body, its lease checked immediately before it starts."""
        token = BODY_GATE.set(partial(self._may_start, task))
        try:
            self._may_start(task)
            return await self._timed(task, payload)
        finally:
            BODY_GATE.reset(token)

    async def _call(self, task: TaskDefinition, step: StepRecord) -> Any:
        """One attempt of ``task``, its start recorded first or, if it runs long, meanwhile."""
        payload = p.decode_value(step.input, task.payload_type)
        if self.record_start_after <= 0:
            sent = trio.current_time()
            await self.save(step, start=True)
            self.lease_renewed(sent)
            return await self._run_body(task, payload)
        writing = False
        lost: list[Abandon] = []

        async def record_start(cancel: trio.CancelScope) -> None:
            nonlocal writing
            await trio.sleep(self.record_start_after)
            writing = True
            try:
                await self.save(step, start=True)
            except Abandon as exc:  # the lease is gone: stop the attempt, write nothing more
                lost.append(exc)
                cancel.cancel()
            except Release:  # paused while the attempt runs: it is in flight, let it end
                pass

        value: Any = None
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record_start, nursery.cancel_scope)
            try:
                value = await self._run_body(task, payload)
            except (Exception, Abandon) as exc:  # raised below as itself, not in a group
                failure = exc
            finally:
                # A start record in flight is let through, so that it lands before the
                # outcome; one not yet begun is never sent.
                if not writing:
                    nursery.cancel_scope.cancel()
        if lost:
            raise lost[0]
        if failure is not None:
            raise failure
        return value

    async def _timed(self, task: TaskDefinition, payload: Any) -> Any:
        """Run the task's body, its duration counted by outcome (on Trio's clock)."""
        started = trio.current_time()
        outcome = "cancelled"
        try:
            value = await self.run_task(task, payload)
            outcome = "completed"
            return value
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.sources.metrics.observe(TASK_DURATION, trio.current_time() - started,
                                         (task.name, outcome))

    async def hold_for_deadline(self) -> bool:
        """Before the run gives its slot back to wait: if a deadline scope around the code
        is due within the inline limit (on the server's clock, at the earliest it may read
        now), wait here a while instead (its Trio scope cuts in when it is due, or a nudge
        ends the wait early) and say so: the caller looks again. Else False: suspend. (A
        run the server's timer woke at a deadline may find it not quite due yet by this
        worker's bound of the server's clock: given back at once, it would be woken at once
        again, for ever.)"""
        if self.draining.is_set():
            return False
        earliest = self.server_now()[0]
        if not any(d.at is not None and d.at - earliest <= self.inline_retry_max
                   for d in _open_deadlines()):
            return False
        with trio.move_on_after(self.inline_retry_max):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_set_when, self.draining.wait, nursery.cancel_scope)
                nursery.start_soon(_set_when, self.nudges.wait, nursery.cancel_scope)
        return True

    async def await_step(self, step: StepRecord) -> StepRecord:
        """Ask the store where a wait step stands (it ends it if it can). Its first ask is
        a start on its way, as a task's is: a scope that cuts it meanwhile sends the step
        with its abandon, so that an ask arriving after the abandon finds the step failed
        rather than storing it waiting (seed 2073: a sleep left running in a completed run)."""
        first = step.position not in self.steps
        if first:
            self.starting[step.position] = step
        reply = await self.write(lambda req: p.AwaitStep(req, self.lease, step))
        if first:
            del self.starting[step.position]
        stored: StepRecord = reply.step
        self.steps[step.position] = stored
        return stored

    async def sleep(self, seconds: float) -> bool:
        """A durable sleep: True if it lasted ``seconds``, False if woken early."""
        await self.arm()
        position = self.next_position()
        input_json = p.encode_value({"seconds": seconds})
        recorded = await self.replayed(position, "sleep", "sleep", input_json, "", None)
        due = self.sources.clock.now() + seconds
        if recorded is not None:
            if recorded.state in FINAL_STEP_STATES:
                await self.cancelled_on_replay(recorded)
                return recorded.output == "true"
        self.check_cancelled()
        self.in_scopes(position)
        self.activate(position)
        if recorded is not None:
            # Started before: count from when it began, whatever the code sleeps now.
            before = seconds_recorded(recorded)
            if recorded.next_attempt_at is not None and before is not None:
                due = recorded.next_attempt_at - before + seconds
        step = StepRecord(position, "sleep", "sleep", "", input_json, None, "running", 1,
                          next_attempt_at=due)
        early = 0  # answers "still sleeping" though this worker's clock said it was due
        while True:
            step = await self.await_step(step)
            if step.state in FINAL_STEP_STATES:
                return step.output == "true"
            wait = due - self.sources.clock.now()
            if wait <= 0:
                # The server's clock is behind this worker's: ask again after a while (10 ms,
                # doubling to 1 s), not at once (a loop of requests for as long as the skew,
                # with no time between them in process).
                wait = min(SLEEP_RECHECK * 2 ** early, 1.0)
                early += 1
            reason = f"sleeps at step {position} until {due}"
            if wait > self.inline_retry_max or self.draining.is_set():
                if await self.hold_for_deadline():
                    continue
                raise Suspend((WaitFor(position, "sleep", "sleep", due),), reason)
            with trio.move_on_after(max(wait, 0.0)):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_set_when, self.draining.wait, nursery.cancel_scope)
                    nursery.start_soon(_set_when, self.nudges.wait, nursery.cancel_scope)

    async def wait_event(self, name: str, timeout: float | None) -> StepRecord:
        """Wait for event ``name``: the final step (completed with its payload, or failed as
        timed out)."""
        await self.arm()
        position = self.next_position()
        input_json = p.encode_value({"seconds": timeout})
        recorded = await self.replayed(position, "event", name, input_json, "", None)
        due = None if timeout is None else self.sources.clock.now() + timeout
        if recorded is not None and recorded.state in FINAL_STEP_STATES:
            await self.cancelled_on_replay(recorded)
            return recorded
        self.check_cancelled()
        self.in_scopes(position)
        self.activate(position)
        if recorded is not None:
            before = seconds_recorded(recorded)
            if recorded.next_attempt_at is not None and before is not None:
                due = None if timeout is None else recorded.next_attempt_at - before + timeout
        step = StepRecord(position, "event", name, "", input_json, None, "running", 1,
                          next_attempt_at=due)
        step = await self.await_step(step)
        while step.state not in FINAL_STEP_STATES and await self.hold_for_deadline():
            step = await self.await_step(step)
        if step.state in FINAL_STEP_STATES:
            return step
        raise Suspend((WaitFor(position, "event", name, due),),
                      f"waits for event {name!r} at step {position}")

    async def start_child(self, workflow: str, version: str, payload: str,
                          key: str | None, detached: bool) -> str:
        """A child run started as a step: its id (the same one on every replay). Its
        address is the workflow, its version, and the idempotency key or the input's hash."""
        self.check_inside("start_child()")
        await self.arm()
        position = self.next_position()
        name = f"{workflow}@{version}"
        input_hash = p.content_hash(name, payload)
        recorded = await self.replayed(position, "child", name, payload, input_hash, key)
        if recorded is not None and recorded.state in FINAL_STEP_STATES:
            child_id = str(p.decode_value(recorded.output or "null"))
            self._in_scopes(child_id, detached)
            return child_id
        self.check_cancelled()
        self.activate(position)
        child_id = f"{self.lease.run_id}/{position}"
        self._in_scopes(child_id, detached)
        step = StepRecord(position, "child", name, input_hash, payload, key, "running", 1)
        reply = await self.write(lambda req: p.StartChild(
            req, self.lease, step, child_id, workflow, version, payload, detached))
        stored: StepRecord = reply.step
        self.steps[position] = stored
        return str(p.decode_value(stored.output or "null"))

    def _in_scopes(self, child_id: str, detached: bool) -> None:
        if not detached:
            for d in _open_deadlines():
                d.children.append(child_id)

    async def join(self, child_id: str, result_type: Any) -> Any:
        """Wait for the child run ``child_id`` to end, the slot given back meanwhile: its
        result, or ChildFailed / ChildCancelled."""
        await self.arm()
        position = self.next_position()
        input_json = p.encode_value({"child": child_id})
        recorded = await self.replayed(position, "join", child_id, input_json, "", None)
        if recorded is not None and recorded.state in FINAL_STEP_STATES:
            await self.cancelled_on_replay(recorded)
        else:
            self.check_cancelled()
            self.in_scopes(position)
            self.activate(position)
            step = StepRecord(position, "join", child_id, "", input_json, None, "running", 1)
            recorded = await self.await_step(step)
            while recorded.state not in FINAL_STEP_STATES and await self.hold_for_deadline():
                recorded = await self.await_step(step)
            if recorded.state not in FINAL_STEP_STATES:
                raise Suspend((WaitFor(position, "join", child_id),),
                              f"waits for child run {child_id} at step {position}")
        if recorded.state == "completed":
            return p.decode_value(recorded.output or "null", result_type,
                                  what=f"result of child run {child_id}")
        if recorded.error_type == "ChildCancelled":
            raise ChildCancelled(child_id, recorded.error_message or None)
        error_type, _, message = (recorded.error_message or "").partition(": ")
        raise ChildFailed(child_id, error_type, message)

    async def helper(self, kind: StepKind, produce: Callable[[], Any]) -> Any:
        """``run.now()`` and friends: a value recorded once, then replayed."""
        await self.arm()
        position = self.next_position()
        recorded = await self.replayed(position, kind, kind, "null", "", None)
        if recorded is not None and recorded.output is not None:
            return p.decode_value(recorded.output)
        self.check_cancelled()
        self.activate(position)
        output = p.encode_value(produce())
        await self.save(StepRecord(position, kind, kind, "", "null", None, "completed", 1,
                                   output=output))
        return p.decode_value(output)


def _combined(suspended: list[Suspend]) -> Suspend:
    """The waits of a gather's branches, as one: the run waits for the first to wake."""
    combined = Suspend(tuple(c for s in suspended for c in s.conditions),
                       "; ".join(s.reason for s in suspended))
    # A deadline around the gather wakes the run unless every waiting branch was shielded
    # from it.
    combined.shielded = set.intersection(*(s.shielded for s in suspended))
    return combined


def _only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is Trio's Cancelled, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _drop(items: list[Any], item: Any) -> None:
    """Take ``item`` (that very object) off ``items``, if a concurrent flush has not."""
    for i, x in enumerate(items):
        if x is item:
            del items[i]
            return


def _abandon_steps(req: int, *, lease: Lease, abandon: _Abandoned) -> p.AbandonSteps:
    return p.AbandonSteps(req, lease, abandon.positions, abandon.scope, abandon.starts,
                          abandon.after)


def _cancel_run(req: int, *, run_id: str, reason: str) -> p.CancelRun:
    return p.CancelRun(req, run_id, reason, CHILD_CANCEL_GRACE)


def _save_all(req: int, lease: Lease, steps: tuple[StepRecord, ...]) -> p.SaveStep:
    return p.SaveStep(req, lease, steps[-1], steps[:-1])


def seconds_recorded(step: StepRecord) -> float | None:
    value = p.decode_value(step.input).get("seconds")
    return None if value is None else float(value)


async def _set_when(wait: Callable[[], Awaitable[Any]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def _outcome(step: StepRecord, result_type: Any) -> Any:
    if step.state == "failed":
        raise TaskFailed(step.name, step.error_type or "Error", step.error_message or "",
                         step.attempts, step.error_traceback)
    assert step.output is not None
    return p.decode_value(step.output, result_type, what=f"result of task {step.name!r}")


def _describe(kind: str, name: str, input_json: str, key: str | None) -> str:
    if kind == "sleep":
        return "run.sleep()"
    if kind == "event":
        return f"a wait for event {name!r}"
    if kind != "task":
        return f"run.{kind}()"
    shown = input_json if len(input_json) <= 200 else input_json[:200] + "..."
    return f"task {name!r} with " + (f"idempotency key {key!r}" if key else f"input {shown}")


def _describe_step(step: StepRecord) -> str:
    return _describe(step.kind, step.name, step.input, step.idempotency_key)


def position_key(position: str) -> tuple[int, ...]:
    return tuple(int(x) for x in position.split("."))


class DeadlineScope:
    """``with run.move_on_after(d) as scope:`` (or ``run.fail_after(d)``): a durable
    deadline over every await inside. ``cancelled_caught`` says whether it expired there;
    ``deadline`` is when (epoch seconds, on the server's clock: see
    :mod:`aiki.actors.server_time`), once recorded (at the first await inside)."""

    def __init__(self, state: RunState, seconds: float, fail: bool, what: str) -> None:
        self._state = state
        self._seconds = seconds
        self._fail = fail
        self._what = what
        self._scope: _Deadline | None = None
        self._token: contextvars.Token[tuple[_Deadline, ...]] | None = None
        self.cancelled_caught = False

    @property
    def deadline(self) -> float | None:
        return None if self._scope is None else self._scope.at

    @property
    def replayed(self) -> bool:
        """Whether it expired in a replay, where the history says it did (maybe on another
        worker's clock), rather than by this worker's clock now."""
        return self._scope is not None and self._scope.replayed

    def __enter__(self) -> DeadlineScope:
        self._state.check_inside(self._what)
        if self._scope is not None:
            raise WorkflowUsageError(f"{self._what}: a deadline scope is entered once; make "
                                     "a new one for each block")
        branch = self._state._branch()
        self._scope = _Deadline(branch.next(), self._seconds, trio.CancelScope(),
                                branch=branch)
        self._scope.cancel.__enter__()
        self._token = _DEADLINES.set((*_DEADLINES.get(), self._scope))
        return self

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> bool:
        scope = self._scope
        assert scope is not None and self._token is not None
        _DEADLINES.reset(self._token)
        if isinstance(exc, Suspend) and scope.at is not None and id(scope) not in exc.shielded:
            # The run gives its slot back: the server's timer wakes it at the deadline.
            exc.conditions = (*exc.conditions,
                              WaitFor(scope.position, "deadline", "deadline", scope.at))
        try:
            # (Raises what is left of an exception group once its Cancelled are taken out:
            # the scope expired all the same, and its children and steps are seen to.)
            handled = bool(scope.cancel.__exit__(etype, exc, tb))
        finally:
            self.cancelled_caught = scope.cancel.cancelled_caught
            if self.cancelled_caught:
                self._expired(scope)
        if self.cancelled_caught and self._fail:
            raise DeadlineExceeded(
                f"run {self._state.lease.run_id}: the deadline of {self._seconds:g} s "
                f"set at step {scope.position} passed")
        return handled

    def _expired(self, scope: _Deadline) -> None:
        """The scope expired: its children are cancelled and its unfinished steps recorded
        abandoned, at the run's next write."""
        why = f"the deadline of run {self._state.lease.run_id} at step {scope.position} passed"
        self._state.pending_cancels += [(c, why) for c in scope.children]
        state = self._state
        # (Not those an inner scope cut already: the code went on past them, and a replay
        # must cut this scope where it was cut, not at the inner scope's step.)
        unfinished = tuple(q for q in scope.steps
                           if q not in state.cut_short and (
                               (step := state.steps.get(q)) is None
                               or step.state not in FINAL_STEP_STATES))
        state.cut_short.update(unfinished)
        starts = tuple(state.starting[q] for q in unfinished if q in state.starting)
        if unfinished or scope.cut is None:  # (its expiry is recorded, cut or not)
            branch = scope.branch
            after = None if branch is None else f"{branch.prefix}{branch.counter}"
            state.pending_abandons.append(_Abandoned(scope.position, unfinished, starts, after))


class WorkflowRun:
    """Handed to workflow code: the run's identity and its deterministic helpers.

    ``await run.now()``, ``await run.random()`` and ``await run.uuid4()`` are recorded the
    first time and return the same value on every replay. Use ``run.gather`` for concurrency
    inside a workflow, so that replay finds each branch's steps where it left them.
    """

    def __init__(self, state: RunState, run_id: str, workflow: str, version: str,
                 attempt: int, client: Any = None) -> None:
        self._state = state
        self._client = client
        self.id = run_id
        self.workflow = workflow
        self.version = version
        self.attempt = attempt

    @property
    def client(self) -> Any:
        """The client the worker running this run was started from (``aiki.worker(client,
        ...)``); WorkflowUsageError for a worker made without one."""
        if self._client is None:
            raise WorkflowUsageError(f"run {self.id}: its worker was not started from a client "
                               "(aiki.worker(client, ...)), so there is none to make a "
                               "handle with; use client.handle(child.id) outside the "
                               "workflow")
        return self._client

    @property
    def cancelling(self) -> bool:
        """Whether this run is being cancelled (its awaits raise ``aiki.RunCancelled``
        outside ``run.shield()``)."""
        return self._state.cancelling

    @property
    def cancel_reason(self) -> str | None:
        """The reason given to ``handle.cancel``, while the run is being cancelled."""
        return self._state.cancel_reason

    def move_on_after(self, duration: float | datetime.timedelta) -> DeadlineScope:
        """A durable deadline: ``with run.move_on_after(timedelta(days=3)) as scope:``.
        Every await inside is cancelled once it passes (task attempts, sleeps and waits;
        children started inside are cancelled); the code goes on after the block, with
        ``scope.cancelled_caught`` True. The deadline is recorded at the first await inside,
        so a replay sees the same one, and a run waiting past it is woken by the server's
        timer. Nested scopes behave as Trio's: the earliest deadline wins, and each catches
        only its own expiry. A negative, NaN or infinite duration raises ValueError."""
        seconds = check_duration(duration, "run.move_on_after()")
        return DeadlineScope(self._state, seconds, False, "run.move_on_after()")

    def fail_after(self, duration: float | datetime.timedelta) -> DeadlineScope:
        """As :meth:`move_on_after`, but an expired scope raises ``aiki.DeadlineExceeded``
        at its end."""
        seconds = check_duration(duration, "run.fail_after()")
        return DeadlineScope(self._state, seconds, True, "run.fail_after()")

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Awaits inside run normally after a cancel (``aiki.RunCancelled`` is not raised):
        compensation, e.g. a refund. They must end within the cancel's grace period (60 s
        by default): when it ends they are cancelled and ``aiki.RunCancelled`` is raised at
        the end of the block (the server ends the run ``cancelled`` then, whatever it does).
        Branches of a ``run.gather`` begun inside are shielded too, and a shielded branch
        runs to its end when a sibling fails (or sees ``RunCancelled``) and cancels the
        others, as in Trio.

        As Trio's shield (it opens one: ``trio.CancelScope(shield=True)``), it shields from
        the durable deadlines of the scopes around it (``run.move_on_after`` /
        ``run.fail_after``): their expiry does not cut the awaits inside short (nor wake a
        run waiting inside), and takes effect when the shield exits. Only the code inside
        is shielded: the sibling branches of a ``run.gather`` are cut at the deadline as
        usual. Scopes opened inside it expire as usual. A shield does not hold the run on a
        worker that stops it (its lease lost or revoked, the worker stopped): then the
        awaits inside are cancelled too, and the run resumes from its checkpoints on its
        next lease."""
        state = self._state
        state.check_inside("run.shield()")
        outer = _open_deadlines()
        scope = state.open_shield()
        token = _SHIELDED.set(True)
        at = _SHIELD_AT.set(len(_DEADLINES.get()))
        try:
            with scope:
                yield
        except Suspend as exc:
            exc.shielded.update(id(d) for d in outer)
            raise
        finally:
            _SHIELD_AT.reset(at)
            _SHIELDED.reset(token)
            state.shields.discard(scope)
        if scope.cancelled_caught:
            if state.stopped:  # (the run's own scope is cancelled too: nothing more runs)
                raise Abandon(f"run {self.id}: stopped on this worker inside run.shield()")
            raise RunCancelled(self.id, state.cancel_reason)  # the grace period is over

    async def now(self) -> float:
        """Wall-clock seconds since the epoch, recorded once."""
        return float(await self._state.helper("now", self._state.sources.clock.now))

    async def random(self) -> float:
        """A float in [0, 1), recorded once."""
        return float(await self._state.helper("random", self._state.sources.rng.random))

    async def uuid4(self) -> str:
        """A random UUID (as a string), recorded once."""
        return str(await self._state.helper("uuid", self._state.sources.uuid4))

    async def gather(self, *awaitables: Awaitable[Any]) -> list[Any]:
        """Run awaitables (usually ``task.run(...)`` calls) concurrently; results in order.

        If one fails, the others are cancelled and its exception is raised as is.
        """
        state = self._state
        base = state.next_position()
        results: list[Any] = [None] * len(awaitables)
        failure: list[BaseException] = []
        abandoned: list[Abandon] = []
        released: list[Release] = []
        suspended: list[Suspend] = []

        async def branch(i: int, aw: Awaitable[Any], cancel: trio.CancelScope) -> None:
            _BRANCH.set((state, _Branch(f"{base}.{i}.")))
            try:
                results[i] = await aw
            except Release as exc:
                released.append(exc)  # the other branches finish their tasks in flight
            except Suspend as exc:
                suspended.append(exc)  # the others go on until they end or wait too
            except Abandon as exc:
                abandoned.append(exc)
                cancel.cancel()
            except Exception as exc:
                if not failure:
                    failure.append(exc)
                cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for i, aw in enumerate(awaitables):
                    nursery.start_soon(branch, i, aw, nursery.cancel_scope)
        except BaseException as exc:
            # A branch that abandoned the run (its lease may be gone) stops it here, whatever
            # cancelled the others meanwhile: a deadline scope around the gather would catch
            # its own cancellation, and the run would go on past work that never ran.
            if abandoned and _only_cancelled(exc):
                raise abandoned[0] from None
            # A branch that failed (a shielded task failing after a deadline scope around the
            # gather cut the others) raises its failure, as a Trio nursery raises a child's
            # beside the cancellation: the scope catches only its own cancellation, so the
            # failure is not lost, and a replay (where it may come first) raises it too.
            if failure and _only_cancelled(exc):
                raise failure[0] from None
            # A branch that gives the run back (the worker drains, or heard of a pause) does
            # so whatever cut the others: caught as a deadline scope's cancellation, the
            # run went on past a shielded task still retrying, and completed without its
            # outcome (seed 11).
            if released and _only_cancelled(exc):
                raise released[0] from None
            # Branches cut by a deadline (Cancelled) while others wait durably: the gather
            # does not end here, leaving those waits behind. The run waits for them (it
            # gives its slot back); its replay cuts the others at the same place again.
            if suspended and _only_cancelled(exc):
                raise _combined(suspended) from None
            raise
        if abandoned:
            raise abandoned[0]
        if failure:
            raise failure[0]
        if released:
            raise released[0]
        if suspended:  # every branch ended or waits: the run waits for the first to wake
            raise _combined(suspended)
        return results

    async def sleep(self, duration: float | datetime.timedelta) -> bool:
        """Sleep durably for ``duration`` (seconds, or a ``timedelta``).

        True if the whole duration passed, False if ``handle.wakeup()`` ended it early. A
        sleep longer than the worker's inline wait limit gives the worker's slot back; the
        server's timer wakes the run. On replay a finished sleep returns at once; one begun
        before counts from when it began (if the code now sleeps longer, it sleeps only the
        difference). Raises ValueError for a negative, NaN, infinite or over-10-year
        duration, and records nothing.
        """
        return await self._state.sleep(check_duration(duration, "run.sleep()"))

    async def _execute_task(self, task: TaskDefinition, payload: Any, key: str | None) -> Any:
        return await self._state.task(task, payload, key)

    async def _start_child(self, workflow: str, version: str, payload: str, key: str | None,
                           detached: bool) -> str:
        return await self._state.start_child(workflow, version, payload, key, detached)

    async def _join(self, child_id: str, result_type: Any) -> Any:
        return await self._state.join(child_id, result_type)

    async def _wait_event(self, name: str, timeout: float | None) -> StepRecord:
        return await self._state.wait_event(name, timeout)


MAX_DURATION = 10 * 365.25 * 86400.0


def check_duration(duration: float | datetime.timedelta, what: str) -> float:
    """``duration`` in seconds, or ValueError naming ``what`` and what is wrong with it."""
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise TypeError(f"{what} takes seconds (int or float) or a datetime.timedelta, "
                        f"not {type(duration).__name__}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what}: the duration must be a finite number, got {seconds}")
    if seconds < 0:
        raise ValueError(f"{what}: the duration must not be negative, got {seconds} s")
    if seconds > MAX_DURATION:
        raise ValueError(f"{what}: the duration must be at most 10 years, got {seconds} s")
    return seconds


async def run_workflow(
    workflow: WorkflowDefinition, assign: p.Assign, persist: Persist, sources: Sources,
    *, inline_retry_max: float = 10.0, draining: trio.Event | None = None,
    record_start_after: float = DEFAULT_RECORD_START_AFTER, nudges: Nudges | None = None,
    run_task: TaskRunner = call_task, on_state: Callable[[RunState], None] | None = None,
    lease_deadline: Callable[[], float] = lambda: math.inf,
    lease_renewed: Callable[[float], None] = lambda sent: None, flusher: Flusher | None = None,
    paused: Callable[[], bool] = lambda: False, client: Any = None,
    server_time: Callable[[], tuple[float, float]] | None = None, stops_shields: bool = True,
) -> None:
    """Drive one leased run to its end: completed, failed, suspended, released (the worker
    drains, or the run was paused: ``draining`` is set, ``paused()`` says which) or
    abandoned. ``flusher``: let completed task outcomes ride with the run's next write
    (:mod:`aiki.actors.outcomes`). ``stops_shields``: a task beside the workflow's code stops
    its ``run.shield()`` blocks when this call is cancelled from outside; False where the
    caller does (``RunState.stop``, as the Worker does for all its runs with one task)."""
    run = assign.run
    assert run.lease_owner is not None
    lease = Lease(run.id, run.lease_epoch, run.lease_owner)
    state = RunState(lease, {s.position: s for s in assign.steps}, persist, sources,
                     inline_retry_max, record_start_after,
                     trio.Event() if draining is None else draining, nudges or Nudges(),
                     workflow.name, run_task, lease_deadline, lease_renewed, flusher,
                     cancelling=run.cancel_requested_at is not None,
                     cancel_reason=run.cancel_reason, cancel_deadline=run.cancel_deadline,
                     paused=paused, server_time=server_time, claimed_at=run.updated_at)
    if on_state is not None:  # (a replay looks at what the code consumed)
        on_state(state)
    _BRANCH.set((state, state.root))
    bind_run(run.id, run.workflow, run.version, run.attempts, run.lease_owner)
    handle = WorkflowRun(state, run.id, run.workflow, run.version, run.attempts, client)
    attributes = tracing.run_attributes(run.id, run.workflow, run.version, run.attempts,
                                        run.lease_owner)
    with tracing.span(f"aiki.run {workflow.name}", attributes, parent=run.trace_context,
                      kind="CONSUMER"):
        try:
            payload = p.decode_value(run.payload, workflow.payload_type,
                                     what=f"payload of workflow {workflow.name!r}")
            if stops_shields:
                async with serving_nursery() as nursery:
                    nursery.start_soon(_stop_when_cancelled, state)
                    value = await workflow.execute(handle, payload)
            else:
                value = await workflow.execute(handle, payload)
            await state.flush_cancels()
            state.check_all_consumed()
            result = p.encode_value(value, workflow.result_type,
                                    what=f"result of workflow {workflow.name!r}")
        except Suspend as suspend:
            conditions, reason = suspend.conditions, suspend.reason
            try:
                await state.flush_cancels()
            except Abandon:
                return
            try:
                await state.write(lambda req: p.WaitRun(req, lease, conditions, reason))
            except Release:  # paused: it waits again once resumed (its steps replay)
                await _give_back(state)
            return
        except Release:
            await _give_back(state)
            return
        except Abandon:
            return
        except RunCancelled as exc:
            log.info("run %s (%s): cancelled%s", run.id, workflow.name,
                     f": {exc.reason}" if exc.reason else "")
            message = str(exc)
            try:  # ends it cancelled (a cancelling run ends so whatever it reports)
                await state.write(lambda req: p.FailRun(req, lease, "RunCancelled", message))
            except Release:  # paused: it ends cancelled once resumed
                await _give_back(state)
            except Abandon:
                pass
            return
        except TaskFailed as exc:
            trace = format_traceback(exc)
            if exc.__cause__ is None and exc.remote_traceback:  # replayed: the task's own first
                trace = f"{exc.remote_traceback}\nThen, in the workflow:\n{trace}"
            await _fail(state, workflow.name, exc.error_type, str(exc), trace)
            return
        except Exception as exc:
            await _fail(state, workflow.name, type(exc).__name__, str(exc), format_traceback(exc))
            return
        with tracing.span(f"aiki.complete {workflow.name}", {}):
            try:
                await state.carry(lambda req, saved: p.CompleteRun(req, lease, result, saved))
            except Release:  # paused: it completes once resumed (its steps replay)
                await _give_back(state)


async def _stop_when_cancelled(state: RunState) -> None:
    """Beside the workflow's code: when the run's scope is cancelled from outside (the
    worker stops it, or crashes), its ``run.shield()`` blocks are cancelled too. (Cancelled
    when the code ends as well: no shield is open then.)"""
    try:
        await trio.sleep_forever()
    finally:
        state.stop()


async def _give_back(state: RunState) -> None:
    """Give the run back at a step boundary: the worker drains, or the run was paused."""
    log.info("run %s: given back at a step boundary (the worker drains or the run was "
             "paused)", state.lease.run_id)
    paused = state.paused_seen or state.paused()
    try:
        await state.write(lambda req: p.ReleaseRun(req, state.lease, paused))
    except Release:
        if not state.pending:
            return
        # The outcomes waiting for a ride went first, refused as paused: they are not
        # committed, so the run's replay runs those tasks again once it is resumed. The run
        # goes back without them.
        state.pending.clear()
        with contextlib.suppress(Abandon, Release):
            await state.write(lambda req: p.ReleaseRun(req, state.lease, paused))
    except Abandon:
        pass


async def _fail(state: RunState, workflow: str, error_type: str, message: str,
                trace: str) -> None:
    log.warning("run %s (%s): failed: %s: %s\n%s", state.lease.run_id, workflow, error_type,
                message, trace)
    with tracing.span(f"aiki.fail {workflow}", {"aiki.error_type": error_type}) as span:
        tracing.fail(span, f"{error_type}: {message}")
        try:
            await state.write(lambda req: p.FailRun(req, state.lease, error_type, message,
                                                    trace))
        except Release:  # paused: it fails again once resumed, if it still does
            await _give_back(state)
        except Abandon:
            pass


MAX_TRACEBACK = 16 * 1024


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback (with its causes), its last 16 KiB: where it failed."""
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= MAX_TRACEBACK else "... (cut)\n" + text[-MAX_TRACEBACK:]


__all__ = ["DEFAULT_RECORD_START_AFTER", "Nudges", "WorkflowRun", "run_workflow"]
