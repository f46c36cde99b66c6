"""The store's write operations: each one atomic, coarse, with no awaits inside.

A store applies a batch of operations in one transaction (``Store.apply``); each operation
gets its own outcome. An operation that is refused on purpose (a stale lease, a conflicting
step) yields its error as its outcome, writes nothing, and does not disturb the others in
the batch. This is what lets ``StoreWriter`` group-commit many runs' writes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs

from aiki.records import ClaimedRun, Lease, RunRecord, StepRecord, WaitFor

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


@attrs.frozen
class WakeDue(Op[tuple[str, ...]]):
    """Queue again every waiting run with a condition due at ``now`` (its due sleeps end,
    its due event waits time out); the outcome is their ids."""

    now: float


@attrs.frozen
class RetryRun(Op[RunRecord]):
    """Queue a failed run again (see :func:`aiki.store.machine.retry`); ``who`` asked."""

    run_id: str
    version: str | None
    who: str
    now: float


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
