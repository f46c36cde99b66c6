"""The memory store: the reference model every other store is held to by the conformance suite.

Everything lives in dicts; each op is applied synchronously, so a batch is atomic with respect
to every other Trio task (there is no await inside ``apply`` before its return). What each op
decides comes from :mod:`aiki.store.machine`; this module only selects rows and writes the
:class:`~aiki.store.machine.Change` it gets back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import trio

from aiki.errors import AikiError
from aiki.records import (
    TERMINAL_RUN_STATES,
    ClaimedRun,
    EventRecord,
    HistoryEvent,
    RunCount,
    RunRecord,
    StepRecord,
    WaitRecord,
)
from aiki.store import machine as m
from aiki.store import ops as o


@attrs.frozen
class Contents:
    """Everything a memory store holds, at one moment (for the simulation's checkers)."""

    runs: dict[str, RunRecord]
    steps: dict[str, tuple[StepRecord, ...]]
    history: dict[str, tuple[HistoryEvent, ...]]
    waits: dict[str, tuple[WaitRecord, ...]]
    events: dict[str, tuple[EventRecord, ...]]


@attrs.define
class MemoryStore:
    """A store in this process's memory; lost when the process ends."""

    _runs: dict[str, RunRecord] = attrs.field(factory=dict)
    _order: dict[str, int] = attrs.field(factory=dict)  # run id -> enqueue sequence
    _keys: dict[tuple[str, str], str] = attrs.field(factory=dict)
    _steps: dict[str, dict[str, StepRecord]] = attrs.field(factory=dict)
    _history: dict[str, list[HistoryEvent]] = attrs.field(factory=dict)
    _waits: dict[str, dict[str, WaitRecord]] = attrs.field(factory=dict)
    _events: dict[str, list[EventRecord]] = attrs.field(factory=dict)
    _seq: int = 0
    _event_seq: int = 0
    _enqueued: int = 0
    closed: bool = False

    def contents(self) -> Contents:
        """A copy of everything stored (synchronous: no other task runs meanwhile)."""
        return Contents(
            dict(self._runs), {r: tuple(s.values()) for r, s in self._steps.items()},
            {r: tuple(h) for r, h in self._history.items()},
            {r: tuple(w.values()) for r, w in self._waits.items()},
            {r: tuple(e) for r, e in self._events.items()},
        )

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

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(self._waits.get(run_id, {}).values())

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(self._events.get(run_id, ()))

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

    async def run_counts(self) -> tuple[RunCount, ...]:
        await trio.lowlevel.checkpoint()
        groups: dict[tuple[str, str, str], tuple[int, float]] = {}
        for r in self._runs.values():
            if r.state not in TERMINAL_RUN_STATES:
                key = (r.workflow, r.version, r.state)
                n, oldest = groups.get(key, (0, r.updated_at))
                groups[key] = (n + 1, min(oldest, r.updated_at))
        return tuple(RunCount(*key, n, oldest) for key, (n, oldest) in sorted(groups.items()))

    async def next_due(self) -> float | None:
        await trio.lowlevel.checkpoint()
        times = [w.due_at for waits in self._waits.values() for w in waits.values()
                 if w.due_at is not None]
        times += [r.lease_expires_at for r in self._runs.values()
                  if r.state == "running" and r.lease_expires_at is not None]
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
        runs = self._runs
        if isinstance(op, o.Enqueue):
            return self._enqueue(op)
        if isinstance(op, o.Claim):
            return self._claim(op)
        if isinstance(op, o.Renew):
            lost = []
            for lease in op.leases:
                renewed = m.renew(runs.get(lease.run_id), lease, op.now, op.lease_ttl)
                if renewed is None:
                    lost.append(lease.run_id)
                else:
                    runs[renewed.id] = renewed
            return tuple(lost)
        if isinstance(op, o.ExpireLeases):
            expired = [r for r in self._in_order() if m.lease_expired(r, op.now)]
            for run in expired:
                self._write(run.id, m.expire(run, op.now))
            return tuple(r.id for r in expired)
        if isinstance(op, (o.StartStep, o.SaveStep)):
            steps = self._steps.get(op.lease.run_id, {})
            keyed = next((s.position for s in steps.values()
                          if s.position != op.step.position and s.name == op.step.name
                          and s.idempotency_key == op.step.idempotency_key), None)
            change = m.save_step(
                runs.get(op.lease.run_id), op.lease, steps.get(op.step.position), keyed,
                op.step, op.now, start=isinstance(op, o.StartStep),
                lease_ttl=op.lease_ttl if isinstance(op, o.StartStep) else None)
            self._write(op.lease.run_id, change)
            return bool(change.history)
        if isinstance(op, o.CompleteRun):
            change = m.finish(runs.get(op.lease.run_id), op.lease, op.now, result=op.result)
            self._write(op.lease.run_id, change)
            return change.run
        if isinstance(op, o.FailRun):
            change = m.finish(runs.get(op.lease.run_id), op.lease, op.now,
                              error=(op.error_type, op.error_message), traceback=op.traceback)
            self._write(op.lease.run_id, change)
            return change.run
        if isinstance(op, o.ReleaseRun):
            self._write(op.lease.run_id, m.release(runs.get(op.lease.run_id), op.lease, op.now,
                                                    op.reason))
            return None
        if isinstance(op, o.AwaitStep):
            run_id = op.lease.run_id
            change, step = m.await_step(
                runs.get(run_id), op.lease, self._steps.get(run_id, {}).get(op.step.position),
                self._buffered(run_id, op.step.name), op.step, op.now)
            self._write(run_id, change)
            return step
        if isinstance(op, o.WaitRun):
            run_id = op.lease.run_id
            steps = self._steps.get(run_id, {})
            self._write(run_id, m.wait(
                runs.get(run_id), op.lease, op.conditions,
                {c.position: steps[c.position] for c in op.conditions if c.position in steps},
                {e.name for e in self._events.get(run_id, ()) if e.position is None},
                op.now, op.reason))
            return None
        if isinstance(op, o.WakeDue):
            woke = []
            for run in self._in_order():
                waits = tuple(self._waits.get(run.id, {}).values())
                if run.state == "waiting" and any(
                        w.due_at is not None and w.due_at <= op.now for w in waits):
                    self._write(run.id, m.wake_due(run, waits, self._steps[run.id], op.now))
                    woke.append(run.id)
            return tuple(woke)
        if isinstance(op, o.RetryRun):
            change = m.retry(runs.get(op.run_id), op.run_id,
                             tuple(self._steps.get(op.run_id, {}).values()), op.version, op.who,
                             op.now)
            self._write(op.run_id, change)
            return change.run
        if isinstance(op, o.PurgeRuns):
            old = sorted((r for r in runs.values() if m.purgeable(r, op.before)),
                         key=lambda r: (r.finished_at, self._order[r.id]))[: max(op.limit, 0)]
            for run in old:
                del runs[run.id]
                for table in (self._order, self._steps, self._history, self._waits,
                              self._events):
                    table.pop(run.id, None)
                if run.idempotency_key is not None:
                    self._keys.pop((run.workflow, run.idempotency_key), None)
            return tuple(r.id for r in old)
        if isinstance(op, o.Wakeup):
            sleeping = [s for s in self._steps.get(op.run_id, {}).values()
                        if s.kind == "sleep" and s.state == "running"]
            change, woken = m.wakeup(runs.get(op.run_id), op.run_id, sleeping, op.now)
            self._write(op.run_id, change)
            return woken
        if isinstance(op, o.SendEvent):
            events = self._events.get(op.run_id, ())
            duplicate = op.idempotency_key is not None and any(
                e.name == op.name and e.idempotency_key == op.idempotency_key for e in events)
            waiting = next((s for s in self._steps.get(op.run_id, {}).values()
                            if s.kind == "event" and s.name == op.name
                            and s.state == "running"), None)
            change, outcome = m.send(runs.get(op.run_id), op, duplicate, waiting)
            self._write(op.run_id, change)
            return outcome
        raise TypeError(f"unknown store operation {type(op).__name__}")

    def _in_order(self) -> list[RunRecord]:
        return sorted(self._runs.values(), key=lambda r: self._order[r.id])

    def _buffered(self, run_id: str, name: str) -> EventRecord | None:
        return next((e for e in self._events.get(run_id, ())
                     if e.name == name and e.position is None), None)

    def _enqueue(self, op: o.Enqueue) -> o.EnqueueOutcome:
        if op.idempotency_key is not None:
            existing = self._keys.get((op.workflow, op.idempotency_key))
            if existing is not None:
                return m.existing_for_key(op, existing, self._runs[existing].payload)
        if op.run_id in self._runs:  # a retried enqueue: never overwrite the run
            return o.EnqueueOutcome(op.run_id, created=False)
        if op.idempotency_key is not None:
            self._keys[(op.workflow, op.idempotency_key)] = op.run_id
        run, entry = m.enqueue(op)
        self._enqueued += 1
        self._order[run.id] = self._enqueued
        self._steps[run.id] = {}
        self._history[run.id] = []
        self._write(run.id, m.Change(run, history=(entry,)))
        return o.EnqueueOutcome(run.id, created=True)

    def _claim(self, op: o.Claim) -> tuple[ClaimedRun, ...]:
        wanted = set(op.workflows)
        queued = [r for r in self._in_order()
                  if r.state == "queued" and (r.workflow, r.version) in wanted]
        claimed = []
        for run in queued[: max(op.limit, 0)]:
            change = m.claim(run, op.worker_id, op.now, op.lease_ttl)
            self._write(run.id, change)
            assert change.run is not None
            claimed.append(ClaimedRun(change.run, tuple(self._steps[run.id].values())))
        return tuple(claimed)

    def _write(self, run_id: str, change: m.Change) -> None:
        if change.run is not None:
            self._runs[run_id] = change.run
        steps = self._steps.setdefault(run_id, {})
        for position in change.dropped:
            steps.pop(position, None)
        for step in change.steps:
            steps[step.position] = step
        if change.waits is not None:
            self._waits.pop(run_id, None)
            if change.waits:
                # In position order, as SQLite and PostgreSQL read them (ORDER BY position).
                self._waits[run_id] = {w.position: w for w in sorted(
                    change.waits, key=lambda w: w.position)}
        events = self._events.setdefault(run_id, [])
        for seq, position in change.consumed:
            events[:] = [attrs.evolve(e, position=position) if e.seq == seq else e
                         for e in events]
        if change.sent is not None:
            self._event_seq += 1
            events.append(attrs.evolve(change.sent, seq=self._event_seq))
        for entry in change.history:
            self._seq += 1
            self._history[run_id].append(HistoryEvent(
                self._seq, run_id, entry.at, entry.event, entry.attempt, entry.worker_id,
                entry.position, entry.name, entry.detail))
