"""The state machine of runs: the legal transitions, and what each store operation does.

Pure functions, no I/O. A store selects and locks the rows an operation concerns, hands them
here, and writes the :class:`Change` it gets back; so every store (memory, SQLite,
PostgreSQL) makes the same decisions and appends the same history, and the simulation's
checkers judge histories against the same tables (:data:`RUN_TRANSITIONS`,
:data:`STEP_TRANSITIONS`).

Run states: ``queued → running → completed | failed``; ``running → waiting → queued`` (a
durable sleep, an event, a long retry delay: the conditions are :class:`WaitRecord` rows
kept while the run waits); ``running → queued`` when a lease is given back or expires.

A function here raises the :class:`~aiki.errors.AikiError` that refuses its operation
before deciding anything, so a refused operation changes nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from aiki.errors import (
    IdempotencyConflict,
    RunFinished,
    RunNotFound,
    RunNotRetryable,
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
    StepRecord,
    WaitFor,
    WaitRecord,
)
from aiki.store import ops as o

RUN_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "queued"), ("queued", "running"), ("running", "completed"), ("running", "failed"),
    ("running", "waiting"), ("running", "queued"), ("waiting", "queued"),
    ("failed", "queued"),  # retried by a client, after a fix
})
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
# Wait steps (sleep, event), in history terms: they begin waiting, or end at once.
WAIT_STEP_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "waiting"), ("waiting", "waiting"), (None, "completed"), ("waiting", "completed"),
    (None, "received"), ("waiting", "received"), (None, "timed_out"), ("waiting", "timed_out"),
})
STEP_TRANSITIONS: Mapping[str, frozenset[tuple[str | None, str]]] = {
    "task": TASK_TRANSITIONS, "sleep": WAIT_STEP_TRANSITIONS, "event": WAIT_STEP_TRANSITIONS,
}
EVENT_TIMEOUT = "EventTimeout"


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


def _move(run: RunRecord, now: float, state: RunState, **changes: Any) -> RunRecord:
    if (run.state, state) not in RUN_TRANSITIONS and run.state != state:
        raise AssertionError(f"illegal run transition {run.state} -> {state} for {run.id}")
    return attrs.evolve(run, state=state, updated_at=now, **changes)


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
    return run, Entry(op.now, "run.queued", 0, detail=f"version {op.version}")


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
        run = fenced(lease, run)
    except StaleLease:
        return None
    return attrs.evolve(run, lease_expires_at=now + lease_ttl, updated_at=now)


def lease_expired(run: RunRecord, now: float) -> bool:
    return (run.state == "running" and run.lease_expires_at is not None
            and run.lease_expires_at <= now)


def expire(run: RunRecord, now: float) -> Change:
    owner = run.lease_owner
    return Change(_move(run, now, "queued", **_NO_LEASE), history=(Entry(
        now, "run.queued", run.attempts, owner,
        detail=f"lease epoch {run.lease_epoch} of worker {owner!r} expired"),))


def finish(run: RunRecord | None, lease: Lease, now: float, *, result: str | None = None,
           error: tuple[str, str] | None = None, traceback: str | None = None) -> Change:
    run = fenced(lease, run)
    state: RunState = "completed" if error is None else "failed"
    error_type, error_message = error if error else (None, None)
    run = _move(run, now, state, result=result, error_type=error_type,
                error_message=error_message, finished_at=now, error_traceback=traceback,
                **_NO_LEASE)
    return Change(run, waits=(), history=(Entry(
        now, f"run.{state}", run.attempts, lease.worker_id,
        detail=None if error is None else f"{error_type}: {error_message}"),))


def retry(run: RunRecord | None, run_id: str, steps: Sequence[StepRecord],
          version: str | None, who: str, now: float) -> Change:
    """``handle.retry()``: queue a failed run again, its attempts counted on. Completed steps
    are kept (replay returns them); failed and unfinished ones are dropped, so they run
    again. ``version`` re-pins the run (a fix deployed as a new version)."""
    if run is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if run.state != "failed":
        raise RunNotRetryable(f"run {run.id} is {run.state}: only a failed run can be "
                              "retried; nothing changed")
    dropped = tuple(s.position for s in steps if s.state != "completed")
    moved = f", re-pinned from version {run.version} to {version}" if (
        version is not None and version != run.version) else ""
    again = _move(run, now, "queued", version=version or run.version, result=None,
                  error_type=None, error_message=None, error_traceback=None,
                  finished_at=None)
    return Change(again, dropped=dropped, history=(Entry(
        now, "run.queued", run.attempts, who,
        detail=f"retried by {who}{moved}; {len(dropped)} step(s) to run again, "
               f"{len(steps) - len(dropped)} kept"),))


def purgeable(run: RunRecord, before: float) -> bool:
    """Whether retention may delete ``run``: it finished, before ``before``."""
    return (run.state in TERMINAL_RUN_STATES and run.finished_at is not None
            and run.finished_at < before)


def release(run: RunRecord | None, lease: Lease, now: float, reason: str) -> Change:
    run = fenced(lease, run)
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
    if step.kind in ("now", "random", "uuid"):
        return "step.recorded", step.kind
    if step.state == "retrying":
        detail = (f"{step.error_type}: {step.error_message}; "
                  f"next attempt at {when(step.next_attempt_at)}")
        return "task.retrying", detail
    if step.state == "failed":
        return "task.failed", f"{step.error_type}: {step.error_message}"
    return f"task.{step.state}", None


def save_step(run: RunRecord | None, lease: Lease, old: StepRecord | None,
              keyed_elsewhere: str | None, step: StepRecord, now: float, *,
              start: bool, lease_ttl: float | None = None) -> Change:
    """StartStep (``start``) or SaveStep. ``keyed_elsewhere``: the position of another step
    of this run with the same task name and idempotency key, if any. A start with
    ``lease_ttl`` renews the lease, even when the step was started before (a retry)."""
    run = fenced(lease, run)
    if step.kind in ("sleep", "event"):
        raise StepConflict(f"run {run.id}: step {step.position} is a {step.kind} step; "
                           "wait steps are recorded by AwaitStep")
    if start and lease_ttl is not None:
        run = attrs.evolve(run, lease_expires_at=now + lease_ttl, updated_at=now)
    if not step_write_changes(run.id, old, step, save=not start):
        return NOTHING if not (start and lease_ttl is not None) else Change(run)
    if step.idempotency_key is not None and keyed_elsewhere is not None:
        raise key_conflict_error(run.id, step, keyed_elsewhere)
    if start:
        step = attrs.evolve(step, state="running")
        event, detail = "task.running", None
    else:
        event, detail = history_event_for_step(step)
    return Change(attrs.evolve(run, updated_at=now), (step,), history=(Entry(
        now, event, step.attempts, lease.worker_id, step.position, step.name, detail),))


# -- waits -----------------------------------------------------------------------------------
def _end_sleep(step: StepRecord, now: float, woken: bool, who: str | None) -> Change:
    done = attrs.evolve(step, state="completed", output="false" if woken else "true")
    detail = "woken early" if woken else "slept"
    return Change(steps=(done,), history=(Entry(
        now, "sleep.completed", step.attempts, who, step.position, step.name, detail),))


def _receive(step: StepRecord, event: EventRecord, now: float, who: str | None) -> Change:
    done = attrs.evolve(step, state="completed", output=event.payload)
    return Change(steps=(done,), consumed=((event.seq, step.position),), history=(Entry(
        now, "event.received", step.attempts, who, step.position, step.name,
        f"sent at {when(event.sent_at)}" + (f", key {event.idempotency_key!r}"
                                       if event.idempotency_key else "")),))


def _time_out(step: StepRecord, now: float, who: str | None) -> Change:
    done = attrs.evolve(step, state="failed", error_type=EVENT_TIMEOUT,
                        error_message=f"no {step.name!r} event by {when(step.next_attempt_at)}")
    return Change(steps=(done,), history=(Entry(
        now, "event.timed_out", step.attempts, who, step.position, step.name,
        f"due at {when(step.next_attempt_at)}"),))


def await_step(run: RunRecord | None, lease: Lease, old: StepRecord | None,
               buffered: EventRecord | None, step: StepRecord,
               now: float) -> tuple[Change, StepRecord]:
    """A sleep or event wait reaches ``step.position``: end it now if it can, else record it
    as waiting until ``step.next_attempt_at``. ``buffered``: the oldest undelivered event of
    that name. The outcome is the step as stored afterwards."""
    run = fenced(lease, run)
    if step.kind not in ("sleep", "event"):
        raise StepConflict(f"run {run.id}: step {step.position} is a {step.kind} step, "
                           "not a wait")
    if old is not None:
        if (old.kind, old.name) != (step.kind, step.name):
            raise step_conflict_error(run.id, old, step)
        if old.state in FINAL_STEP_STATES:
            return NOTHING, old
    who = lease.worker_id
    due = step.next_attempt_at
    waiting = attrs.evolve(step, state="running", output=None, error_type=None,
                           error_message=None)
    if step.kind == "sleep" and due is not None and due <= now:
        change = _end_sleep(waiting, now, False, who)
    elif step.kind == "event" and buffered is not None:
        change = _receive(waiting, buffered, now, who)
    elif step.kind == "event" and due is not None and due <= now:
        change = _time_out(waiting, now, who)
    elif old is not None and old == waiting:
        return NOTHING, old
    else:
        until = "for ever" if due is None else f"until {when(due)}"
        change = Change(steps=(waiting,), history=(Entry(
            now, f"{step.kind}.waiting", step.attempts, who, step.position, step.name,
            until),))
    return attrs.evolve(change, run=attrs.evolve(run, updated_at=now)), change.steps[-1]


def _satisfied(cond: WaitFor, step: StepRecord | None, buffered: set[str],
               now: float) -> str | None:
    """Why ``cond`` holds already (the run need not wait for it), or None."""
    if cond.due_at is not None and cond.due_at <= now:
        return f"{cond.kind} at step {cond.position} was due at {when(cond.due_at)}"
    if cond.kind in ("sleep", "event") and step is not None and step.state in FINAL_STEP_STATES:
        return f"{cond.kind} at step {cond.position} ended while the run was held"
    if cond.kind == "event" and cond.name in buffered:
        return f"event {cond.name!r} is waiting to be delivered"
    return None


def wait(run: RunRecord | None, lease: Lease, conditions: Sequence[WaitFor],
         steps: Mapping[str, StepRecord], buffered: Iterable[str], now: float,
         reason: str) -> Change:
    """The worker gives the run back until one of ``conditions`` holds. ``steps``: the run's
    steps at the conditions' positions; ``buffered``: names of its undelivered events. If one
    holds already, the run is queued at once instead."""
    run = fenced(lease, run)
    if not conditions:
        raise StepConflict(f"run {run.id}: a run cannot wait on nothing")
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
                "retry": f"the retry of task {w.name!r}"}[w.kind]
        until = "" if w.due_at is None else f" until {when(w.due_at)}"
        parts.append(f"{what} at step {w.position}{until}")
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
        change = attrs.evolve(change, run=attrs.evolve(run, updated_at=now))
    return change, True


def send(run: RunRecord | None, op: o.SendEvent, duplicate: bool,
         waiting: StepRecord | None) -> tuple[Change, o.SendOutcome]:
    """An event sent to a run: delivered to ``waiting`` (its oldest wait step for that event
    still waiting) if there is one, else buffered for the next wait. ``duplicate``: an event
    with the same idempotency key was already sent to this run."""
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
    change = Change(attrs.evolve(run, updated_at=op.now), sent=event, history=(sent,))
    if waiting is None:
        return change, o.SendOutcome(delivered=False, duplicate=False)
    delivered = _receive(waiting, event, op.now, None)  # not buffered: no seq to consume
    change = attrs.evolve(change.then(attrs.evolve(delivered, consumed=())),
                          sent=attrs.evolve(event, position=waiting.position))
    if run.state == "waiting":
        change = change.then(_wake(run, op.now, f"event {op.name!r} arrived"))
    return change, o.SendOutcome(delivered=True, duplicate=False)
