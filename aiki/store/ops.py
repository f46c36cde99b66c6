"""The store's write operations: each one atomic, coarse, with no awaits inside.

A store applies a batch of operations in one transaction (``Store.apply``); each operation
gets its own outcome. An operation that is refused on purpose (a stale lease, a conflicting
step) yields its error as its outcome, writes nothing, and does not disturb the others in
the batch. This is what lets ``StoreWriter`` group-commit many runs' writes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import attrs

from aiki.records import (
    ClaimedRun,
    Lease,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitFor,
)

T = TypeVar("T")


class Op(Generic[T]):
    """Base of every write operation; ``T`` is the type of its outcome."""

    __slots__ = ()


@attrs.frozen
class EnqueueOutcome:
    run_id: str
    created: bool


@attrs.frozen
class Enqueue(Op[EnqueueOutcome]):
    """Create a queued run, or return the existing one for (workflow, idempotency_key)."""

    run_id: str
    workflow: str
    version: str
    payload: str
    idempotency_key: str | None
    now: float
    # An existing run under this key with another payload: refuse (IdempotencyConflict), or
    # return it ("return_existing").
    on_conflict: str = "raise"
    # Who started it, for its first history event (a schedule's occurrence).
    origin: str | None = None
    trace_context: str | None = None  # see RunRecord.trace_context


@attrs.frozen
class Claim(Op[tuple[ClaimedRun, ...]]):
    """Lease up to ``limit`` queued runs of the given (workflow, version) pairs, oldest first.

    Each claim increments the run's epoch and attempts and sets the lease owner and expiry.
    """

    worker_id: str
    workflows: tuple[tuple[str, str], ...]
    limit: int
    now: float
    lease_ttl: float


@attrs.frozen
class Renew(Op[tuple[str, ...]]):
    """Extend the given leases; the outcome is the ids of the runs whose lease is lost."""

    leases: tuple[Lease, ...]
    now: float
    lease_ttl: float


@attrs.frozen
class ExpireLeases(Op[tuple[str, ...]]):
    """Put back in the queue every running run whose lease expired at ``now``."""

    now: float


@attrs.frozen
class StartStep(Op[bool]):
    """Mark a task step as running at ``attempt`` (fenced). With ``lease_ttl``, the lease is
    renewed too, as by a heartbeat: a worker that hears the start accepted knows its lease
    lasts ``lease_ttl`` from when it sent it, whenever its assignment arrived. The outcome:
    whether it wrote a step (False: a late duplicate behind the stored step)."""

    lease: Lease
    step: StepRecord
    now: float
    lease_ttl: float | None = None


@attrs.frozen
class SaveStep(Op[bool]):
    """Record the outcome of a step: completed, failed, retrying (fenced).

    Re-saving an identical final step is accepted (a retried write) and writes nothing; a
    different outcome for a final step is a ``StepConflict``. The outcome: whether it wrote
    anything, so a repeat is not counted twice (``aiki_task_attempts_total``).
    """

    lease: Lease
    step: StepRecord
    now: float


@attrs.frozen
class CompleteRun(Op[RunRecord]):
    lease: Lease
    result: str
    now: float


@attrs.frozen
class FailRun(Op[RunRecord]):
    lease: Lease
    error_type: str
    error_message: str
    now: float
    traceback: str | None = None


@attrs.frozen
class AwaitStep(Op[StepRecord]):
    """A sleep or event wait at ``step.position`` (fenced): ended now if it can be (a sleep
    come due, a buffered event, an event wait timed out), else recorded as waiting until
    ``step.next_attempt_at``. The outcome is the step as stored: final on replay."""

    lease: Lease
    step: StepRecord
    now: float


@attrs.frozen
class WaitRun(Op[None]):
    """Give up the lease until one of ``conditions`` holds (fenced): the run is ``waiting``.
    If one holds already, the run is queued at once."""

    lease: Lease
    conditions: tuple[WaitFor, ...]
    reason: str
    now: float


@attrs.frozen
class ReleaseRun(Op[None]):
    """Give up the lease and put the run back in the queue at once (a draining worker, or
    an assignment the server could not deliver); ``reason`` goes into the history."""

    lease: Lease
    now: float
    reason: str = "released by its worker"


class WakeOutcome(tuple[str, ...]):
    """What :class:`WakeDue` did: the ids of the runs it woke, then of those it ended (a
    tuple of them, as before cancels existed), and the ended runs themselves (``ended``)."""

    ended: tuple[RunRecord, ...]

    def __new__(cls, woken: tuple[str, ...],
                ended: tuple[RunRecord, ...] = ()) -> WakeOutcome:
        out = super().__new__(cls, (*woken, *(r.id for r in ended if r.id not in woken)))
        out.ended = ended
        return out


@attrs.frozen
class WakeDue(Op[tuple[str, ...]]):
    """Queue again every waiting run with a condition due at ``now`` (its due sleeps end,
    its due event waits time out), and end the cancels whose grace period is over (as
    :class:`EndCancels`); the outcome is their ids, the woken first."""

    now: float


@attrs.frozen
class ControlOutcome:
    """What a client's control of a run (retry, pause, resume, fork) did: ``run`` as it is
    afterwards (for a fork, the new run); ``applied`` is False when it is the same request
    sent again (its reply lost) and so changed nothing."""

    run: RunRecord
    applied: bool


@attrs.frozen
class RetryRun(Op[ControlOutcome]):
    """Queue a failed run again (see :func:`aiki.store.machine.retry`); ``who`` asked."""

    run_id: str
    version: str | None
    who: str
    now: float
    control_id: str | None = None  # the client's id of this request (see RunRecord)


@attrs.frozen
class PurgeRuns(Op[tuple[str, ...]]):
    """Delete up to ``limit`` finished runs that finished before ``before`` (oldest first),
    with their steps, history, waits and events; the outcome is their ids. Their idempotency
    keys are free again."""

    before: float
    limit: int


@attrs.frozen
class Wakeup(Op[bool]):
    """End the run's current sleeps early (``handle.wakeup()``); False if it has none."""

    run_id: str
    now: float


@attrs.frozen
class SendOutcome:
    delivered: bool  # to a wait step at once (else buffered for the next wait)
    duplicate: bool  # an event with this idempotency key was already sent: nothing stored


@attrs.frozen
class SendEvent(Op[SendOutcome]):
    """Send event ``name`` with ``payload`` (JSON text) to a run: delivered to its oldest
    waiting wait for it, else buffered. Refused for a finished or unknown run."""

    run_id: str
    name: str
    payload: str
    idempotency_key: str | None
    now: float


@attrs.frozen
class CancelOutcome:
    cancelled: bool  # False: the run had ended already, and nothing changed
    run: RunRecord | None  # the run as it is now (None: unchanged)
    holder: str | None  # the worker whose lease the cancel revoked, if one held the run
    # The descendants whose leases the cancel revoked, each with the lease epoch revoked
    # (their workers are told too; a newer lease, a claim that came after, is not touched).
    revoked: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class CancelRun(Op[CancelOutcome]):
    """Cancel a run (``handle.cancel``); ``who`` asked. An unfinished run that never ran,
    or a cancel without ``grace``, ends ``cancelled`` at once. Otherwise its lease is
    revoked (the epoch moves on: every later write under the old lease is refused), its
    waits are dropped and it is queued again to raise ``RunCancelled`` in its workflow,
    which has until ``now + grace`` to compensate; then it ends ``cancelled`` whatever it
    does. A finished run is left as it is (``cancelled`` False)."""

    run_id: str
    reason: str | None
    grace: float
    who: str
    now: float


@attrs.frozen
class EndCancels(Op[tuple[RunRecord, ...]]):
    """End ``cancelled`` every unfinished run whose cancel grace period is over at ``now``
    (a worker still holding one is fenced off); the outcome is those runs as they ended."""

    now: float


@attrs.frozen
class StartChild(Op[StepRecord]):
    """Start a child run from the parent's step ``step`` (fenced by the parent's lease): the
    child ``child_id`` is queued and the step recorded completed with the child's id, in one
    transaction. The outcome is the step as stored: on a replay, or a retried write, the
    first child's."""

    lease: Lease
    step: StepRecord
    child_id: str
    workflow: str
    version: str
    payload: str
    detached: bool
    now: float


@attrs.frozen
class AbandonSteps(Op[None]):
    """The deadline scope at ``scope`` these steps stood in expired (fenced): each one not
    final (a task attempt in flight, a sleep or a wait) is recorded failed with
    ``DeadlineExceeded`` (its output names the scope), so it takes no event, no wake-up, and
    a replay cancels that scope there, as it was the first time. The scope's own step
    records the expiry and every one of ``positions`` (final or never recorded included):
    a replay cuts the scope there too (``aiki.records.deadline_expiry``). ``starts``: task
    starts the expiry cut while they were on their way; one not stored yet is recorded
    failed as it is, so that if it arrives after this (a message held up, a retry) it is
    refused rather than left running under a scope that has ended. ``after``: the position
    the code after the scope was to take next (``aiki.records.deadline_after``)."""

    lease: Lease
    positions: tuple[str, ...]
    scope: str  # the position of the deadline scope that expired
    now: float
    starts: tuple[StepRecord, ...] = ()
    after: str | None = None


# -- schedules ---------------------------------------------------------------------------------
@attrs.frozen
class DefineOutcome:
    schedule: ScheduleRecord  # as stored afterwards
    created: bool
    updated: bool  # an existing schedule's definition was replaced (update=True)


@attrs.frozen
class DefineSchedule(Op[DefineOutcome]):
    """Create a schedule, or return the one with this id if its definition is the same; a
    different definition is ``ScheduleConflict`` unless ``update``. ``schedule.next_fire_at``
    is the first occurrence after ``now`` (the caller computes it)."""

    schedule: ScheduleRecord
    update: bool
    now: float


@attrs.frozen
class PauseSchedule(Op[ScheduleRecord]):
    """Pause (``paused``) or resume a schedule. Resuming starts from the first occurrence
    after ``now``; those that passed while paused are recorded as skipped."""

    schedule_id: str
    paused: bool
    now: float


@attrs.frozen
class TriggerSchedule(Op[ScheduleFiring]):
    """Fire a schedule once now, under its overlap policy. ``trigger_id`` (chosen by the
    client) makes a repeated request fire once."""

    schedule_id: str
    trigger_id: str
    now: float


@attrs.frozen
class BackfillSchedule(Op[tuple[ScheduleFiring, ...]]):
    """Every occurrence in ``[start, end]`` that was never handled, under the overlap policy
    (the catch-up window does not apply); the outcome is what became of each."""

    schedule_id: str
    start: float
    end: float
    now: float


@attrs.frozen
class DeleteSchedule(Op[bool]):
    """Delete a schedule and its record of firings (its runs stay); False if there was none."""

    schedule_id: str


@attrs.frozen
class FireSchedules(Op[tuple[str, ...]]):
    """The Timer: every unpaused schedule whose next occurrence is due at ``now`` fires it
    (and any other due ones), under its policy and catch-up window, and moves its next
    occurrence on, in this one transaction; the outcome is the ids of the runs started."""

    now: float
    limit: int = 100  # schedules per op

@attrs.frozen
class PauseRun(Op[ControlOutcome]):
    """Pause a queued, running or waiting run (see :func:`aiki.store.machine.pause`); the
    outcome is the run as paused (a ``lease_owner`` still set: its worker is to be told)."""

    run_id: str
    who: str
    now: float
    control_id: str | None = None  # the client's id of this request (see RunRecord)


@attrs.frozen
class ResumeRun(Op[ControlOutcome]):
    """Resume a paused run: waiting again, queued, or running on under the lease its worker
    still holds (see :func:`aiki.store.machine.resume`)."""

    run_id: str
    who: str
    now: float
    control_id: str | None = None  # the client's id of this request (see RunRecord)


@attrs.frozen
class ForkRun(Op[ControlOutcome]):
    """A new run ``new_run_id`` whose first ``from_step`` steps are copies of run
    ``run_id``'s (see :func:`aiki.store.machine.fork`); the outcome is the new run. A retried
    fork (the new id exists already) returns that run, not applied."""

    run_id: str
    new_run_id: str
    from_step: int
    version: str | None
    who: str
    now: float


# -- what a batch ended --------------------------------------------------------------------
class Outcomes(list[Any]):
    """A batch's outcomes, one per op, and what it did beyond them, whoever asked for it:
    the server acts on these at the commit, so nothing is lost when the request that caused
    them is cut short (its connection lost) between the commit and its answer.

    ``ended``: every run the batch ended, by an op itself or as its consequence (a parent
    that settled when its last child ended, a tree a cancel reached, a grace period over),
    in the order they ended; their watchers and their parents hear of it, and the server
    counts the runs' ends from it (``aiki_runs_total``). ``revoked``: the leases (run id,
    epoch, None when not known; the cancel's reason) that a cancel revoked, a client's, a
    failed parent's or a schedule's ``cancel_previous``: their workers are told now, and the
    runs are queued again to compensate. ``due``: the earliest cancel deadline the batch
    set, for the server's Timer."""

    ended: tuple[RunRecord, ...] = ()
    revoked: tuple[tuple[str, int | None, str | None], ...] = ()
    due: float | None = None


@attrs.define
class Noted:
    """What a store notes while it applies a batch (see :class:`Outcomes`)."""

    ended: list[RunRecord] = attrs.field(factory=list)
    revoked: list[tuple[str, int | None, str | None]] = attrs.field(factory=list)
    due: float | None = None

    def note_due(self, at: float | None) -> None:
        if at is not None and (self.due is None or at < self.due):
            self.due = at


_NOTED: contextvars.ContextVar[Noted | None] = contextvars.ContextVar("aiki_noted", default=None)


def note_ended(run: RunRecord) -> None:
    """A store ended ``run`` in the batch it is applying."""
    noted = _NOTED.get()
    if noted is not None:
        noted.ended.append(run)


@contextlib.contextmanager
def noting_ends() -> Iterator[Noted]:
    """While a store applies a batch: what it ends and revokes is noted."""
    noted = Noted()
    token = _NOTED.set(noted)
    try:
        yield noted
    finally:
        _NOTED.reset(token)


def outcomes_of(outcomes: list[Any], noted: Noted) -> Outcomes:
    out = outcomes if isinstance(outcomes, Outcomes) else Outcomes(outcomes)
    out.ended = tuple(noted.ended)
    out.revoked = tuple(noted.revoked)
    out.due = noted.due
    return out


def note_cancel(out: CancelOutcome, reason: str | None, deadline: float) -> None:
    """A store cancelled a run (or a failed parent's tree, ``out.run`` None): the leases it
    revoked are noted (the run's: the epoch before the cancel moved it on; its descendants'
    as the store gave them), and ``deadline``, the end of its grace period."""
    noted = _NOTED.get()
    if noted is None or not out.cancelled:
        return
    if out.run is not None and out.holder is not None:
        noted.revoked.append((out.run.id, out.run.lease_epoch - 1, reason))
    for run_id, epoch in out.revoked:
        noted.revoked.append((run_id, epoch, reason))
    noted.note_due(deadline)
