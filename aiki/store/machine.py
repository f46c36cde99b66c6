"""The state machine of runs: the legal transitions, and what each store operation does.

Pure functions, no I/O. A store selects and locks the rows an operation concerns, hands them
here, and writes the :class:`Change` it gets back; so every store (memory, SQLite,
PostgreSQL) makes the same decisions and appends the same history, and the simulation's
checkers judge histories against the same tables (:data:`RUN_TRANSITIONS`,
:data:`STEP_TRANSITIONS`).

Run states: ``queued → running → completed | failed``; ``running → waiting → queued`` (a
durable sleep, an event, a long retry delay: the conditions are :class:`WaitRecord` rows
kept while the run waits); ``running → queued`` when a lease is given back or expires.
A cancel ends an unfinished run ``cancelled``: at once if it never ran, or after its
workflow has seen ``RunCancelled`` (queued again with its lease revoked), or when the
grace period for its compensation ends.

Controls (a client asks; the history names it and when): ``failed → queued`` (retry),
``queued | running | waiting → paused`` (pause), ``paused → queued | waiting | running``
(resume). A run paused while running keeps its lease until its worker gives it back: the
task in flight may record its outcome, but no step starts and the run does not end while it
is paused (:class:`~aiki.errors.RunPaused`); resumed before that, it runs on under that
lease. A run paused while waiting keeps its waits and does not wake; events sent meanwhile
are buffered. A fork copies a run's first steps into a new run.

A function here raises the :class:`~aiki.errors.AikiError` that refuses its operation
before deciding anything, so a refused operation changes nothing.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from aiki import schedules as sch
from aiki.errors import (
    IdempotencyConflict,
    InvalidFork,
    RunFinished,
    RunNotFound,
    RunNotPausable,
    RunNotPaused,
    RunNotRetryable,
    RunPaused,
    ScheduleConflict,
    ScheduleInvalid,
    ScheduleNotFound,
    StaleLease,
    StepConflict,
)
from aiki.records import (
    FINAL_STEP_STATES,
    TERMINAL_RUN_STATES,
    EventRecord,
    Lease,
    RunRecord,
    RunState,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitFor,
    WaitRecord,
    deadline_after,
    deadline_expiry,
    evolve,
    expired_deadline,
)
from aiki.store import ops as o

RUN_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "queued"), ("queued", "running"), ("running", "completed"), ("running", "failed"),
    ("running", "waiting"), ("running", "queued"), ("waiting", "queued"),
    ("failed", "queued"),  # retried by a client, after a fix
    # Cancelled (handle.cancel): at once, or when its grace period ends.
    ("queued", "cancelled"), ("running", "cancelled"), ("waiting", "cancelled"),
    ("paused", "cancelled"),  # (a paused run, once pause/resume exists, is cancellable too)
    # A run whose function ended waits for its children, then ends as decided.
    ("waiting", "completed"), ("waiting", "failed"),
    ("queued", "paused"), ("running", "paused"), ("waiting", "paused"),  # paused by a client
    ("paused", "queued"), ("paused", "waiting"),  # resumed by a client
    # Cancelled with no grace while children it did not detach are still being cancelled:
    # it ends after them (see ``cancel``).
    ("queued", "waiting"),
    ("paused", "running"),  # resumed before its worker gave it back: it runs on
})
CONTROLLABLE_STATES = frozenset({"queued", "running", "waiting"})  # that a pause may stop
# Task steps. ``running -> running``: a crash during an attempt runs that attempt again.
TASK_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "running"), ("running", "completed"), ("running", "failed"),
    ("running", "retrying"), ("retrying", "running"), ("running", "running"),
})
# Only from a worker that defers its start records (``record_start_after``): an attempt that
# ended before its start was written has its outcome recorded and nothing else.
UNSTARTED_TASK_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "completed"), (None, "failed"), (None, "retrying"),
    ("retrying", "completed"), ("retrying", "failed"), ("retrying", "retrying"),
})
# A task start its deadline scope cut on its way: the scope's abandon records it failed
# (``DeadlineExceeded``), whether or not the start is ever stored (it is refused after).
CUT_TASK_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({(None, "failed")})
# Wait steps (sleep, event), in history terms: they begin waiting, or end at once.
WAIT_STEP_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    ("waiting", "abandoned"),  # its deadline scope expired
    (None, "abandoned"),  # the scope cut its first ask on its way (an ask after finds it ended)
    (None, "waiting"), ("waiting", "waiting"), (None, "completed"), ("waiting", "completed"),
    (None, "received"), ("waiting", "received"), (None, "timed_out"), ("waiting", "timed_out"),
})
STEP_TRANSITIONS: Mapping[str, frozenset[tuple[str | None, str]]] = {
    "task": TASK_TRANSITIONS, "sleep": WAIT_STEP_TRANSITIONS, "event": WAIT_STEP_TRANSITIONS,
}
EVENT_TIMEOUT = "EventTimeout"
RUN_CANCELLED = "RunCancelled"  # the error type of a cancelled run
# How long the children of a failed run have to compensate before they end cancelled.
CASCADE_GRACE = 60.0


@attrs.frozen
class Entry:
    """A history event as decided here; the store numbers it (``seq``) when it writes it."""

    at: float
    event: str
    attempt: int
    worker_id: str | None = None
    position: str | None = None
    name: str | None = None
    detail: str | None = None


@attrs.frozen
class Change:
    """What one operation writes. ``run``: the run row as it must be (None: unchanged).
    ``waits``: the run's waits become exactly these (None: unchanged). ``consumed``: buffered
    events (by ``seq``) now delivered to a wait step's position. ``sent``: a new event (its
    ``seq`` is given by the store)."""

    run: RunRecord | None = None
    steps: tuple[StepRecord, ...] = ()
    dropped: tuple[str, ...] = ()  # positions of steps deleted (a retry runs them again)
    waits: tuple[WaitRecord, ...] | None = None
    consumed: tuple[tuple[int, str], ...] = ()
    sent: EventRecord | None = None
    history: tuple[Entry, ...] = ()

    def then(self, other: Change) -> Change:
        """Both changes, ``other`` after this one (its run and waits win)."""
        return Change(
            other.run if other.run is not None else self.run,
            self.steps + other.steps,
            self.dropped + other.dropped,
            other.waits if other.waits is not None else self.waits,
            self.consumed + other.consumed,
            other.sent or self.sent,
            self.history + other.history,
        )


NOTHING = Change()


def rows_only(change: Change) -> bool:
    """Whether ``change`` writes no more than its run's row, steps and history events (and
    may end the run's waits): what a store may write together with other runs' changes of
    the same kind, a statement per table."""
    return (not change.dropped and not change.consumed and change.sent is None
            and change.waits in (None, ()))


# -- errors ----------------------------------------------------------------------------------
def stale_lease_error(lease: Lease, run: RunRecord | None) -> StaleLease:
    if run is None:
        return StaleLease(f"run {lease.run_id} does not exist")
    return StaleLease(
        f"run {lease.run_id}: lease epoch {lease.epoch} of worker {lease.worker_id!r} is stale "
        f"(the run is {run.state}, epoch {run.lease_epoch}, owner {run.lease_owner!r})"
    )


def step_conflict_error(run_id: str, old: StepRecord, new: StepRecord) -> StepConflict:
    return StepConflict(
        f"run {run_id}: step {new.position} is already final as {old.name} {old.state}; "
        f"refusing to overwrite it with {new.name} {new.state}"
    )


def key_conflict_error(run_id: str, step: StepRecord, other: str) -> StepConflict:
    return StepConflict(
        f"run {run_id}: task {step.name!r} with idempotency key {step.idempotency_key!r} "
        f"is already recorded at step {other}"
    )


def fenced(lease: Lease, run: RunRecord | None) -> RunRecord:
    """``run`` if ``lease`` is its current lease; else :class:`StaleLease` (fencing)."""
    if (run is None or run.state != "running" or run.lease_epoch != lease.epoch
            or run.lease_owner != lease.worker_id):
        raise stale_lease_error(lease, run)
    return run


def held(lease: Lease, run: RunRecord | None) -> RunRecord:
    """``run`` if ``lease`` is its current lease, the run running or paused (its worker not
    having given it back yet); else :class:`StaleLease`."""
    if (run is None or run.state not in ("running", "paused") or run.lease_epoch != lease.epoch
            or run.lease_owner != lease.worker_id):
        raise stale_lease_error(lease, run)
    return run


def unpaused(lease: Lease, run: RunRecord | None, what: str = "ending it") -> RunRecord | None:
    """``run``, unless it is paused: then RunPaused if ``lease`` holds it, else StaleLease."""
    if run is not None and run.state == "paused":
        held(lease, run)
        raise paused_error(run, what)
    return run


def paused_error(run: RunRecord, what: str) -> RunPaused:
    return RunPaused(f"run {run.id} is paused: {what} is refused until it is resumed; give "
                     "the run back")


def _move(run: RunRecord, now: float, state: RunState, **changes: Any) -> RunRecord:
    if (run.state, state) not in RUN_TRANSITIONS and run.state != state:
        raise AssertionError(f"illegal run transition {run.state} -> {state} for {run.id}")
    return evolve(run, state=state, updated_at=now, **changes)


_NO_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


def when(at: float | None) -> str:
    """A time in a history detail, as people read it: ISO 8601 in UTC, to the millisecond."""
    if at is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- runs ------------------------------------------------------------------------------------
def enqueue(op: o.Enqueue) -> tuple[RunRecord, Entry]:
    """The new run and its first event (the store decides whether it is new)."""
    run = RunRecord(
        id=op.run_id, workflow=op.workflow, version=op.version, payload=op.payload,
        state="queued", idempotency_key=op.idempotency_key, attempts=0, lease_epoch=0,
        lease_owner=None, lease_expires_at=None, result=None, error_type=None,
        error_message=None, created_at=op.now, updated_at=op.now, finished_at=None,
        trace_context=op.trace_context,
    )
    return run, Entry(op.now, "run.queued", 0, detail=enqueue_detail(op))


def enqueue_detail(op: o.Enqueue) -> str:
    """The detail of a new run's first history event: its version, and who started it."""
    return f"version {op.version}" + (f"; {op.origin}" if op.origin else "")


ON_CONFLICT = ("raise", "return_existing")


def existing_for_key(op: o.Enqueue, existing_id: str, existing_payload: str) -> o.EnqueueOutcome:
    """The outcome of an enqueue whose idempotency key names an existing run."""
    if op.on_conflict == "raise" and existing_payload != op.payload:
        raise IdempotencyConflict(
            f"idempotency key {op.idempotency_key!r} of workflow {op.workflow!r} names run "
            f"{existing_id}, enqueued with another payload; nothing was stored (pass "
            "on_conflict='return_existing' to get that run)")
    return o.EnqueueOutcome(existing_id, created=False)


def claim(run: RunRecord, worker_id: str, now: float, lease_ttl: float) -> Change:
    run = _move(run, now, "running", attempts=run.attempts + 1,
                lease_epoch=run.lease_epoch + 1, lease_owner=worker_id,
                lease_expires_at=now + lease_ttl)
    return Change(run, history=(Entry(now, "run.running", run.attempts, worker_id,
                                      detail=f"lease epoch {run.lease_epoch}"),))


def renew(run: RunRecord | None, lease: Lease, now: float, lease_ttl: float) -> RunRecord | None:
    """The run with its lease extended, or None if ``lease`` is not its current one."""
    try:
        run = held(lease, run)
    except StaleLease:
        return None
    return evolve(run, lease_expires_at=now + lease_ttl, updated_at=now)


def lease_expired(run: RunRecord, now: float) -> bool:
    return (run.state in ("running", "paused") and run.lease_owner is not None
            and run.lease_expires_at is not None and run.lease_expires_at <= now)


def expire(run: RunRecord, now: float) -> Change:
    owner = run.lease_owner
    if run.state == "paused":  # its worker is gone: the run stays paused, with no lease
        return Change(evolve(run, updated_at=now, **_NO_LEASE), history=(Entry(
            now, "lease.expired", run.attempts, owner,
            detail=f"lease epoch {run.lease_epoch} of worker {owner!r} expired; the run "
                   "stays paused"),))
    return Change(_move(run, now, "queued", **_NO_LEASE), history=(Entry(
        now, "run.queued", run.attempts, owner,
        detail=f"lease epoch {run.lease_epoch} of worker {owner!r} expired"),))


def finish(run: RunRecord | None, lease: Lease, now: float, *, result: str | None = None,
           error: tuple[str, str] | None = None, traceback: str | None = None,
           children: int = 0) -> Change:
    """The run's function ended (``result``, or ``error``). ``children``: how many of the
    children it did not detach are unfinished; then its end is decided and recorded, and it
    waits for them (structured concurrency: a run ends after its children)."""
    if run is not None and run.state == "paused":
        held(lease, run)
        raise paused_error(run, "ending it")
    run = fenced(lease, run)
    if children:
        return _await_children(run, lease, now, result, error, traceback, children)
    if run.cancel_requested_at is not None:  # whatever the workflow did after the cancel
        return _cancelled(run, now, lease.worker_id, lease.epoch,
                          "its workflow ended after the cancel")
    state: RunState = "completed" if error is None else "failed"
    error_type, error_message = error if error else (None, None)
    run = _move(run, now, state, result=result, error_type=error_type,
                error_message=error_message, finished_at=now, error_traceback=traceback,
                **_NO_LEASE)
    return Change(run, waits=(), history=(Entry(
        now, f"run.{state}", run.attempts, lease.worker_id,
        detail=None if error is None else f"{error_type}: {error_message}"),))


def repeated(run: RunRecord | None, kind: str, control_id: str | None) -> bool:
    """Whether ``run``'s last control is this very request (sent again, its reply lost)."""
    return (run is not None and control_id is not None
            and run.control_id == f"{kind}:{control_id}")


def controlled(change: Change) -> o.ControlOutcome:
    """The outcome of a retry, pause or resume whose ``change`` is written: applied, unless
    it is the same request again (:func:`repeated`), which writes no history."""
    assert change.run is not None
    return o.ControlOutcome(change.run, applied=bool(change.history))


def _marked(kind: str, control_id: str | None) -> dict[str, Any]:
    return {"control_id": None if control_id is None else f"{kind}:{control_id}"}


def retry(run: RunRecord | None, run_id: str, steps: Sequence[StepRecord],
          version: str | None, who: str, now: float, control_id: str | None = None) -> Change:
    """``handle.retry()``: queue a failed run again, its attempts counted on. Completed steps
    are kept (replay returns them); failed and unfinished ones are dropped, so they run
    again. ``version`` re-pins the run (a fix deployed as a new version). The same request
    again (``control_id``) is answered with the run as it is."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if repeated(run, "retry", control_id):
        return Change(run)
    if run.state != "failed":
        raise RunNotRetryable(f"run {run.id} is {run.state}: only a failed run can be "
                              "retried; nothing changed")
    dropped = tuple(s.position for s in steps if s.state != "completed")
    moved = f", re-pinned from version {run.version} to {version}" if (
        version is not None and version != run.version) else ""
    again = _move(run, now, "queued", version=version or run.version, result=None,
                  error_type=None, error_message=None, error_traceback=None,
                  finished_at=None, **_marked("retry", control_id))
    return Change(again, dropped=dropped, history=(Entry(
        now, "run.queued", run.attempts, who,
        detail=f"retried by {who}{moved}; {len(dropped)} step(s) to run again, "
               f"{len(steps) - len(dropped)} kept"),))


def _cancelled(run: RunRecord, now: float, who: str | None, epoch: int, why: str) -> Change:
    """``run`` ends ``cancelled``; its lease epoch moves past ``epoch``, so no write under
    an earlier lease is accepted afterwards."""
    reason = run.cancel_reason
    ended = _move(run, now, "cancelled", lease_epoch=max(run.lease_epoch, epoch + 1),
                  result=None, error_type=RUN_CANCELLED, error_message=reason or "cancelled",
                  error_traceback=None, finished_at=now, **_NO_LEASE)
    return Change(ended, waits=(), history=(Entry(
        now, "run.cancelled", run.attempts, who,
        detail=why + (f"; reason: {reason}" if reason else "")),))


def _await_children(run: RunRecord, lease: Lease, now: float, result: str | None,
                    error: tuple[str, str] | None, traceback: str | None,
                    children: int) -> Change:
    if run.cancel_requested_at is not None:
        result, error, traceback = None, (RUN_CANCELLED, run.cancel_reason or "cancelled"), None
    error_type, error_message = error if error else (None, None)
    held = _move(run, now, "waiting", result=result, error_type=error_type,
                 error_message=error_message, error_traceback=traceback, **_NO_LEASE)
    how = "returned" if error is None else f"ended with {error_type}"
    return Change(held, waits=(WaitRecord(run.id, "", "children", None, None, now),),
                  history=(Entry(now, "run.waiting", run.attempts, lease.worker_id, detail=(
                      f"its function {how}; waits for {children} child run(s) to end")),))


def awaits_children(run: RunRecord, waits: Iterable[WaitRecord]) -> bool:
    """Whether ``run``'s function has ended and it waits for its children (it may have been
    paused meanwhile: it keeps that wait)."""
    return run.state in ("waiting", "paused") and any(w.kind == "children" for w in waits)


def _settle(run: RunRecord, now: float) -> Change:
    """A run whose function had ended: its last child ended, it ends as decided then (a
    paused one only if it was cancelled: a pause holds the end of a run, a cancel does not)."""
    state: RunState = ("cancelled" if run.cancel_requested_at is not None
                       else "failed" if run.error_type is not None else "completed")
    ended = _move(run, now, state, finished_at=now, **_NO_LEASE)
    return Change(ended, waits=(), history=(Entry(
        now, f"run.{state}", run.attempts, detail="its child runs have ended"
        + (f"; {run.error_type}: {run.error_message}" if state == "failed" else "")),))


def cancel(run: RunRecord | None, run_id: str, reason: str | None, grace: float, who: str,
           now: float, *, awaiting_children: bool = False, cascade: str | None = None,
           children: int = 0) -> tuple[Change, o.CancelOutcome]:
    """``handle.cancel()``. See :class:`aiki.store.ops.CancelRun`. A second cancel of a run
    being cancelled changes nothing and answers True (the first one's reason and grace
    stand). ``awaiting_children``: its function has ended and it waits for its children
    (it keeps waiting; they are cancelled; with none left it ends at once). ``cascade``:
    the ancestor whose cancel reaches this run (the store cancels a run's unfinished, not
    detached descendants first, the deepest first, in the same transaction). ``children``:
    how many of its children it did not detach are still unfinished (after that cascade):
    with no grace, a run with any ends after them (see the branch below).

    A paused run that no worker holds ends ``cancelled`` at once (nothing of it runs: it
    cannot compensate), or, when children it waits for are still unfinished (in their own
    grace period), as soon as the last one has ended. A paused run whose worker had not
    given it back yet has that lease revoked and stays paused: resumed within the grace
    period, its workflow sees RunCancelled and compensates; when the period ends it ends
    ``cancelled`` all the same."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if run.state in TERMINAL_RUN_STATES:
        return NOTHING, o.CancelOutcome(False, None, None)
    if run.cancel_requested_at is not None:
        return NOTHING, o.CancelOutcome(True, None, None)
    if cascade is not None:
        who = f"{who}, through run {cascade}"
    holder = run.lease_owner  # (only a run that is held has an owner)
    marked = evolve(run, cancel_requested_at=now, cancel_reason=reason,
                    cancel_deadline=now + grace)
    asked = Entry(now, "cancel.requested", run.attempts, who, detail=(
        f"by {who}" + (f": {reason}" if reason else "")
        + f"; grace {grace:g} s, until {when(now + grace)}"))
    if awaiting_children:  # its end waits for its children, which are cancelled
        change = Change(evolve(marked, updated_at=now, result=None,
                               error_type=RUN_CANCELLED,
                               error_message=reason or "cancelled", error_traceback=None),
                        history=(asked,))
        if children == 0:  # (its last child ended while it was paused)
            assert change.run is not None
            change = change.then(_settle(change.run, now))
    elif run.attempts == 0 or (grace <= 0 and children == 0):
        why = "cancelled before it ever ran" if run.attempts == 0 else "cancelled with no grace"
        change = Change(history=(asked,)).then(
            _cancelled(marked, now, who, run.lease_epoch, why))
    elif grace <= 0:
        # Children of it still unfinished, each in the grace period of an earlier cancel
        # (its own failure's cascade, say), which this one's cascade leaves as it was: its
        # lease is revoked, and it ends only after them. Its deadline is now: the timer's
        # next pass ends them, the deepest first, then it (seed 15319: it ended at once,
        # before a child that waited for its own children).
        change = _given_up(marked, now, who, asked, children, "cancelled with no grace",
                           lease_epoch=run.lease_epoch + 1, **_NO_LEASE)
    elif run.state == "paused" and run.lease_owner is None and children == 0:
        change = Change(history=(asked,)).then(
            _cancelled(marked, now, who, run.lease_epoch,
                       "cancelled while paused, with no worker holding it"))
    elif run.state == "paused" and run.lease_owner is None:
        change = _given_up(marked, now, who, asked, children, "cancelled while paused")
    elif run.state == "paused":  # held: it stays paused, and compensates once resumed
        bump = 1 if run.lease_owner is not None else 0  # (its worker had not given it back)
        held_back = evolve(marked, updated_at=now, lease_epoch=run.lease_epoch + bump,
                           **_NO_LEASE)
        asked = evolve(asked, detail=(asked.detail or "") + (
            "; it stays paused: once resumed its workflow sees RunCancelled, and when the "
            "grace period ends it ends cancelled all the same"))
        change = Change(held_back, waits=(), history=(asked,))
    else:
        again = _move(marked, now, "queued", lease_epoch=run.lease_epoch + 1, **_NO_LEASE)
        revoked = [] if run.state == "queued" else [Entry(
            now, "run.queued", run.attempts, who,
            detail=(f"cancelled: lease epoch {run.lease_epoch} of worker {holder!r} revoked"
                    if holder else "cancelled: its waits are dropped")
            + "; its workflow sees RunCancelled where it stands")]
        change = Change(again, waits=(), history=(asked, *revoked))
    return change, o.CancelOutcome(True, change.run, holder)


def _given_up(marked: RunRecord, now: float, who: str, asked: Entry, children: int,
              why: str, **changes: Any) -> Change:
    """A cancelled run (``marked``) whose function is given up, its ``children`` still
    unfinished: it waits for them, and ends ``cancelled`` once the last one has ended."""
    held_back = _move(marked, now, "waiting", result=None, error_type=RUN_CANCELLED,
                      error_message=marked.cancel_reason or "cancelled", error_traceback=None,
                      **changes)
    return Change(held_back, waits=(WaitRecord(marked.id, "", "children", None, None, now),),
                  history=(asked, Entry(now, "run.waiting", marked.attempts, who,
                                        detail=f"{why}; waits for {children} child run(s) "
                                               "to end")))


def cancel_overdue(run: RunRecord, now: float) -> bool:
    """Whether ``run``'s cancel grace period has ended with the run still unfinished."""
    return (run.state not in TERMINAL_RUN_STATES and run.cancel_deadline is not None
            and run.cancel_deadline <= now)


def end_cancel(run: RunRecord, now: float, ancestor: str | None = None) -> Change:
    """The timer: the grace period of ``run``'s cancel (or of its ``ancestor``'s, whose end
    waits for it) is over; it ends ``cancelled`` (a worker still holding it is fenced off:
    the epoch moves on)."""
    if ancestor is not None:
        if run.cancel_requested_at is None:
            run = evolve(run, cancel_requested_at=now,
                         cancel_reason=f"run {ancestor} was cancelled")
        return _cancelled(run, now, None, run.lease_epoch,
                          f"the grace period of run {ancestor}'s cancel ended")
    return _cancelled(run, now, None, run.lease_epoch,
                      f"its grace period ended at {when(run.cancel_deadline)}")


# -- children --------------------------------------------------------------------------------
def start_child(parent: RunRecord | None, lease: Lease, old: StepRecord | None,
                step: StepRecord, op: o.StartChild) -> tuple[Change, RunRecord | None, Entry]:
    """``wf.start_child()`` reaches ``step``: the child run (None when the step is recorded
    already: a replay or a retried write), its first event, and the parent's change."""
    parent = held(lease, parent)
    if parent.state == "paused":
        raise paused_error(parent, f"starting a child run at step {step.position}")
    if step.kind != "child":
        raise StepConflict(f"run {parent.id}: step {step.position} is a {step.kind} step, "
                           "not a child's start")
    first = Entry(op.now, "run.queued", 0, lease.worker_id, detail=(
        f"version {op.version}; child of run {parent.id} at step {step.position}"
        + (", detached" if op.detached else "")))
    if old is not None:
        if (old.kind, old.name, old.input_hash, old.idempotency_key) != (
                step.kind, step.name, step.input_hash, step.idempotency_key):
            raise step_conflict_error(parent.id, old, step)
        return NOTHING, None, first
    child = RunRecord(
        id=op.child_id, workflow=op.workflow, version=op.version, payload=op.payload,
        state="queued", idempotency_key=None, attempts=0, lease_epoch=0, lease_owner=None,
        lease_expires_at=None, result=None, error_type=None, error_message=None,
        created_at=op.now, updated_at=op.now, finished_at=None, parent_id=parent.id,
        detached=op.detached)
    done = evolve(step, state="completed", output=json.dumps(op.child_id), attempts=1)
    return Change(evolve(parent, updated_at=op.now), (done,), history=(Entry(
        op.now, "child.started", 1, lease.worker_id, step.position, step.name,
        f"run {op.child_id} (version {op.version})"
        + (", detached" if op.detached else "")),)), child, first


def _joined(step: StepRecord, child: RunRecord, now: float, who: str | None) -> Change:
    """A wait for ``child`` (a ``join`` step) ends: with its result, or failed with
    ``ChildFailed`` (its error) or ``ChildCancelled`` (its reason)."""
    if child.state == "completed":
        done = evolve(step, state="completed", output=child.result)
    elif child.state == "cancelled":
        done = evolve(step, state="failed", error_type="ChildCancelled",
                      error_message=child.cancel_reason or "")
    else:
        done = evolve(step, state="failed", error_type="ChildFailed",
                      error_message=f"{child.error_type}: {child.error_message}")
    return Change(steps=(done,), history=(Entry(
        now, "join.ended", step.attempts, who, step.position, step.name,
        f"child run {child.id} {child.state}"),))


def child_ended(parent: RunRecord, joins: Sequence[StepRecord], waits: Sequence[WaitRecord],
                child: RunRecord, unfinished: int, now: float) -> Change:
    """``child`` (of ``parent``) has ended. ``joins``: the parent's ``join`` steps still
    waiting for it; ``unfinished``: the parent's children it did not detach still
    unfinished. Those waits end (whatever the child's end: completed, failed or
    cancelled); a parent waiting on them wakes; one whose function had ended and waits for
    its children ends once the last one has."""
    change = NOTHING
    for step in joins:
        change = change.then(_joined(step, child, now, None))
    if awaits_children(parent, waits):
        if unfinished == 0 and (parent.state == "waiting"
                                or parent.cancel_requested_at is not None):
            return change.then(_settle(parent, now))
        return change  # (a paused one settles when it is resumed)
    if parent.state != "waiting":
        return change if change is NOTHING else change.then(
            Change(evolve(parent, updated_at=now)))
    if any(w.kind == "join" and w.name == child.id for w in waits):
        return change.then(_wake(parent, now, f"child run {child.id} ended {child.state}"))
    return change


def pause(run: RunRecord | None, run_id: str, who: str, now: float,
          control_id: str | None = None) -> Change:
    """``handle.pause()``: the run stops at its next step boundary. A queued run is simply
    not claimed; a waiting one keeps its waits (it does not wake); a running one keeps its
    lease until its worker, told or refused, gives it back."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if repeated(run, "pause", control_id):
        return Change(run)
    if run.state not in CONTROLLABLE_STATES:
        raise RunNotPausable(f"run {run.id} is {run.state}: only a queued, running or waiting "
                             "run can be paused; nothing changed")
    detail = f"paused by {who}"
    if run.state == "running":
        detail += (f"; worker {run.lease_owner!r} finishes the task in flight and gives it "
                   "back, no new step starts")
    elif run.state == "waiting":
        detail += "; it keeps its waits, and does not wake until resumed"
    return Change(_move(run, now, "paused", **_marked("pause", control_id)), history=(Entry(
        now, "run.paused", run.attempts, who, detail=detail),))


def resume(run: RunRecord | None, run_id: str, waits: Sequence[WaitRecord],
           steps: Mapping[str, StepRecord], buffered: Mapping[str, float], who: str,
           now: float, control_id: str | None = None, *, children: int = 0) -> Change:
    """``handle.resume()``: a paused run goes back to waiting if its waits still wait, or to
    the queue, as if the pause had only held it: its due sleeps end, and its due event
    waits time out unless their event was sent (and buffered) before they came due.
    ``buffered``: the names of its undelivered events, each with when the first was sent.
    ``children``: how many of its children it did not detach are unfinished; a run whose
    function had ended, waiting for them, ends as decided then if none is left (its last
    child ended while it was paused).

    A run whose worker had not given it back yet runs on under that lease (``running``, the
    same epoch); a worker told of the pause gives it back at its next step boundary all the
    same. It is not fenced off and queued: another worker could claim it at once while the
    holder, whose lease it still believes live (its local deadline), runs a task body whose
    start it recorded before the pause and heard of late, after the other worker committed
    that task's result (seed 129 with the enqueue that claims a free slot)."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if repeated(run, "resume", control_id):
        return Change(run)
    if run.state != "paused":
        raise RunNotPaused(f"run {run.id} is {run.state}, not paused: there is nothing to "
                           "resume; nothing changed")
    marked = _marked("resume", control_id)
    detail = f"resumed by {who}"
    if run.lease_owner is not None:  # (held: it was running, and has no waits)
        return Change(_move(run, now, "running", **marked), history=(Entry(
            now, "run.running", run.attempts, who,
            detail=f"{detail}; worker {run.lease_owner!r} still holds it: it runs on under "
                   f"lease epoch {run.lease_epoch}"),))
    if any(w.kind == "children" for w in waits) and children == 0:
        back = _move(run, now, "waiting", **marked)
        return Change(back, history=(Entry(
            now, "run.waiting", run.attempts, who,
            detail=f"{detail}; its child runs ended while it was paused"),)).then(
            _settle(back, now))
    if waits:
        names = set(buffered)
        why = next((held_why for c in waits
                    if (held_why := _satisfied(WaitFor(c.position, c.kind, c.name, c.due_at),
                                               steps.get(c.position), names, now)) is not None),
                   None)
        if why is None:
            return Change(_move(run, now, "waiting", **marked), history=(Entry(
                now, "run.waiting", run.attempts, who,
                detail=f"{detail}; waits for {describe_waits(waits)}"),))
        change = NOTHING
        for w in waits:
            step = steps.get(w.position)
            if w.due_at is None or w.due_at > now or step is None or (
                    step.state in FINAL_STEP_STATES):
                continue
            if w.kind == "sleep":
                change = change.then(_end_sleep(step, now, False, None))
            elif w.kind == "event" and not buffered.get(w.name or "", math.inf) <= w.due_at:
                change = change.then(_time_out(step, now, None))
        detail += f"; woke at once: {why}"
        resumed = Entry(now, "run.queued", run.attempts, who, detail=detail)
        # (The resume first, then what it ended: nothing ends while the run is paused.)
        return Change(_move(run, now, "queued", **marked), change.steps, waits=(),
                      history=(resumed, *change.history))
    return Change(_move(run, now, "queued", **marked), waits=(), history=(Entry(
        now, "run.queued", run.attempts, who, detail=detail),))


def fork_again(existing: RunRecord, op: o.ForkRun) -> o.ControlOutcome:
    """A fork whose new run id exists already: the same fork sent again (its reply lost)
    gets that run; any other run under that id is a refusal."""
    if existing.forked_from != op.run_id or existing.forked_steps != op.from_step:
        raise InvalidFork(f"run id {op.new_run_id!r} is taken by another run; nothing was "
                          "stored")
    return o.ControlOutcome(existing, applied=False)


def first_sent(events: Iterable[EventRecord]) -> dict[str, float]:
    """The names of undelivered ``events``, each with when its first one was sent."""
    first: dict[str, float] = {}
    for e in events:
        if e.position is None:
            first[e.name] = min(first.get(e.name, math.inf), e.sent_at)
    return first


def position_key(position: str) -> tuple[int, ...]:
    """The order of steps in a run: ``"2"`` before ``"2.0.0"`` before ``"2.1.0"`` before
    ``"3"``."""
    return tuple(int(x) if x.isdigit() else -1 for x in position.split("."))


def fork(original: RunRecord | None, op: o.ForkRun,
         steps: Sequence[StepRecord]) -> tuple[RunRecord, Change, Change]:
    """``client.fork()``: a new run of the same workflow and payload whose first
    ``op.from_step`` steps (in position order) are copies of ``original``'s; the rest run
    fresh. The new run, its change (steps and first event) and the original's (an event)."""
    if original is None:
        raise RunNotFound(f"no run with id {op.run_id!r}")
    ordered = sorted(steps, key=lambda s: position_key(s.position))
    if not 0 <= op.from_step <= len(ordered):
        raise InvalidFork(f"run {original.id} has {len(ordered)} step(s): from_step must be "
                          f"0 to {len(ordered)}, got {op.from_step}; nothing was stored")
    copied = _scopes_as_copied(ordered[: op.from_step])
    unfinished = next((s for s in copied if s.state not in FINAL_STEP_STATES), None)
    if unfinished is not None:
        at = ordered.index(unfinished)
        raise InvalidFork(f"run {original.id}: step {unfinished.position} ({unfinished.name}) "
                          f"is {unfinished.state}, not finished: fork from at most step {at}; "
                          "nothing was stored")
    version = op.version or original.version
    run = RunRecord(
        id=op.new_run_id, workflow=original.workflow, version=version,
        payload=original.payload, state="queued", idempotency_key=None, attempts=0,
        lease_epoch=0, lease_owner=None, lease_expires_at=None, result=None, error_type=None,
        error_message=None, created_at=op.now, updated_at=op.now, finished_at=None,
        forked_from=original.id, forked_steps=op.from_step)
    made = Change(run, copied, history=(Entry(
        op.now, "run.queued", 0, op.who,
        detail=f"forked by {op.who} from run {original.id} at step {op.from_step} (version "
               f"{version}); {len(copied)} step(s) copied"),))
    noted = Change(history=(Entry(
        op.now, "fork.created", original.attempts, op.who,
        detail=f"forked by {op.who} at step {op.from_step} into run {op.new_run_id}"),))
    return run, made, noted


def _scopes_as_copied(copied: Sequence[StepRecord]) -> tuple[StepRecord, ...]:
    """The steps a fork copies (a prefix in position order), each deadline scope's expiry
    kept only where it cut within them: the steps after run afresh, and decide afresh
    whether the scope expires over them."""
    if not copied:
        return ()
    last = position_key(copied[-1].position)
    out = []
    for step in copied:
        if step.kind == "deadline" and step.output is not None:
            at, cut = deadline_expiry(step)
            if cut is not None:
                kept = tuple(q for q in cut if position_key(q) <= last)
                if kept != cut:
                    step = evolve(step, output=expired_deadline(
                        at, kept, deadline_after(step)) if kept else json.dumps(at))
        out.append(step)
    return tuple(out)


def purgeable(run: RunRecord, before: float) -> bool:
    """Whether retention may delete ``run``: it finished, before ``before``."""
    return (run.state in TERMINAL_RUN_STATES and run.finished_at is not None
            and run.finished_at < before)


def release(run: RunRecord | None, lease: Lease, now: float, reason: str) -> Change:
    run = held(lease, run)
    if run.state == "paused":
        return Change(evolve(run, updated_at=now, **_NO_LEASE), history=(Entry(
            now, "lease.released", run.attempts, lease.worker_id,
            detail=f"{reason}; the run stays paused"),))
    return Change(_move(run, now, "queued", **_NO_LEASE), history=(Entry(
        now, "run.queued", run.attempts, lease.worker_id, detail=reason),))


# -- task steps ------------------------------------------------------------------------------
def step_progress(step: StepRecord) -> tuple[int, int]:
    """How far a step has got: its attempt, then running (0) before that attempt's outcome (1).

    Within one lease a step only moves forward; a write behind the stored one is a late
    duplicate (the network delivered it twice, or out of order) and changes nothing.
    """
    return (step.attempts, 0 if step.state == "running" else 1)


def step_write_changes(run_id: str, old: StepRecord | None, new: StepRecord, *,
                       save: bool) -> bool:
    """False: the write changes nothing (an identical re-save whose first reply was lost, or
    a late duplicate behind the stored step). Raises StepConflict when ``old`` is final and
    ``new`` differs. True: write it. ``save`` is False for StartStep."""
    if save and old == new:
        return False
    if old is not None and old.state in FINAL_STEP_STATES:
        raise step_conflict_error(run_id, old, new)
    return old is None or step_progress(new) >= step_progress(old)


def history_event_for_step(step: StepRecord) -> tuple[str, str | None]:
    """The history event name and detail that saving ``step`` appends."""
    if step.kind in ("now", "random", "uuid", "deadline"):
        return "step.recorded", step.kind
    if step.state == "retrying":
        detail = (f"{step.error_type}: {step.error_message}; "
                  f"next attempt at {when(step.next_attempt_at)}")
        return "task.retrying", detail
    if step.state == "failed":
        return "task.failed", f"{step.error_type}: {step.error_message}"
    return f"task.{step.state}", None


def decide_step(op: o.StartStep | o.SaveStep, run: RunRecord | None, old: StepRecord | None,
                keyed_elsewhere: str | None) -> Change:
    """:func:`save_step` for a store's StartStep or SaveStep op, given what it read."""
    lease_ttl = op.lease_ttl if isinstance(op, o.StartStep) else None
    return save_step(run, op.lease, old, keyed_elsewhere, op.step, op.now,
                     start=isinstance(op, o.StartStep), lease_ttl=lease_ttl)


def save_step(run: RunRecord | None, lease: Lease, old: StepRecord | None,
              keyed_elsewhere: str | None, step: StepRecord, now: float, *,
              start: bool, lease_ttl: float | None = None) -> Change:
    """StartStep (``start``) or SaveStep. ``keyed_elsewhere``: the position of another step
    of this run with the same task name and idempotency key, if any. A start with
    ``lease_ttl`` renews the lease, even when the step was started before (a retry).

    On a paused run only the outcome of a task attempt in flight is taken: one whose start
    was recorded, or not recorded at all (a worker that defers its start records); a start,
    the next attempt of a retrying task or a new ``run.now()`` is refused (RunPaused)."""
    run = held(lease, run)
    if run.state == "paused" and not (not start and old == step):
        in_flight = (not start and step.kind == "task" and step.state != "running"
                     and (old is None or (old.state == "running"
                                          and old.attempts == step.attempts)))
        if not in_flight:
            raise paused_error(run, f"step {step.position} ({step.name})"
                               if start or old is None or step.kind != "task"
                               else f"attempt {step.attempts} of step {step.position}")
    if step.kind in ("sleep", "event", "child", "join"):
        raise StepConflict(f"run {run.id}: step {step.position} is a {step.kind} step; "
                           "wait steps are recorded by AwaitStep")
    renewed = start and lease_ttl is not None
    if start and lease_ttl is not None:
        run = evolve(run, lease_expires_at=now + lease_ttl, updated_at=now)
    if not step_write_changes(run.id, old, step, save=not start):
        return Change(run) if renewed else NOTHING
    if step.idempotency_key is not None and keyed_elsewhere is not None:
        raise key_conflict_error(run.id, step, keyed_elsewhere)
    if start:
        step = evolve(step, state="running")
        event, detail = "task.running", None
    else:
        event, detail = history_event_for_step(step)
    return Change(run if renewed else evolve(run, updated_at=now), (step,), history=(Entry(
        now, event, step.attempts, lease.worker_id, step.position, step.name, detail),))


DEADLINE_EXCEEDED = "DeadlineExceeded"


def abandon(run: RunRecord | None, lease: Lease, steps: Sequence[StepRecord], scope: str,
            now: float, deadline: StepRecord | None = None,
            cut: Sequence[str] = (), starts: Sequence[StepRecord] = (),
            after: str | None = None) -> Change:
    """``steps`` (those of the op's positions that exist) stood in the deadline scope at
    ``scope``, which expired: the ones not final end failed with ``DeadlineExceeded``, their
    output the scope's position.

    ``deadline``: the scope's own step, where its deadline is recorded; it records the
    expiry too, with ``cut``, the positions the expiry cut short (all of the op's, those
    with no step and those final already included): a replay cuts the scope at the same
    place even where the step it cut had ended on the server meanwhile (a sleep woken, a
    task's outcome committed while the worker's deadline passed), or was never recorded.
    The outcome the workflow sees of that step, its deadline, does not change. ``after``:
    the position the code after the scope was to take next, recorded with the first expiry
    (kept thereafter): a replay cuts the scope at a call there that matches the step the
    code after it recorded (seed 2878).

    ``starts``: task starts cut while on their way; one with no step stored yet is stored
    failed, so that if it arrives later it is refused (a final step), not left running."""
    run = held(lease, run)
    if run.state == "paused":
        raise paused_error(run, f"the expiry of the deadline scope at step {scope}")
    change = NOTHING
    if deadline is not None and deadline.kind == "deadline" and deadline.output is not None:
        at, before = deadline_expiry(deadline)
        union = tuple(dict.fromkeys((*(before or ()), *cut)))
        if before is None or union != before:
            first = after if before is None else deadline_after(deadline)
            expired = evolve(deadline, output=expired_deadline(at, union, first))
            change = Change(steps=(expired,), history=(Entry(
                now, "deadline.expired", deadline.attempts, lease.worker_id, scope,
                deadline.name, "cut short: " + (", ".join(union) or "no step")),))
    stored = {s.position for s in steps}
    for step in (*steps, *(s for s in starts if s.position not in stored)):
        if step.state in FINAL_STEP_STATES or step.kind not in (
                "task", "sleep", "event", "join"):
            continue
        done = evolve(step, state="failed", error_type=DEADLINE_EXCEEDED,
                      output=json.dumps(scope),
                      error_message=f"its deadline scope at step {scope} expired")
        event = "task.failed" if step.kind == "task" else f"{step.kind}.abandoned"
        change = change.then(Change(steps=(done,), history=(Entry(
            now, event, step.attempts, lease.worker_id, step.position, step.name,
            f"{DEADLINE_EXCEEDED}: its deadline scope at step {scope} expired"),)))
    if change is NOTHING:
        return NOTHING
    return change.then(Change(evolve(run, updated_at=now)))


# -- waits -----------------------------------------------------------------------------------
def _end_sleep(step: StepRecord, now: float, woken: bool, who: str | None) -> Change:
    done = evolve(step, state="completed", output="false" if woken else "true")
    detail = "woken early" if woken else "slept"
    return Change(steps=(done,), history=(Entry(
        now, "sleep.completed", step.attempts, who, step.position, step.name, detail),))


def _receive(step: StepRecord, event: EventRecord, now: float, who: str | None) -> Change:
    done = evolve(step, state="completed", output=event.payload)
    return Change(steps=(done,), consumed=((event.seq, step.position),), history=(Entry(
        now, "event.received", step.attempts, who, step.position, step.name,
        f"sent at {when(event.sent_at)}" + (f", key {event.idempotency_key!r}"
                                       if event.idempotency_key else "")),))


def _time_out(step: StepRecord, now: float, who: str | None) -> Change:
    done = evolve(step, state="failed", error_type=EVENT_TIMEOUT,
                  error_message=f"no {step.name!r} event by {when(step.next_attempt_at)}")
    return Change(steps=(done,), history=(Entry(
        now, "event.timed_out", step.attempts, who, step.position, step.name,
        f"due at {when(step.next_attempt_at)}"),))


def await_step(run: RunRecord | None, lease: Lease, old: StepRecord | None,
               buffered: EventRecord | None, step: StepRecord,
               now: float, child: RunRecord | None = None) -> tuple[Change, StepRecord]:
    """A sleep or event wait reaches ``step.position``: end it now if it can, else record it
    as waiting until ``step.next_attempt_at``. ``buffered``: the oldest undelivered event of
    that name. The outcome is the step as stored afterwards."""
    run = held(lease, run)
    if run.state == "paused" and (old is None or old.state not in FINAL_STEP_STATES):
        raise paused_error(run, f"the wait at step {step.position}")
    if step.kind not in ("sleep", "event", "join"):
        raise StepConflict(f"run {run.id}: step {step.position} is a {step.kind} step, "
                           "not a wait")
    if old is not None:
        if (old.kind, old.name) != (step.kind, step.name):
            raise step_conflict_error(run.id, old, step)
        if old.state in FINAL_STEP_STATES:
            return NOTHING, old
    who = lease.worker_id
    due = step.next_attempt_at
    waiting = evolve(step, state="running", output=None, error_type=None,
                     error_message=None)
    if step.kind == "sleep" and due is not None and due <= now:
        change = _end_sleep(waiting, now, False, who)
    elif step.kind == "event" and buffered is not None:
        change = _receive(waiting, buffered, now, who)
    elif step.kind == "event" and due is not None and due <= now:
        change = _time_out(waiting, now, who)
    elif step.kind == "join" and child is not None and child.state in TERMINAL_RUN_STATES:
        change = _joined(waiting, child, now, who)
    elif old is not None and old == waiting:
        return NOTHING, old
    else:
        until = "for ever" if due is None else f"until {when(due)}"
        change = Change(steps=(waiting,), history=(Entry(
            now, f"{step.kind}.waiting", step.attempts, who, step.position, step.name,
            until),))
    return evolve(change, run=evolve(run, updated_at=now)), change.steps[-1]


def _satisfied(cond: WaitFor, step: StepRecord | None, buffered: set[str],
               now: float) -> str | None:
    """Why ``cond`` holds already (the run need not wait for it), or None."""
    if cond.due_at is not None and cond.due_at <= now:
        return f"{cond.kind} at step {cond.position} was due at {when(cond.due_at)}"
    if cond.kind in ("sleep", "event", "join") and step is not None and (
            step.state in FINAL_STEP_STATES):
        return f"{cond.kind} at step {cond.position} ended while the run was held"
    if cond.kind == "event" and cond.name in buffered:
        return f"event {cond.name!r} is waiting to be delivered"
    return None


def wait(run: RunRecord | None, lease: Lease, conditions: Sequence[WaitFor],
         steps: Mapping[str, StepRecord], buffered: Iterable[str], now: float,
         reason: str) -> Change:
    """The worker gives the run back until one of ``conditions`` holds. ``steps``: the run's
    steps at the conditions' positions; ``buffered``: names of its undelivered events. If one
    holds already, the run is queued at once instead. A paused run keeps the conditions and
    stays paused (resuming it decides)."""
    run = held(lease, run)
    if not conditions:
        raise StepConflict(f"run {run.id}: a run cannot wait on nothing")
    if run.state == "paused":
        waits = tuple(WaitRecord(run.id, c.position, c.kind, c.name, c.due_at, now)
                      for c in conditions)
        return Change(evolve(run, updated_at=now, **_NO_LEASE), waits=waits,
                      history=(Entry(now, "lease.released", run.attempts, lease.worker_id,
                                     detail=f"{reason}; the run stays paused, and will wait "
                                            f"for {describe_waits(waits)}"),))
    names = set(buffered)
    for cond in conditions:
        why = _satisfied(cond, steps.get(cond.position), names, now)
        if why is not None:
            return Change(_move(run, now, "queued", **_NO_LEASE), waits=(), history=(Entry(
                now, "run.queued", run.attempts, lease.worker_id,
                detail=f"{reason}; woke at once: {why}"),))
    waits = tuple(WaitRecord(run.id, c.position, c.kind, c.name, c.due_at, now)
                  for c in conditions)
    return Change(_move(run, now, "waiting", **_NO_LEASE), waits=waits, history=(Entry(
        now, "run.waiting", run.attempts, lease.worker_id,
        detail=f"{reason}; waits for {describe_waits(waits)}"),))


def describe_waits(waits: Iterable[WaitRecord | WaitFor]) -> str:
    parts = []
    for w in waits:
        what = {"sleep": "a sleep", "event": f"event {w.name!r}",
                "retry": f"the retry of task {w.name!r}",
                "join": f"the end of child run {w.name}",
                "deadline": "the deadline of the scope",
                "children": "the end of its child runs"}[w.kind]
        until = "" if w.due_at is None else f" until {when(w.due_at)}"
        at = "" if w.kind == "children" else f" at step {w.position}"
        parts.append(f"{what}{at}{until}")
    return " or ".join(parts)


def _wake(run: RunRecord, now: float, why: str) -> Change:
    return Change(_move(run, now, "queued"), waits=(), history=(Entry(
        now, "run.queued", run.attempts, detail=why),))


def wake_due(run: RunRecord, waits: Sequence[WaitRecord], steps: Mapping[str, StepRecord],
             now: float) -> Change:
    """The timer: ``run`` is waiting and some of its ``waits`` are due. Due sleeps end, due
    event waits time out, and the run is queued again."""
    change = NOTHING
    # In position order whatever order the store read them in: the history says the same.
    due = sorted((w for w in waits if w.due_at is not None and w.due_at <= now),
                 key=lambda w: w.position)
    for w in due:
        step = steps.get(w.position)
        if step is None or step.state in FINAL_STEP_STATES:
            continue
        if w.kind == "sleep":
            change = change.then(_end_sleep(step, now, False, None))
        elif w.kind == "event":
            change = change.then(_time_out(step, now, None))
    return change.then(_wake(run, now, f"woke up: {describe_waits(due)} came due"))


def wakeup(run: RunRecord | None, run_id: str, sleeping: Sequence[StepRecord],
           now: float) -> tuple[Change, bool]:
    """``handle.wakeup()``: end the run's current sleeps early. ``sleeping``: its sleep steps
    still waiting. False (and nothing changes) if it has none."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if run.state in TERMINAL_RUN_STATES or not sleeping:
        return NOTHING, False
    change = NOTHING
    for step in sleeping:
        change = change.then(_end_sleep(step, now, True, None))
    if run.state == "waiting":
        change = change.then(_wake(run, now, "woken up early by a client"))
    else:
        change = evolve(change, run=evolve(run, updated_at=now))
    return change, True


def send(run: RunRecord | None, op: o.SendEvent, duplicate: bool,
         waiting: StepRecord | None, buffered: EventRecord | None,
         ) -> tuple[Change, o.SendOutcome]:
    """An event sent to a run: delivered to ``waiting`` (its oldest wait step for that event
    still waiting) if there is one, else buffered for the next wait. ``duplicate``: an event
    with the same idempotency key was already sent to this run. ``buffered``: the oldest
    undelivered event of that name (read when there is a wait step waiting).

    Events of one name go to the run's waits in send order: when an older one is buffered
    beside a waiting wait step (a run resumed after events were sent to it while paused
    keeps its wait step waiting, and takes them when it gets there), the wait takes the
    older one and this one is buffered behind it (seed 196: the newer one went straight to
    the wait, and the older one to the next)."""
    if run is None:
        raise RunNotFound(f"no run with id {op.run_id!r}")
    if run.state in TERMINAL_RUN_STATES:
        raise RunFinished(f"run {run.id} is {run.state}: it takes no more events "
                          f"(event {op.name!r} not stored)")
    if duplicate:
        return NOTHING, o.SendOutcome(delivered=False, duplicate=True)
    event = EventRecord(0, run.id, op.name, op.payload, op.idempotency_key, op.now)
    sent = Entry(op.now, "event.sent", run.attempts, name=op.name, detail=(
        f"key {op.idempotency_key!r}" if op.idempotency_key else None))
    change = Change(evolve(run, updated_at=op.now), sent=event, history=(sent,))
    if waiting is None or run.state == "paused":  # a paused run takes it when resumed
        return change, o.SendOutcome(delivered=False, duplicate=False)
    if buffered is None:
        delivered = _receive(waiting, event, op.now, None)  # not buffered: no seq to consume
        change = evolve(change.then(evolve(delivered, consumed=())),
                        sent=evolve(event, position=waiting.position))
    else:  # the older one goes to the wait; this one is buffered behind it
        change = change.then(_receive(waiting, buffered, op.now, None))
    if run.state == "waiting":
        change = change.then(_wake(run, op.now, f"event {op.name!r} arrived"))
    return change, o.SendOutcome(delivered=buffered is None, duplicate=False)


# -- schedules ---------------------------------------------------------------------------------
SCHEDULED = "started by schedule"  # the first words of a scheduled run's origin
MAX_BACKFILL = 1000  # occurrences one backfill may hold
MAX_COUNTED = 100_000  # occurrences counted one by one in a skipped range


@attrs.frozen
class ScheduleChange:
    """What a schedule op writes: the schedule row as it must be (None: unchanged), firing
    records to upsert (by key), and runs to enqueue in the same transaction (each with the
    idempotency key of its occurrence). ``deleted``: the schedule and its firings go."""

    schedule: ScheduleRecord | None = None
    firings: tuple[ScheduleFiring, ...] = ()
    enqueues: tuple[o.Enqueue, ...] = ()
    deleted: bool = False
    # ``cancel_previous``: the schedule's unfinished previous run is cancelled (as
    # :func:`cancel` decides, with its tree), before the new one is enqueued.
    cancel: o.CancelRun | None = None


def run_key(schedule_id: str, key: str) -> str:
    """The idempotency key of the run an occurrence starts: one run per (schedule,
    occurrence), across restarts and servers, whatever else happens."""
    return f"schedule:{schedule_id}:{key}"


def started_by_a_schedule(run: RunRecord | None) -> bool:
    """Whether ``run`` may be a schedule's last run (so its end may release a buffered
    occurrence): a schedule's runs carry its idempotency keys."""
    return run is not None and (run.idempotency_key or "").startswith("schedule:")


def ends_alone(run: RunRecord) -> bool:
    """Whether ``run``'s end writes no other run: it has no parent to tell and no schedule
    occurrence can be buffered behind it (both fixed when it is enqueued)."""
    return run.parent_id is None and not started_by_a_schedule(run)


def run_id_for(schedule_id: str, key: str) -> str:
    return f"{schedule_id}@{key}"


def origin_of(schedule_id: str, key: str) -> str:
    return f"{SCHEDULED} {schedule_id} for {key}"


def scheduled_by(detail: str | None) -> tuple[str, str] | None:
    """(schedule id, occurrence key) from a run's first history detail, if a schedule
    started it."""
    marker = f"; {SCHEDULED} "
    if detail is None or marker not in detail:
        return None
    schedule_id, _, key = detail.split(marker, 1)[1].rpartition(" for ")
    return schedule_id, key


def _need(schedule: ScheduleRecord | None, schedule_id: str) -> ScheduleRecord:
    if schedule is None:
        raise ScheduleNotFound(f"no schedule with id {schedule_id!r}")
    return schedule


def define_schedule(old: ScheduleRecord | None,
                    op: o.DefineSchedule) -> tuple[ScheduleChange, o.DefineOutcome]:
    new = op.schedule
    if old is None:
        return ScheduleChange(new), o.DefineOutcome(new, created=True, updated=False)
    if old.definition() == new.definition():
        return ScheduleChange(), o.DefineOutcome(old, created=False, updated=False)
    if not op.update:
        names = ("workflow", "version", "payload", "cron", "timezone", "every", "overlap",
                 "catchup_window")
        differ = [f"{n} {a!r} (asked: {b!r})" for n, a, b in
                  zip(names, old.definition(), new.definition(), strict=True) if a != b]
        raise ScheduleConflict(
            f"schedule {old.id!r} exists with another definition: {'; '.join(differ)}; "
            "nothing was changed: pass update=True to replace it, or choose another id")
    # The new definition, from the next occurrence after now; what the schedule did so
    # far (its last run, a buffered occurrence, paused or not) carries over.
    updated = evolve(new, paused=old.paused, last_run_id=old.last_run_id,
                     buffered_at=old.buffered_at, created_at=old.created_at,
                     updated_at=op.now)
    return ScheduleChange(updated), o.DefineOutcome(updated, created=False, updated=True)


def describe_schedule(s: ScheduleRecord) -> str:
    return sch.describe(s.cron, s.timezone, s.every)


def pause_schedule(old: ScheduleRecord | None,
                   op: o.PauseSchedule) -> tuple[ScheduleChange, ScheduleRecord]:
    s = _need(old, op.schedule_id)
    if s.paused == op.paused:
        return ScheduleChange(), s
    if op.paused:
        paused = evolve(s, paused=True, updated_at=op.now)
        return ScheduleChange(paused), paused
    # Resumed: from the first occurrence after now; those that passed meanwhile are skipped.
    resumed = evolve(s, paused=False, updated_at=op.now,
                     next_fire_at=sch.next_after(s.cron, s.timezone, s.every, op.now))
    firings: tuple[ScheduleFiring, ...] = ()
    if s.next_fire_at <= op.now:
        firings = (_skipped_range(s, s.next_fire_at, op.now, op.now, "resumed",
                                  "passed while the schedule was paused"),)
    return ScheduleChange(resumed, firings), resumed


def _skipped_range(s: ScheduleRecord, first: float, until: float, now: float, reason: str,
                   why: str) -> ScheduleFiring:
    """One record for the occurrences from ``first`` up to ``until`` (inclusive)."""
    last, count = first, 1
    for t in sch.occurrences(s.cron, s.timezone, s.every, first):
        if t > until or count >= MAX_COUNTED:
            break
        last, count = t, count + 1
    what = (f"{sch.iso(first)}" if count == 1
            else f"{count} occurrences from {sch.iso(first)} to {sch.iso(last)}")
    return ScheduleFiring(s.id, f"skipped:{sch.iso(first)}", first, "skipped", reason, None,
                          now, f"{what}: {why}", last, count)


@attrs.define
class _Firing:
    """A schedule's state while one op decides its occurrences."""

    schedule: ScheduleRecord
    running: bool  # its last run is unfinished
    now: float
    firings: list[ScheduleFiring] = attrs.field(factory=list)
    enqueues: list[o.Enqueue] = attrs.field(factory=list)
    cancel: o.CancelRun | None = None

    def occurrence(self, occ: float, key: str, reason: str) -> ScheduleFiring:
        """Decide one occurrence by the overlap policy."""
        s = self.schedule
        if self.running and s.overlap == "cancel_previous":
            return self._replace(occ, key, reason)
        if self.running and s.overlap != "allow":
            previous = f"the previous run {s.last_run_id} is unfinished"
            if s.overlap == "buffer_one" and s.buffered_at is None:
                self.schedule = evolve(s, buffered_at=occ, buffered_key=key,
                                       updated_at=self.now)
                return self._record(ScheduleFiring(s.id, key, occ, "buffered", reason, None,
                                                   self.now, f"{previous}: starts when it ends"))
            why = (f"{previous} and one occurrence already waits for it"
                   if s.overlap == "buffer_one" else f"{previous} (overlap 'skip')")
            return self._record(ScheduleFiring(s.id, key, occ, "skipped", reason, None,
                                               self.now, why))
        return self._start(occ, key, reason)

    def _replace(self, occ: float, key: str, reason: str) -> ScheduleFiring:
        """``cancel_previous``: the unfinished previous run is cancelled (a cancel it is
        already under stands), and this occurrence starts. A previous run this same
        decision was to start (occurrences caught up together) never starts: its
        occurrence is recorded skipped, replaced by this one."""
        s = self.schedule
        previous = s.last_run_id
        assert previous is not None
        why = f"replaced by occurrence {key} (overlap 'cancel_previous')"
        mine = next((i for i, e in enumerate(self.enqueues) if e.run_id == previous), None)
        if mine is not None:
            del self.enqueues[mine]
            self.firings = [evolve(f, outcome="skipped", run_id=None,
                                   detail=f"{why} before it started")
                            if f.run_id == previous else f for f in self.firings]
            return self._start(occ, key, reason)
        if self.cancel is None:
            self.cancel = o.CancelRun(previous, f"schedule {s.id}: {why}", CASCADE_GRACE,
                                      f"schedule {s.id}", self.now)
        return self._start(occ, key, reason,
                           f"the previous run {previous} is cancelled (overlap "
                           "'cancel_previous')")

    def _start(self, occ: float, key: str, reason: str,
               detail: str | None = None) -> ScheduleFiring:
        s = self.schedule
        run_id = run_id_for(s.id, key)
        self.enqueues.append(o.Enqueue(run_id, s.workflow, s.version, s.payload,
                                       run_key(s.id, key), self.now, "return_existing",
                                       origin_of(s.id, key)))
        self.schedule = evolve(s, last_run_id=run_id, updated_at=self.now)
        self.running = True
        return self._record(ScheduleFiring(s.id, key, occ, "fired", reason, run_id, self.now,
                                           detail))

    def release_buffered(self) -> None:
        s = self.schedule
        if s.buffered_at is not None and not self.running:
            occ, key = s.buffered_at, s.buffered_key or sch.iso(s.buffered_at)
            self.schedule = evolve(s, buffered_at=None, buffered_key=None)
            self._start(occ, key, "buffered")

    def _record(self, firing: ScheduleFiring) -> ScheduleFiring:
        self.firings.append(firing)
        return firing

    def change(self) -> ScheduleChange:
        return ScheduleChange(self.schedule, tuple(self.firings), tuple(self.enqueues),
                              cancel=self.cancel)


def _unfinished(run: RunRecord | None) -> bool:
    return run is not None and run.state not in TERMINAL_RUN_STATES


def fire(s: ScheduleRecord, last_run: RunRecord | None, now: float) -> ScheduleChange:
    """The Timer: ``s`` is due (unpaused, ``next_fire_at <= now``). Occurrences older than
    the catch-up window are recorded as skipped (one record for the lot); the others are
    decided by the overlap policy; the next occurrence moves past ``now``."""
    state = _Firing(s, _unfinished(last_run), now)
    state.release_buffered()
    horizon = now - s.catchup_window
    occ = s.next_fire_at
    if occ < horizon:  # missed while no server was up, too long ago
        first_kept = sch.next_after(s.cron, s.timezone, s.every, horizon - 1e-6)
        state.firings.append(_skipped_range(
            s, occ, min(first_kept, now + 1) - 1e-6, now, "catch-up",
            f"older than the catch-up window of {s.catchup_window:g} s when a server "
            f"looked at {sch.iso(now)}"))
        occ = first_kept
    while occ <= now:
        key = sch.iso(occ)
        state.occurrence(occ, key, "scheduled" if now - occ < 1.0 else "catch-up")
        occ = sch.next_after(s.cron, s.timezone, s.every, occ)
    state.schedule = evolve(state.schedule, next_fire_at=occ, updated_at=now)
    return state.change()


def release_buffered(s: ScheduleRecord, ended: RunRecord, now: float) -> ScheduleChange:
    """Run ``ended`` (the schedule's last run) has ended: an occurrence buffered behind it
    (``buffer_one``) starts now, in the same transaction."""
    if s.last_run_id != ended.id or s.buffered_at is None or _unfinished(ended):
        return ScheduleChange()
    state = _Firing(s, False, now)
    state.release_buffered()
    return state.change()


def trigger(s: ScheduleRecord | None, op: o.TriggerSchedule, last_run: RunRecord | None,
            existing: ScheduleFiring | None) -> tuple[ScheduleChange, ScheduleFiring]:
    """Fire once now, under the overlap policy; the same ``trigger_id`` again returns what
    the first request did."""
    s = _need(s, op.schedule_id)
    if existing is not None:
        return ScheduleChange(), existing
    state = _Firing(s, _unfinished(last_run), op.now)
    firing = state.occurrence(op.now, f"trigger:{op.trigger_id}", "trigger")
    return state.change(), firing


def backfill(s: ScheduleRecord | None, op: o.BackfillSchedule, last_run: RunRecord | None,
             handled: set[str]) -> tuple[ScheduleChange, tuple[ScheduleFiring, ...]]:
    """Every occurrence in ``[op.start, op.end]`` whose key is not in ``handled`` (the keys of
    the schedule's firing records), under the overlap policy, oldest first."""
    s = _need(s, op.schedule_id)
    if not op.start <= op.end:
        raise ScheduleInvalid(f"backfill start {when(op.start)} is after its end "
                              f"{when(op.end)}; nothing was started")
    if op.end > op.now:
        raise ScheduleInvalid(f"backfill end {when(op.end)} is in the future (now is "
                              f"{when(op.now)}): the schedule itself fires those; nothing "
                              "was started")
    todo: list[float] = []
    for occ in sch.occurrences(s.cron, s.timezone, s.every, op.start - 1e-6):
        if occ > op.end:
            break
        if len(todo) >= MAX_BACKFILL:
            raise ScheduleInvalid(
                f"backfill from {when(op.start)} to {when(op.end)} holds more than "
                f"{MAX_BACKFILL} occurrences; split it into smaller ranges (nothing was "
                "started)")
        todo.append(occ)
    state = _Firing(s, _unfinished(last_run), op.now)
    out = [state.occurrence(occ, sch.iso(occ), "backfill")
           for occ in todo if sch.iso(occ) not in handled]
    return state.change(), tuple(out)
