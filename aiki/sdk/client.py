"""The client: start runs and watch them. The same API in embedded mode and over a network."""

from __future__ import annotations

import datetime
import math
import random
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from aiki import protocol as p
from aiki.actors.link import Backoff, Link
from aiki.errors import WorkflowFailed
from aiki.records import HistoryEvent, RunRecord, RunState, StepRecord, WaitRecord
from aiki.sources import Sources
from aiki.transport.base import Transport

if TYPE_CHECKING:
    from aiki.sdk.definitions import Event

R = TypeVar("R")
RUN_STATES: tuple[str, ...] = typing.get_args(RunState)


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
    what it waits for (``waits``: while ``waiting``, or sleeping inline on its worker)."""

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
                   tuple(shown), run.error_traceback)


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
class RunHandle(Generic[R]):
    """A handle on one run: its id, status, history and (eventual) result."""

    client: Client
    id: str
    result_type: Any = Any
    created: bool = True

    async def status(self) -> RunStatus:
        info = await self.client.link.request(lambda req: p.GetRun(req, self.id))
        return RunStatus.of(info.run, info.steps, info.waits)

    async def send(self, event: Event[Any] | str, value: Any = None, *,
                   idempotency_key: str | None = None) -> bool:
        """Send ``event`` (an ``aiki.event`` definition, or its name) to this run.

        It goes to the run's current wait for it, or is buffered for its next one; True if
        it was delivered at once. A second send with the same ``idempotency_key`` (for this
        run and event) returns normally and stores nothing. Refused, with nothing stored:
        a finished run (``aiki.RunFinished``), an event its workflow version does not
        declare (``aiki.UnknownEvent``), a value of the wrong type (``aiki.PayloadError``),
        an unknown run (``aiki.RunNotFound``).
        """
        if isinstance(event, str):
            name, payload = event, p.encode_value(value, what=f"event {event!r}")
        else:
            name, payload = event.name, event.encode(value)
        reply = await self.client.link.request(
            lambda req: p.SendEvent(req, self.id, name, payload, idempotency_key))
        return bool(reply.delivered)

    async def wakeup(self) -> bool:
        """End the run's current ``run.sleep()`` early (it returns False in the workflow).
        False, changing nothing, if the run is not sleeping."""
        reply = await self.client.link.request(lambda req: p.Wakeup(req, self.id))
        return bool(reply.woken)

    async def history(self) -> tuple[HistoryEvent, ...]:
        reply = await self.client.link.request(lambda req: p.GetHistory(req, self.id))
        return reply.events  # type: ignore[no-any-return]

    async def wait_for_completion(self, timeout: float | None = None) -> R:
        """The run's result, decoded into the workflow's return type, once it completed.

        Raises ``aiki.WorkflowFailed`` (with the remote error type and message) if it failed,
        ``TimeoutError`` after ``timeout`` seconds. The server pushes the end; nobody polls.
        """
        limit = math.inf if timeout is None else timeout
        try:
            ended = await self.client.link.request(lambda req: p.WatchRun(req, self.id),
                                                   timeout=limit)
        except TimeoutError:
            raise TimeoutError(f"run {self.id} did not finish within {timeout} s") from None
        run: RunRecord = ended.run
        if run.state != "completed":
            raise WorkflowFailed(run.id, run.error_type or run.state, run.error_message or "",
                                 run.error_traceback)
        assert run.result is not None
        return p.decode_value(run.result, self.result_type,  # type: ignore[no-any-return]
                              what=f"result of run {run.id}")


@attrs.define(eq=False)
class Client:
    """Talks to one Aiki server. Get one from ``aiki.embedded()`` (or ``aiki.connect()``)."""

    transport: Transport
    address: str
    sources: Sources
    link: Link
    token: str | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, transport: Transport, address: str, sources: Sources,
                   token: str | None = None, *, request_timeout: float = 30.0,
                   reconnect: Backoff | None = Backoff()) -> AsyncIterator[Client]:
        """Connect (raising what went wrong) and stay connected, reconnecting after a loss,
        until the block ends."""
        node = f"client-{sources.short_id()}"
        async with Link.open(transport, address,
                             lambda req: p.Hello(req, "client", node, token=token),
                             request_timeout=request_timeout, reconnect=reconnect,
                             rng=random.Random(f"aiki-link:{node}")) as link:
            yield cls(transport, address, sources, link, token)

    async def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                        limit: int = 100) -> list[RunSummary]:
        """The newest ``limit`` runs (at most 1000), optionally of one ``workflow`` and/or
        in one ``state`` (queued, running, waiting, completed, failed, cancelled)."""
        if state is not None and state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; the states are "
                             f"{', '.join(RUN_STATES)}")
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an int from 1 to 1000, got {limit!r}")
        reply = await self.link.request(lambda req: p.ListRuns(req, workflow, state, limit))
        return [RunSummary.of(run) for run in reply.runs]

    async def list_workers(self) -> list[p.WorkerInfo]:
        """The workers connected now: id, workflow versions, slots, slots in use, when they
        connected and last heartbeated (epoch seconds), and whether they are draining."""
        reply = await self.link.request(p.ListWorkers)
        return list(reply.workers)

    async def enqueue(self, workflow: str, payload: Any = None, *, version: str | None = None,
                      idempotency_key: str | None = None) -> RunHandle[Any]:
        """Start a run by workflow name (untyped: the result comes back as plain JSON).
        Without ``version``, the newest version a worker registered."""
        encoded = p.encode_value(payload, what=f"payload of workflow {workflow!r}")
        return await self._enqueue(workflow, encoded, version=version,
                                   idempotency_key=idempotency_key, result_type=Any)

    async def _enqueue(self, workflow: str, payload: str, *, version: str | None,
                       idempotency_key: str | None, result_type: Any) -> RunHandle[Any]:
        run_id = self.sources.new_id()
        reply = await self.link.request(
            lambda req: p.Enqueue(req, workflow, payload, version, idempotency_key, run_id)
        )
        return RunHandle(self, reply.run_id, result_type, reply.created)

    async def purge_runs(self, *, before: float | datetime.datetime) -> int:
        """Delete every run that finished (completed, failed or cancelled) before ``before``
        (epoch seconds, or a timezone-aware datetime), with its steps, history and events,
        in batches; how many were deleted. Unfinished runs are never touched."""
        if isinstance(before, datetime.datetime):
            if before.tzinfo is None:
                raise ValueError("before= must be a timezone-aware datetime (or epoch "
                                 "seconds)")
            before = before.timestamp()
        total = 0
        while True:
            reply = await self.link.request(lambda req: p.PurgeRuns(req, float(before), 500))
            count: int = reply.count
            total += count
            if count < 500:
                return total

    def handle(self, run_id: str, result_type: Any = Any) -> RunHandle[Any]:
        """The handle of an existing run (also one started before a restart)."""
        return RunHandle(self, run_id, result_type, created=False)
