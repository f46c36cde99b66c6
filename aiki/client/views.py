"""The values every client returns (Trio, asyncio and blocking alike): plain frozen records."""

from __future__ import annotations

import attrs

from aiki import schedules as sch
from aiki.records import RunRecord, ScheduleFiring, ScheduleRecord, StepRecord, WaitRecord


@attrs.frozen
class TaskStatus:
    position: str
    name: str
    state: str
    attempts: int
    error_type: str | None
    error_message: str | None


@attrs.frozen
class WaitStatus:
    """What a run waits for: a sleep, an event or a task's retry delay at step ``position``,
    since ``since``, until ``due_at`` (epoch seconds; None: no time limit)."""

    position: str
    kind: str
    name: str | None
    since: float | None
    due_at: float | None


@attrs.frozen
class RunStatus:
    """A run as stored now: its state, attempts, timestamps (epoch seconds), tasks, and
    what it waits for (``waits``: while ``waiting``, or sleeping inline on its worker, or
    kept while ``paused``); a fork says where it came from."""

    id: str
    workflow: str
    version: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    finished_at: float | None
    error_type: str | None
    error_message: str | None
    tasks: tuple[TaskStatus, ...]
    waits: tuple[WaitStatus, ...] = ()
    error_traceback: str | None = None  # the worker's, when the run failed
    parent_id: str | None = None  # the run that started it as a child
    children: tuple[ChildStatus, ...] = ()  # the child runs it started, in order
    cancel_reason: str | None = None  # when a cancel was asked for
    # A fork's origin: the run it was copied from, and how many of its steps it was given.
    forked_from: str | None = None
    forked_steps: int | None = None

    @classmethod
    def of(cls, run: RunRecord, steps: tuple[StepRecord, ...],
           waits: tuple[WaitRecord, ...] = (),
           children: tuple[RunRecord, ...] = ()) -> RunStatus:
        tasks = tuple(
            TaskStatus(s.position, s.name, s.state, s.attempts, s.error_type, s.error_message)
            for s in steps if s.kind == "task"
        )
        shown = [WaitStatus(w.position, w.kind, w.name, w.since, w.due_at) for w in waits]
        if run.state == "running":  # a wait held on its worker (a short sleep)
            shown += [WaitStatus(s.position, s.kind, s.name, None, s.next_attempt_at)
                      for s in steps if s.kind in ("sleep", "event") and s.state == "running"]
        return cls(run.id, run.workflow, run.version, run.state, run.attempts, run.created_at,
                   run.updated_at, run.finished_at, run.error_type, run.error_message, tasks,
                   tuple(shown), run.error_traceback, run.parent_id,
                   tuple(ChildStatus(c.id, c.workflow, c.version, c.state, c.detached)
                         for c in children), run.cancel_reason, run.forked_from,
                   run.forked_steps)


@attrs.frozen
class ChildStatus:
    """A child run as its parent's status shows it."""

    id: str
    workflow: str
    version: str
    state: str
    detached: bool


@attrs.frozen
class RunSummary:
    """One line of ``list_runs``: a run's state and timestamps (epoch seconds), no steps."""

    id: str
    workflow: str
    version: str
    state: str
    attempts: int
    worker: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    error_type: str | None
    error_message: str | None

    @classmethod
    def of(cls, run: RunRecord) -> RunSummary:
        worker = run.lease_owner if run.state == "running" else None
        return cls(run.id, run.workflow, run.version, run.state, run.attempts, worker,
                   run.created_at, run.updated_at, run.finished_at, run.error_type,
                   run.error_message)


@attrs.frozen
class ScheduleOccurrence:
    """What became of one occurrence of a schedule (or of ``count`` of them, up to ``last``,
    skipped together): ``fired`` (``run_id``, in ``run_state`` now), ``buffered`` or
    ``skipped`` (``detail`` says why). ``reason``: scheduled, catch-up, trigger, backfill,
    buffered (started when the previous run ended) or resumed. Times are epoch seconds."""

    key: str
    occurrence: float
    outcome: str
    reason: str
    run_id: str | None
    run_state: str | None
    at: float
    detail: str | None = None
    last: float | None = None
    count: int = 1

    @classmethod
    def of(cls, f: ScheduleFiring, runs: dict[str, RunRecord] | None = None) -> ScheduleOccurrence:
        run = (runs or {}).get(f.run_id or "")
        return cls(f.key, f.occurrence, f.outcome, f.reason, f.run_id,
                   None if run is None else run.state, f.at, f.detail, f.last, f.count)


@attrs.frozen
class ScheduleSummary:
    """One line of ``list_schedules``."""

    id: str
    workflow: str
    version: str
    spec: str  # "cron '0 3 * * *' in Europe/Paris" or "every 15m"
    overlap: str
    catchup_window: float
    paused: bool
    next_fire_at: float

    @classmethod
    def of(cls, s: ScheduleRecord) -> ScheduleSummary:
        return cls(s.id, s.workflow, s.version, sch.describe(s.cron, s.timezone, s.every),
                   s.overlap, s.catchup_window, s.paused, s.next_fire_at)


@attrs.frozen
class ScheduleDescription:
    """A schedule: its definition, whether it is paused, its next fire times and what became
    of its latest occurrences (the newest first). Times are epoch seconds."""

    id: str
    workflow: str
    version: str
    payload: str  # JSON text
    spec: str
    cron: str | None
    timezone: str
    every: float | None
    overlap: str
    catchup_window: float
    paused: bool
    next_fire_times: tuple[float, ...]
    recent: tuple[ScheduleOccurrence, ...]
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, s: ScheduleRecord, times: tuple[float, ...],
           firings: tuple[ScheduleFiring, ...], runs: tuple[RunRecord, ...]) -> ScheduleDescription:
        by_id = {r.id: r for r in runs}
        return cls(s.id, s.workflow, s.version, s.payload,
                   sch.describe(s.cron, s.timezone, s.every), s.cron, s.timezone, s.every,
                   s.overlap, s.catchup_window, s.paused, times,
                   tuple(ScheduleOccurrence.of(f, by_id) for f in firings), s.created_at,
                   s.updated_at)
