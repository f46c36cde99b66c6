"""The store's write operations: each one atomic, coarse, with no awaits inside.

A store applies a batch of operations in one transaction (``Store.apply``); each operation
gets its own outcome. An operation that is refused on purpose (a stale lease, a conflicting
step) yields its error as its outcome, writes nothing, and does not disturb the others in
the batch. This is what lets ``StoreWriter`` group-commit many runs' writes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs

from aiki.records import ClaimedRun, Lease, RunRecord, StepRecord

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
class StartStep(Op[None]):
    """Mark a task step as running at ``attempt`` (fenced)."""

    lease: Lease
    step: StepRecord
    now: float


@attrs.frozen
class SaveStep(Op[None]):
    """Record the outcome of a step: completed, failed, retrying (fenced).

    Re-saving an identical final step is accepted (a retried write); a different outcome for
    a final step is a ``StepConflict``.
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


@attrs.frozen
class SuspendRun(Op[None]):
    """Give up the lease until ``wake_at`` (a retry delay or a durable sleep)."""

    lease: Lease
    wake_at: float
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
    """Queue again every sleeping run whose ``wake_at`` has come."""

    now: float
