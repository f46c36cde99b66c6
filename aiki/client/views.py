"""The values every client returns (Trio, asyncio and blocking alike): plain frozen records."""

from __future__ import annotations

import attrs

from aiki.records import RunRecord, StepRecord, WaitRecord


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
    # A fork's origin: the run it was copied from, and how many of its steps it was given.
    forked_from: str | None = None
    forked_steps: int | None = None

    @classmethod
    def of(cls, run: RunRecord, steps: tuple[StepRecord, ...],
           waits: tuple[WaitRecord, ...] = ()) -> RunStatus:
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
                   tuple(shown), run.error_traceback, run.forked_from, run.forked_steps)


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
