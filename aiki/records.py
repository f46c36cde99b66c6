"""What the store keeps: runs, their steps (checkpoints) and their history. Frozen values."""

from __future__ import annotations

from typing import Literal

import attrs

RunState = Literal["queued", "running", "waiting", "completed", "failed", "cancelled"]
StepState = Literal["running", "retrying", "completed", "failed"]
StepKind = Literal["task", "now", "random", "uuid", "sleep", "event"]
WaitKind = Literal["sleep", "event", "retry"]

TERMINAL_RUN_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
FINAL_STEP_STATES: frozenset[str] = frozenset({"completed", "failed"})


@attrs.frozen
class RunRecord:
    """One workflow run. ``payload`` and ``result`` are JSON text.

    ``attempts`` counts the leases granted (one per claim); ``lease_epoch`` is the fencing
    token of the current (or last) lease.
    """

    id: str
    workflow: str
    version: str
    payload: str
    state: RunState
    idempotency_key: str | None
    attempts: int
    lease_epoch: int
    lease_owner: str | None
    lease_expires_at: float | None
    result: str | None
    error_type: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    error_traceback: str | None = None  # the failure's Python traceback, from the worker
    # The W3C trace context (JSON: {"traceparent": ...}) of the span that enqueued it, so
    # every attempt's spans join one trace; None without OpenTelemetry.
    trace_context: str | None = None


@attrs.frozen
class StepRecord:
    """The checkpoint of one step of a run at a replay ``position``.

    ``input`` and ``output`` are JSON text. A step in state ``completed`` or ``failed`` is
    final: its outcome is what every replay sees, and it never changes.

    A wait step (``sleep``, ``event``) is ``running`` while it waits, with its due time in
    ``next_attempt_at`` (None: an event waited for without a timeout). A finished sleep is
    ``completed`` with output ``true`` (it slept its whole duration) or ``false`` (woken
    early); an event wait is ``completed`` with the delivered payload, or ``failed`` with
    ``error_type`` ``EventTimeout``.
    """

    position: str
    kind: StepKind
    name: str
    input_hash: str
    input: str
    idempotency_key: str | None
    state: StepState
    attempts: int
    output: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    next_attempt_at: float | None = None
    error_traceback: str | None = None  # the failed attempt's Python traceback


@attrs.frozen
class HistoryEvent:
    """One state change of a run or of one of its steps.

    ``event`` is ``run.<state>`` or ``task.<state>`` (or ``step.recorded`` for ``run.now()``
    and friends); ``attempt`` is the run's attempt for run events and the task's for task
    events.
    """

    seq: int
    run_id: str
    at: float
    event: str
    attempt: int
    worker_id: str | None = None
    position: str | None = None
    name: str | None = None
    detail: str | None = None


@attrs.frozen
class WaitFor:
    """One condition a waiting run wakes on: a wait step's due time or event, or the delay
    before a task's next attempt (``retry``). A run waiting on several wakes on the first."""

    position: str
    kind: WaitKind
    name: str | None = None  # the event's name, or the task's
    due_at: float | None = None


@attrs.frozen
class WaitRecord:
    """A condition of a ``waiting`` run, as stored: kept while the run waits, gone once it
    is queued again. ``since``: when the run began waiting."""

    run_id: str
    position: str
    kind: WaitKind
    name: str | None
    due_at: float | None
    since: float


@attrs.frozen
class EventRecord:
    """One event sent to a run. Buffered (``position`` None) until a wait takes it; then
    ``position`` names the wait step it was delivered to. ``seq`` orders the sends."""

    seq: int
    run_id: str
    name: str
    payload: str
    idempotency_key: str | None
    sent_at: float
    position: str | None = None


@attrs.frozen
class Lease:
    """The right of one worker to write to one run, fenced by ``epoch``."""

    run_id: str
    epoch: int
    worker_id: str


@attrs.frozen
class RunCount:
    """How many unfinished runs of one (workflow, version) are in one state, and since when
    the longest-standing of them has been in it (its ``updated_at``: for a queued run, when it
    was queued)."""

    workflow: str
    version: str
    state: str
    count: int
    oldest: float


@attrs.frozen
class ClaimedRun:
    """A run handed to a worker: its record (with the new lease) and every step so far."""

    run: RunRecord
    steps: tuple[StepRecord, ...]

    @property
    def lease(self) -> Lease:
        assert self.run.lease_owner is not None
        return Lease(self.run.id, self.run.lease_epoch, self.run.lease_owner)
