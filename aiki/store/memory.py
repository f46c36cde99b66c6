"""The memory store: the reference model every other store is held to by the conformance suite.

Everything lives in dicts; each op is applied synchronously, so a batch is atomic with respect
to every other Trio task (there is no await inside ``apply`` before its return).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import trio

from aiki.errors import AikiError, StaleLease, StepConflict
from aiki.records import (
    FINAL_STEP_STATES,
    ClaimedRun,
    HistoryEvent,
    Lease,
    RunRecord,
    StepRecord,
)
from aiki.store import ops as o


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


def step_progress(step: StepRecord) -> tuple[int, int]:
    """How far a step has got: its attempt, then running (0) before that attempt's outcome (1).

    Within one lease a step only moves forward; a write behind the stored one is a late
    duplicate (the network delivered it twice, or out of order) and changes nothing.
    """
    return (step.attempts, 0 if step.state == "running" else 1)


def step_write_changes(run_id: str, old: StepRecord | None, new: StepRecord, *,
                       save: bool) -> bool:
    """The rules every store applies before writing step ``new`` over ``old``.

    False: the write changes nothing (an identical re-save whose first reply was lost, or a
    late duplicate behind the stored step). Raises StepConflict when ``old`` is final and
    ``new`` differs. True: write it. ``save`` is False for StartStep.
    """
    if save and old == new:
        return False
    if old is not None and old.state in FINAL_STEP_STATES:
        raise step_conflict_error(run_id, old, new)
    return old is None or step_progress(new) >= step_progress(old)


def history_event_for_step(step: StepRecord) -> tuple[str, str | None]:
    """The history event name and detail that saving ``step`` appends."""
    if step.kind != "task":
        return "step.recorded", step.kind
    if step.state == "retrying":
        detail = f"{step.error_type}: {step.error_message}; next attempt at {step.next_attempt_at}"
        return "task.retrying", detail
    if step.state == "failed":
        return "task.failed", f"{step.error_type}: {step.error_message}"
    return f"task.{step.state}", None


@attrs.define
class MemoryStore:
    """A store in this process's memory; lost when the process ends."""

    _runs: dict[str, RunRecord] = attrs.field(factory=dict)
    _order: dict[str, int] = attrs.field(factory=dict)  # run id -> enqueue sequence
    _keys: dict[tuple[str, str], str] = attrs.field(factory=dict)
    _steps: dict[str, dict[str, StepRecord]] = attrs.field(factory=dict)
    _history: dict[str, list[HistoryEvent]] = attrs.field(factory=dict)
    _seq: int = 0
    closed: bool = False

    # -- reads --------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        await trio.lowlevel.checkpoint()
        return self._runs.get(run_id)

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(self._steps.get(run_id, {}).values())

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(self._history.get(run_id, ()))

    async def list_runs(
        self, *, workflow: str | None = None, state: str | None = None, limit: int = 100
    ) -> tuple[RunRecord, ...]:
        await trio.lowlevel.checkpoint()
        runs = [
            r
            for r in self._runs.values()
            if (workflow is None or r.workflow == workflow) and (state is None or r.state == state)
        ]
        runs.sort(key=lambda r: self._order[r.id], reverse=True)
        return tuple(runs[: max(limit, 0)])

    async def next_wake_at(self) -> float | None:
        await trio.lowlevel.checkpoint()
        times = [
            r.wake_at
            for r in self._runs.values()
            if r.state == "sleeping" and r.wake_at is not None
        ]
        return min(times) if times else None

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()

    # -- writes -------------------------------------------------------------------------
    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        await trio.lowlevel.checkpoint()
        outcomes: list[Any] = []
        for op in ops:
            try:
                outcomes.append(self._apply_one(op))
            except AikiError as exc:
                outcomes.append(exc)
        return outcomes

    def _apply_one(self, op: o.Op[Any]) -> Any:
        if isinstance(op, o.Enqueue):
            return self._enqueue(op)
        if isinstance(op, o.Claim):
            return self._claim(op)
        if isinstance(op, o.Renew):
            return self._renew(op)
        if isinstance(op, o.ExpireLeases):
            return self._expire(op)
        if isinstance(op, (o.StartStep, o.SaveStep)):
            return self._save_step(op)
        if isinstance(op, o.CompleteRun):
            return self._finish(op.lease, op.now, state="completed", result=op.result)
        if isinstance(op, o.FailRun):
            return self._finish(
                op.lease, op.now, state="failed", error=(op.error_type, op.error_message)
            )
        if isinstance(op, o.SuspendRun):
            run = self._fenced(op.lease)
            self._set(run, op.now, state="sleeping", wake_at=op.wake_at, **_no_lease())
            self._log(run, op.now, "run.sleeping", run.attempts, op.lease.worker_id,
                      detail=f"{op.reason}; wakes at {op.wake_at}")
            return None
        if isinstance(op, o.ReleaseRun):
            run = self._fenced(op.lease)
            self._set(run, op.now, state="queued", **_no_lease())
            self._log(run, op.now, "run.queued", run.attempts, op.lease.worker_id,
                      detail=op.reason)
            return None
        if isinstance(op, o.WakeDue):
            woke = []
            for run in list(self._runs.values()):
                if run.state == "sleeping" and run.wake_at is not None and run.wake_at <= op.now:
                    self._set(run, op.now, state="queued", wake_at=None)
                    self._log(run, op.now, "run.queued", run.attempts, None, detail="woke up")
                    woke.append(run.id)
            return tuple(woke)
        raise TypeError(f"unknown store operation {type(op).__name__}")

    def _enqueue(self, op: o.Enqueue) -> o.EnqueueOutcome:
        if op.idempotency_key is not None:
            existing = self._keys.get((op.workflow, op.idempotency_key))
            if existing is not None:
                return o.EnqueueOutcome(existing, created=False)
        if op.run_id in self._runs:  # a retried enqueue: never overwrite the run
            return o.EnqueueOutcome(op.run_id, created=False)
        if op.idempotency_key is not None:
            self._keys[(op.workflow, op.idempotency_key)] = op.run_id
        run = RunRecord(
            id=op.run_id, workflow=op.workflow, version=op.version, payload=op.payload,
            state="queued", idempotency_key=op.idempotency_key, attempts=0, lease_epoch=0,
            lease_owner=None, lease_expires_at=None, wake_at=None, result=None,
            error_type=None, error_message=None, created_at=op.now, updated_at=op.now,
            finished_at=None,
        )
        self._runs[run.id] = run
        self._order[run.id] = len(self._order)
        self._steps[run.id] = {}
        self._history[run.id] = []
        self._log(run, op.now, "run.queued", 0, None, detail=f"version {op.version}")
        return o.EnqueueOutcome(run.id, created=True)

    def _claim(self, op: o.Claim) -> tuple[ClaimedRun, ...]:
        wanted = set(op.workflows)
        queued = sorted(
            (r for r in self._runs.values()
             if r.state == "queued" and (r.workflow, r.version) in wanted),
            key=lambda r: self._order[r.id],
        )
        claimed = []
        for run in queued[: max(op.limit, 0)]:
            run = self._set(
                run, op.now, state="running", attempts=run.attempts + 1,
                lease_epoch=run.lease_epoch + 1, lease_owner=op.worker_id,
                lease_expires_at=op.now + op.lease_ttl,
            )
            self._log(run, op.now, "run.running", run.attempts, op.worker_id,
                      detail=f"lease epoch {run.lease_epoch}")
            claimed.append(ClaimedRun(run, tuple(self._steps[run.id].values())))
        return tuple(claimed)

    def _renew(self, op: o.Renew) -> tuple[str, ...]:
        lost = []
        for lease in op.leases:
            try:
                run = self._fenced(lease)
            except StaleLease:
                lost.append(lease.run_id)
                continue
            self._set(run, op.now, lease_expires_at=op.now + op.lease_ttl)
        return tuple(lost)

    def _expire(self, op: o.ExpireLeases) -> tuple[str, ...]:
        expired = []
        for run in list(self._runs.values()):
            if (run.state == "running" and run.lease_expires_at is not None
                    and run.lease_expires_at <= op.now):
                owner = run.lease_owner
                self._set(run, op.now, state="queued", **_no_lease())
                self._log(run, op.now, "run.queued", run.attempts, owner,
                          detail=f"lease epoch {run.lease_epoch} of worker {owner!r} expired")
                expired.append(run.id)
        return tuple(expired)

    def _save_step(self, op: o.StartStep | o.SaveStep) -> None:
        run = self._fenced(op.lease)
        steps = self._steps[run.id]
        new = op.step
        old = steps.get(new.position)
        if not step_write_changes(run.id, old, new, save=isinstance(op, o.SaveStep)):
            return None
        if new.idempotency_key is not None:
            for other in steps.values():
                if (other.position != new.position and other.name == new.name
                        and other.idempotency_key == new.idempotency_key):
                    raise key_conflict_error(run.id, new, other.position)
        if isinstance(op, o.StartStep):
            new = attrs.evolve(new, state="running")
            event, detail = "task.running", None
        else:
            event, detail = history_event_for_step(new)
        steps[new.position] = new
        self._set(run, op.now)
        self._log(run, op.now, event, new.attempts, op.lease.worker_id,
                  position=new.position, name=new.name, detail=detail)
        return None

    def _finish(
        self, lease: Lease, now: float, *, state: str, result: str | None = None,
        error: tuple[str, str] | None = None,
    ) -> RunRecord:
        run = self._fenced(lease)
        error_type, error_message = error if error else (None, None)
        run = self._set(
            run, now, state=state, result=result, error_type=error_type,
            error_message=error_message, finished_at=now, **_no_lease(),
        )
        self._log(run, now, f"run.{state}", run.attempts, lease.worker_id,
                  detail=None if error is None else f"{error_type}: {error_message}")
        return run

    # -- helpers ------------------------------------------------------------------------
    def _fenced(self, lease: Lease) -> RunRecord:
        run = self._runs.get(lease.run_id)
        if (run is None or run.state != "running" or run.lease_epoch != lease.epoch
                or run.lease_owner != lease.worker_id):
            raise stale_lease_error(lease, run)
        return run

    def _set(self, run: RunRecord, now: float, **changes: Any) -> RunRecord:
        new = attrs.evolve(run, updated_at=now, **changes)
        self._runs[run.id] = new
        return new

    def _log(
        self, run: RunRecord, now: float, event: str, attempt: int, worker_id: str | None,
        *, position: str | None = None, name: str | None = None, detail: str | None = None,
    ) -> None:
        self._seq += 1
        self._history[run.id].append(HistoryEvent(
            seq=self._seq, run_id=run.id, at=now, event=event, attempt=attempt,
            worker_id=worker_id, position=position, name=name, detail=detail,
        ))


def _no_lease() -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_at": None}
