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
    ScheduleFiring,
    ScheduleRecord,
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
    schedules: dict[str, ScheduleRecord] = attrs.field(factory=dict)
    firings: dict[str, tuple[ScheduleFiring, ...]] = attrs.field(factory=dict)


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
    _children: dict[str, list[str]] = attrs.field(factory=dict)  # parent -> child ids
    _schedules: dict[str, ScheduleRecord] = attrs.field(factory=dict)
    # Schedule id -> key -> (order of first write, the firing record).
    _firings: dict[str, dict[str, tuple[int, ScheduleFiring]]] = attrs.field(factory=dict)
    _firing_seq: int = 0
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
            dict(self._schedules),
            {i: tuple(f for _, f in sorted(fs.values(), key=lambda x: x[0]))
             for i, fs in self._firings.items()},
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

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(self._runs[c] for c in self._children.get(run_id, ()) if c in self._runs)

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

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        await trio.lowlevel.checkpoint()
        return self._schedules.get(schedule_id)

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        await trio.lowlevel.checkpoint()
        return tuple(sorted(self._schedules.values(), key=lambda s: s.id))

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        await trio.lowlevel.checkpoint()
        firings = sorted(self._firings.get(schedule_id, {}).values(),
                         key=lambda x: (x[1].at, x[0]), reverse=True)
        return tuple(f for _, f in firings[: max(limit, 0)])

    async def next_due(self) -> float | None:
        await trio.lowlevel.checkpoint()
        times = [w.due_at for run_id, waits in self._waits.items() for w in waits.values()
                 if w.due_at is not None and self._runs[run_id].state == "waiting"]
        times += [s.next_fire_at for s in self._schedules.values() if not s.paused]
        times += [r.lease_expires_at for r in self._runs.values()
                  if r.lease_owner is not None and r.lease_expires_at is not None
                  and r.state in ("running", "paused")]
        times += [r.cancel_deadline for r in self._runs.values()
                  if r.cancel_deadline is not None and r.state not in TERMINAL_RUN_STATES]
        return min(times) if times else None

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()

    # -- writes -------------------------------------------------------------------------
    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        await trio.lowlevel.checkpoint()
        return self.apply_now(ops)

    def apply_now(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        """``apply``, synchronously: no other task runs before it returns (the simulation
        looks at the store between the ops of one batch)."""
        outcomes: list[Any] = []
        with o.noting_ends() as ended:
            for op in ops:
                try:
                    outcomes.append(self._apply_one(op))
                except AikiError as exc:
                    outcomes.append(exc)
        return o.outcomes_of(outcomes, ended)

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
            change = m.decide_step(op, runs.get(op.lease.run_id),
                                   steps.get(op.step.position), keyed)
            self._write(op.lease.run_id, change)
            return bool(change.history)
        if isinstance(op, (o.CompleteRun, o.FailRun)):
            return self._finish(op)
        if isinstance(op, o.AbandonSteps):
            run_id = op.lease.run_id
            mine = self._steps.get(run_id, {})
            self._write(run_id, m.abandon(runs.get(run_id), op.lease,
                                          [mine[q] for q in op.positions if q in mine], op.scope,
                                          op.now, mine.get(op.scope), op.positions,
                                          op.starts, op.after))
            return None
        if isinstance(op, o.StartChild):
            run_id = op.lease.run_id
            change, child, first = m.start_child(
                runs.get(run_id), op.lease, self._steps.get(run_id, {}).get(op.step.position),
                op.step, op)
            self._write(run_id, change)
            if child is not None:
                self._insert(child, first)
                self._children.setdefault(run_id, []).append(child.id)
            return self._steps[run_id][op.step.position]
        if isinstance(op, (o.DefineSchedule, o.PauseSchedule, o.TriggerSchedule,
                           o.BackfillSchedule, o.DeleteSchedule, o.FireSchedules)):
            return self._schedule_op(op)
        if isinstance(op, o.ReleaseRun):
            self._write(op.lease.run_id, m.release(runs.get(op.lease.run_id), op.lease, op.now,
                                                    op.reason))
            return None
        if isinstance(op, o.AwaitStep):
            run_id = op.lease.run_id
            change, step = m.await_step(
                runs.get(run_id), op.lease, self._steps.get(run_id, {}).get(op.step.position),
                self._buffered(run_id, op.step.name), op.step, op.now,
                runs.get(op.step.name) if op.step.kind == "join" else None)
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
            # Cancels whose grace period is over end too (their ids follow).
            return o.WakeOutcome(tuple(woke), self._end_cancels(op.now))
        if isinstance(op, o.RetryRun):
            change = m.retry(runs.get(op.run_id), op.run_id,
                             tuple(self._steps.get(op.run_id, {}).values()), op.version, op.who,
                             op.now, op.control_id)
            self._write(op.run_id, change)
            return m.controlled(change)
        if isinstance(op, o.PauseRun):
            change = m.pause(runs.get(op.run_id), op.run_id, op.who, op.now, op.control_id)
            self._write(op.run_id, change)
            return m.controlled(change)
        if isinstance(op, o.ResumeRun):
            steps = self._steps.get(op.run_id, {})
            change = m.resume(
                runs.get(op.run_id), op.run_id, tuple(self._waits.get(op.run_id, {}).values()),
                steps, m.first_sent(self._events.get(op.run_id, ())),
                op.who, op.now, op.control_id, children=self._unfinished(op.run_id))
            self._write(op.run_id, change)
            if change.history and change.run is not None and (  # (not a repeat)
                    change.run.state in TERMINAL_RUN_STATES):
                self._ended(change.run, op.now, [])
            return m.controlled(change)
        if isinstance(op, o.ForkRun):
            existing = runs.get(op.new_run_id)
            if existing is not None:
                return m.fork_again(existing, op)
            new, made, noted = m.fork(runs.get(op.run_id), op,
                                      tuple(self._steps.get(op.run_id, {}).values()))
            self._enqueued += 1
            self._order[new.id] = self._enqueued
            self._steps[new.id] = {}
            self._history[new.id] = []
            self._write(new.id, made)
            self._write(op.run_id, noted)
            return o.ControlOutcome(new, applied=True)
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
        if isinstance(op, o.EndCancels):
            return self._end_cancels(op.now)
        if isinstance(op, o.CancelRun):
            return self._cancel(op)
        if isinstance(op, o.SendEvent):
            events = self._events.get(op.run_id, ())
            duplicate = op.idempotency_key is not None and any(
                e.name == op.name and e.idempotency_key == op.idempotency_key for e in events)
            waiting = next((s for s in self._steps.get(op.run_id, {}).values()
                            if s.kind == "event" and s.name == op.name
                            and s.state == "running"), None)
            change, outcome = m.send(runs.get(op.run_id), op, duplicate, waiting,
                                     self._buffered(op.run_id, op.name) if waiting else None)
            self._write(op.run_id, change)
            return outcome
        raise TypeError(f"unknown store operation {type(op).__name__}")

    # -- children and cancels: the machine decides each run's change; these walk the tree --
    def _descendants(self, run_id: str) -> list[str]:
        """The unfinished children it did not detach, theirs, and so on, in enqueue order
        (a child comes after its parent)."""
        out, todo = [], [run_id]
        while todo:
            for child_id in self._children.get(todo.pop(), ()):
                child = self._runs.get(child_id)
                if child is not None and not child.detached and (
                        child.state not in TERMINAL_RUN_STATES):
                    out.append(child_id)
                    todo.append(child_id)
        return sorted(out, key=lambda r: self._order[r])

    def _unfinished(self, run_id: str) -> int:
        return sum(1 for c in self._children.get(run_id, ())
                   if (r := self._runs.get(c)) is not None and not r.detached
                   and r.state not in TERMINAL_RUN_STATES)

    def _awaits_children(self, run: RunRecord) -> bool:
        return m.awaits_children(run, self._waits.get(run.id, {}).values())

    def _ended(self, run: RunRecord, now: float, ended: list[RunRecord]) -> None:
        """``run`` has ended: note it, start an occurrence buffered behind it, and tell its
        parent (recursively up the tree)."""
        ended.append(run)
        o.note_ended(run)
        self._release_buffered(run, now)
        parent = self._runs.get(run.parent_id) if run.parent_id is not None else None
        if parent is None or parent.state in TERMINAL_RUN_STATES:
            return
        joins = [s for s in self._steps.get(parent.id, {}).values()
                 if s.kind == "join" and s.name == run.id and s.state == "running"]
        change = m.child_ended(parent, joins, tuple(self._waits.get(parent.id, {}).values()),
                               run, self._unfinished(parent.id), now)
        self._write(parent.id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            self._ended(change.run, now, ended)

    def _cascade(self, run_id: str, reason: str | None, grace: float, who: str, now: float,
                 revoked: list[tuple[str, int]], ended: list[RunRecord]) -> int:
        """Cancel ``run_id``'s unfinished, not detached descendants, the deepest first; how
        many."""
        descendants = self._descendants(run_id)
        for d in reversed(descendants):
            run = self._runs[d]
            change, out = m.cancel(run, d, reason, grace, who, now,
                                   awaiting_children=self._awaits_children(run),
                                   cascade=run_id, children=self._unfinished(d))
            self._write(d, change)
            if out.holder is not None:
                revoked.append((d, run.lease_epoch))
            if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
                self._ended(change.run, now, ended)
        return len(descendants)

    def _cancel(self, op: o.CancelRun) -> o.CancelOutcome:
        run = self._runs.get(op.run_id)
        if run is None or run.state in TERMINAL_RUN_STATES or run.cancel_requested_at:
            return m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now)[1]
        revoked: list[tuple[str, int]] = []
        ended: list[RunRecord] = []
        first = self._awaits_children(run)  # marked first, so its children's ends wait on it
        out = o.CancelOutcome(True, None, None)
        if first:
            change, out = m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now,
                                   awaiting_children=True,
                                   children=self._unfinished(op.run_id))
            self._write(op.run_id, change)
            if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
                self._ended(change.run, op.now, ended)
        self._cascade(op.run_id, op.reason, op.grace, op.who, op.now, revoked, ended)
        if not first:
            change, out = m.cancel(self._runs[op.run_id], op.run_id, op.reason, op.grace,
                                   op.who, op.now, children=self._unfinished(op.run_id))
            self._write(op.run_id, change)
            if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
                self._ended(change.run, op.now, ended)
        cancelled = o.CancelOutcome(True, self._runs[op.run_id], out.holder, tuple(revoked))
        o.note_cancel(cancelled, op.reason, op.now + op.grace)
        return cancelled

    def _finish(self, op: o.CompleteRun | o.FailRun) -> RunRecord | None:
        run_id = op.lease.run_id
        run = m.fenced(op.lease, m.unpaused(op.lease, self._runs.get(run_id)))
        ended: list[RunRecord] = []
        if isinstance(op, o.FailRun) and run.cancel_requested_at is None:
            why = f"its parent run {run_id} failed"
            revoked: list[tuple[str, int]] = []
            if self._cascade(run_id, why, m.CASCADE_GRACE, "the engine", op.now, revoked,
                             ended):
                o.note_cancel(o.CancelOutcome(True, None, None, tuple(revoked)), why,
                              op.now + m.CASCADE_GRACE)
        if isinstance(op, o.CompleteRun):
            change = m.finish(self._runs[run_id], op.lease, op.now, result=op.result,
                              children=self._unfinished(run_id))
        else:
            change = m.finish(self._runs[run_id], op.lease, op.now,
                              error=(op.error_type, op.error_message), traceback=op.traceback,
                              children=self._unfinished(run_id))
        self._write(run_id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            self._ended(change.run, op.now, ended)
        return self._runs[run_id]

    def _end_cancels(self, now: float) -> tuple[RunRecord, ...]:
        """Overdue cancels end, and with each the descendants its end waits for."""
        overdue = [r.id for r in self._in_order() if m.cancel_overdue(r, now)]
        ancestor: dict[str, str | None] = {r: None for r in overdue}
        for r in overdue:
            for d in self._descendants(r):
                ancestor.setdefault(d, r)
        ended: list[RunRecord] = []
        for run_id in sorted(ancestor, key=lambda r: self._order[r], reverse=True):
            run = self._runs[run_id]
            if run.state in TERMINAL_RUN_STATES:
                continue
            change = m.end_cancel(run, now, ancestor[run_id])
            self._write(run_id, change)
            assert change.run is not None
            self._ended(change.run, now, ended)
        return tuple(ended)

    def _insert(self, run: RunRecord, first: m.Entry) -> None:
        self._enqueued += 1
        self._order[run.id] = self._enqueued
        self._steps[run.id] = {}
        self._history[run.id] = []
        self._write(run.id, m.Change(run, history=(first,)))

    def _schedule_op(self, op: o.Op[Any]) -> Any:
        schedules = self._schedules
        if isinstance(op, o.DefineSchedule):
            change, defined = m.define_schedule(schedules.get(op.schedule.id), op)
            self._write_schedule(change)
            return defined
        if isinstance(op, o.PauseSchedule):
            change, record = m.pause_schedule(schedules.get(op.schedule_id), op)
            self._write_schedule(change)
            return record
        if isinstance(op, o.DeleteSchedule):
            existed = op.schedule_id in schedules
            schedules.pop(op.schedule_id, None)
            self._firings.pop(op.schedule_id, None)
            return existed
        if isinstance(op, o.FireSchedules):
            due = sorted((s for s in schedules.values()
                          if not s.paused and s.next_fire_at <= op.now),
                         key=lambda s: (s.next_fire_at, s.id))[: max(op.limit, 0)]
            started: list[str] = []
            for s in due:
                change = m.fire(s, self._last_run(s), op.now)
                started += self._write_schedule(change)
            return tuple(started)
        assert isinstance(op, (o.TriggerSchedule, o.BackfillSchedule))
        found = schedules.get(op.schedule_id)
        last = None if found is None else self._last_run(found)
        if isinstance(op, o.TriggerSchedule):
            existing = self._firings.get(op.schedule_id, {}).get(f"trigger:{op.trigger_id}")
            change, firing = m.trigger(found, op, last, existing and existing[1])
            self._write_schedule(change)
            return firing
        if isinstance(op, o.BackfillSchedule):
            change, firings = m.backfill(found, op, last,
                                         set(self._firings.get(op.schedule_id, {})))
            self._write_schedule(change)
            return firings
        raise TypeError(f"unknown store operation {type(op).__name__}")

    def _last_run(self, s: ScheduleRecord) -> RunRecord | None:
        return None if s.last_run_id is None else self._runs.get(s.last_run_id)

    def _release_buffered(self, run: RunRecord | None, now: float) -> None:
        """A run ended: an occurrence buffered behind it starts (``buffer_one``)."""
        if run is None or not m.started_by_a_schedule(run):
            return
        for s in list(self._schedules.values()):
            if s.last_run_id == run.id and s.buffered_at is not None:
                self._write_schedule(m.release_buffered(s, run, now))

    def _write_schedule(self, change: m.ScheduleChange) -> list[str]:
        """Write a schedule op's change; the ids of the runs it started."""
        if change.cancel is not None:  # (cancel_previous: the previous run first)
            self._cancel(change.cancel)
        started = []
        for enqueue in change.enqueues:
            outcome = self._enqueue(enqueue)
            if outcome.created:
                started.append(outcome.run_id)
        if change.schedule is not None:
            self._schedules[change.schedule.id] = change.schedule
        for firing in change.firings:
            mine = self._firings.setdefault(firing.schedule_id, {})
            old = mine.get(firing.key)
            if old is None:
                self._firing_seq += 1
            mine[firing.key] = (old[0] if old else self._firing_seq, firing)
        return started

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
        self._insert(run, entry)
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
