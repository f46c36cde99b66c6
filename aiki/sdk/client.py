"""The Trio client: start runs and watch them. The same API in embedded mode and over a network.

Each operation is a :class:`aiki.client.core.Call` (what to send, what the reply means), sent
through a :class:`Link`; ``aiki.asyncio`` and ``aiki.sync`` send the same Calls.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs
import trio

from aiki import protocol as p
from aiki.actors.link import Link
from aiki.actors.scopes import serving_nursery
from aiki.client import core
from aiki.client.core import Backoff, Call
from aiki.client.views import (
    RunStatus,
    RunSummary,
    ScheduleDescription,
    ScheduleOccurrence,
    ScheduleSummary,
    TaskStatus,
    WaitStatus,
)
from aiki.errors import AikiError
from aiki.records import HistoryEvent
from aiki.sources import Sources
from aiki.transport.base import Transport

if TYPE_CHECKING:
    from aiki.sdk.definitions import Event

R = TypeVar("R")
log = logging.getLogger("aiki.client")
STRANDED_CHECK = 60.0  # seconds between looks while waiting on a run
T = TypeVar("T")


class Caller(Protocol):
    """What a run handle needs of its client: a way to send a Call (Trio or asyncio), and
    its sources (for the ids it chooses)."""

    sources: Sources

    async def call(self, call: Call[T]) -> T: ...


@attrs.frozen
class RunHandle(Generic[R]):
    """A handle on one run: its id, status, history and (eventual) result. The Trio and the
    asyncio clients both give these."""

    client: Caller
    id: str
    result_type: Any = Any
    created: bool = True

    async def status(self) -> RunStatus:
        return await self.client.call(core.get_status(self.id))

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
        return await self.client.call(core.send_event(self.id, event, value, idempotency_key,
                                                      self.client.sources.uuid4()))

    async def wakeup(self) -> bool:
        """End the run's current ``run.sleep()`` early (it returns False in the workflow).
        False, changing nothing, if the run is not sleeping."""
        return await self.client.call(core.wakeup(self.id))

    async def cancel(self, reason: str | None = None, *,
                     grace: float | datetime.timedelta = core.DEFAULT_GRACE) -> bool:
        """Cancel this run: it ends ``cancelled``. Its worker is told at once; its task
        bodies in flight are cancelled, and nothing more is written under its lease. Its
        workflow sees ``aiki.RunCancelled`` at the await where it stands, and has ``grace``
        (seconds or a timedelta, 60 s by default; 0: none) to compensate inside
        ``run.shield()``. False, changing nothing, if the run had ended already."""
        return await self.client.call(core.cancel(self.id, reason, grace))

    async def retry(self, version: str | None = None) -> None:
        """Queue this failed run again, after a fix: its completed steps are kept (replay
        returns them) and its failed or unfinished ones run again. ``version`` re-pins it
        to another version of its workflow (a fix deployed as a new version), whose code
        must still replay the kept steps. ``aiki.RunNotRetryable`` if it has not failed."""
        await self.client.call(core.retry(self.id, version, self.client.sources.uuid4()))

    async def pause(self) -> None:
        """Pause this run at its next step boundary: a task in flight finishes and its
        result is recorded, no new step starts, and its worker gives the run back (its slot
        is free). A waiting run keeps its waits and does not wake; events sent meanwhile are
        buffered. ``aiki.RunNotPausable`` if it has finished or is paused already."""
        await self.client.call(core.pause(self.id, self.client.sources.uuid4()))

    async def resume(self) -> None:
        """Resume this paused run: it waits again if its waits still wait, or is queued.
        ``aiki.RunNotPaused`` if it is not paused."""
        await self.client.call(core.resume(self.id, self.client.sources.uuid4()))

    async def history(self) -> tuple[HistoryEvent, ...]:
        return await self.client.call(core.get_history(self.id))

    async def wait_for_completion(self, timeout: float | None = None) -> R:
        """The run's result, decoded into the workflow's return type, once it completed.

        Raises ``aiki.WorkflowFailed`` (with the remote error type and message) if it failed,
        ``aiki.WorkflowCancelled`` (with the reason) if it was cancelled,
        ``TimeoutError`` after ``timeout`` seconds. The server pushes the end; nobody polls.
        A run left queued with no connected worker for its version is logged (once, at
        WARNING, on ``aiki.client``) while this waits, rather than waited on in silence.
        """
        wait = core.wait_for_completion(self.id, self.result_type, timeout)
        client = self.client
        if not isinstance(client, Client):  # (the asyncio client's handles)
            return await client.call(wait)
        watch = client.stranded
        watch.add(self.id)
        try:
            return await client.call(wait)
        finally:
            watch.discard(self.id)


@attrs.define(eq=False)
class _Watched:
    at: float  # when to look next (Trio's clock)
    delay: float  # the pause before the look after that
    waiters: int = 1


@attrs.define(eq=False)
class StrandedWatch:
    """Tells, on ``aiki.client``, of the runs a client's handles wait on that are stranded
    (queued, and no connected worker has their version): a look after 1 minute of waiting,
    2, 4, ... then hourly, once per run until it is told. One task per client does it for
    all its waits (:meth:`serve`), so a wait costs a dict entry, not a task and a timer."""

    _waits: dict[str, _Watched] = attrs.field(factory=dict)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _wake_at: float = -math.inf  # when ``serve`` looks next, while it sleeps

    def add(self, run_id: str) -> None:
        watched = self._waits.get(run_id)
        if watched is not None:
            watched.waiters += 1
            return
        at = trio.current_time() + STRANDED_CHECK
        self._waits[run_id] = _Watched(at, STRANDED_CHECK)
        if at < self._wake_at:
            self._wake.set()

    def discard(self, run_id: str) -> None:
        watched = self._waits.get(run_id)
        if watched is not None:
            watched.waiters -= 1
            if watched.waiters <= 0:
                del self._waits[run_id]

    async def serve(self, client: Client) -> None:
        while True:
            first = min((w.at for w in self._waits.values()), default=math.inf)
            if first > trio.current_time():
                self._wake, self._wake_at = trio.Event(), first
                with trio.move_on_at(first):
                    await self._wake.wait()
                self._wake_at = -math.inf
                continue
            try:
                stranded = {r.id: r for r in await client.list_runs(stranded=True, limit=1000)}
            except (AikiError, TimeoutError) as exc:
                log.debug("could not list the stranded runs: %s", exc)
                stranded = {}
            now = trio.current_time()
            for run_id, watched in list(self._waits.items()):
                if watched.at > now:
                    continue
                run = stranded.get(run_id)
                if run is not None:
                    log.warning(
                        "run %s is still queued and no connected worker has registered "
                        "workflow %r version %s: start a worker that has it (the run waits "
                        "in the queue until one does)", run.id, run.workflow, run.version)
                    watched.at = math.inf  # told once
                else:
                    watched.delay = min(watched.delay * 2, 3600.0)
                    watched.at = now + watched.delay


@attrs.frozen
class Schedule:
    """A handle on one schedule (from ``wf.schedule(...)`` or ``client.schedule_handle(id)``).
    The Trio and the asyncio clients both give these. ``created``: this call created it;
    ``updated``: this call replaced its definition (``update=True``)."""

    client: Caller
    id: str
    created: bool = False
    updated: bool = False

    async def pause(self) -> None:
        """Stop firing until :meth:`resume`; occurrences meanwhile are skipped."""
        await self.client.call(core.change_schedule(self.id, "pause"))

    async def resume(self) -> None:
        """Fire again, from the next occurrence after now."""
        await self.client.call(core.change_schedule(self.id, "resume"))

    async def trigger(self) -> ScheduleOccurrence:
        """Fire once now, under the overlap policy (``skip`` skips it while the previous
        run is unfinished); what became of it."""
        return await self.client.call(core.trigger_schedule(self.id,
                                                            self.client.sources.uuid4()))

    async def backfill(self, start: float | datetime.datetime,
                       end: float | datetime.datetime) -> list[ScheduleOccurrence]:
        """Every occurrence from ``start`` to ``end`` (aware datetimes or epoch seconds, at
        most 1000 occurrences, none in the future) that was never handled, oldest first,
        under the overlap policy (the catch-up window does not apply)."""
        return await self.client.call(core.backfill_schedule(self.id, start, end))

    async def describe(self, *, firings: int = 10) -> ScheduleDescription:
        """The definition, paused or not, the next five fire times, and what became of the
        latest ``firings`` occurrences (with their runs' states)."""
        return await self.client.call(core.describe_schedule(self.id, firings=firings))

    async def delete(self) -> bool:
        """Delete the schedule (the runs it started stay); False if it did not exist."""
        return await self.client.call(core.delete_schedule(self.id))


class Operations:
    """The client operations of the Trio and the asyncio clients (each sends Calls its own
    way, through ``call``; ``sources`` picks the run ids it chooses)."""

    sources: Sources

    async def call(self, call: Call[T]) -> T:
        raise NotImplementedError

    async def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                        limit: int = 100, stranded: bool = False) -> list[RunSummary]:
        """The newest ``limit`` runs (at most 1000), optionally of one ``workflow`` and/or
        in one ``state`` (queued, running, waiting, completed, failed, cancelled)."""
        return await self.call(core.list_runs(workflow=workflow, state=state, limit=limit,
                                               stranded=stranded))

    async def stranded_versions(self) -> list[p.StrandedVersion]:
        """Workflow versions whose queued runs no connected worker can take (for longer
        than the server's threshold, 60 s), with how many and since when."""
        return await self.call(core.stranded_versions())

    async def list_workers(self) -> list[p.WorkerInfo]:
        """The workers connected now: id, workflow versions, slots, slots in use, when they
        connected and last heartbeated (epoch seconds), and whether they are draining."""
        return await self.call(core.list_workers())

    async def enqueue(self, workflow: str, payload: Any = None, *, version: str | None = None,
                      idempotency_key: str | None = None,
                      on_conflict: str = "raise") -> RunHandle[Any]:
        """Start a run by workflow name (untyped: the result comes back as plain JSON).
        Without ``version``, the newest version a worker registered."""
        return await self._enqueue(workflow, core.encode_payload(workflow, payload),
                                   version=version, idempotency_key=idempotency_key,
                                   result_type=Any, on_conflict=on_conflict)

    async def _enqueue(self, workflow: str, payload: str, *, version: str | None,
                       idempotency_key: str | None, result_type: Any,
                       on_conflict: str = "raise") -> RunHandle[Any]:
        reply = await self.call(core.enqueue(workflow, payload, version=version,
                                             idempotency_key=idempotency_key,
                                             run_id=self.sources.new_id(),
                                             on_conflict=on_conflict))
        return RunHandle(self, reply.run_id, result_type, reply.created)

    async def purge_runs(self, *, before: float | datetime.datetime) -> int:
        """Delete every run that finished (completed, failed or cancelled) before ``before``
        (epoch seconds, or a timezone-aware datetime), with its steps, history and events,
        in batches; how many were deleted. Unfinished runs are never touched."""
        return await purge_runs(self, before)

    def handle(self, run_id: str, result_type: Any = Any) -> RunHandle[Any]:
        """The handle of an existing run (also one started before a restart)."""
        return RunHandle(self, run_id, result_type, created=False)

    async def schedule(self, workflow: str, payload: Any = None, *, id: str,
                       version: str | None = None, cron: str | None = None,
                       timezone: str = "UTC",
                       every: float | datetime.timedelta | None = None, overlap: str = "skip",
                       catchup_window: float | datetime.timedelta = 60.0,
                       update: bool = False) -> Schedule:
        """Schedule a workflow by name (untyped payload); see ``aiki.Workflow.schedule``.
        Without ``version``, the newest version a worker registered."""
        return await self._schedule(workflow, core.encode_payload(workflow, payload), id=id,
                                    version=version, cron=cron, timezone=timezone,
                                    every=every, overlap=overlap,
                                    catchup_window=catchup_window, update=update)

    async def _schedule(self, workflow: str, payload: str, *, id: str, version: str | None,
                        cron: str | None, timezone: str,
                        every: float | datetime.timedelta | None, overlap: str,
                        catchup_window: float | datetime.timedelta,
                        update: bool) -> Schedule:
        reply = await self.call(core.define_schedule(
            id, workflow, payload, version=version, cron=cron, timezone=timezone, every=every,
            overlap=overlap, catchup_window=catchup_window, update=update))
        return Schedule(self, reply.schedule.id, reply.created, reply.updated)

    async def list_schedules(self) -> list[ScheduleSummary]:
        """Every schedule, by id: its workflow, spec, policy, paused or not, next fire time."""
        return await self.call(core.list_schedules())

    def schedule_handle(self, schedule_id: str) -> Schedule:
        """The handle of an existing schedule."""
        return Schedule(self, schedule_id)

    async def fork(self, run_id: str, *, from_step: int,
                   version: str | None = None) -> RunHandle[Any]:
        """A new run of the same workflow and payload whose first ``from_step`` steps (in
        step order, as ``status().tasks`` lists them) are copied from run ``run_id``; the
        rest run fresh. ``version`` pins it to another version of the workflow. The new run
        records its origin (``status().forked_from``). ``aiki.InvalidFork`` if
        ``from_step`` is past the end of the run's history or takes in an unfinished step."""
        new_id = await self.call(core.fork(run_id, from_step, version, self.sources.new_id()))
        return RunHandle(self, new_id, Any)


@attrs.define(eq=False)
class Client(Operations):
    """Talks to one Aiki server. Get one from ``aiki.embedded()`` (or ``aiki.connect()``)."""

    transport: Transport
    address: str
    sources: Sources
    link: Link
    token: str | None = None
    stranded: StrandedWatch = attrs.field(factory=StrandedWatch)

    @classmethod
    @asynccontextmanager
    async def open(cls, transport: Transport, address: str, sources: Sources,
                   token: str | None = None, *, request_timeout: float = 30.0,
                   reconnect: Backoff | None = Backoff()) -> AsyncIterator[Client]:
        """Connect (raising what went wrong) and stay connected, reconnecting after a loss,
        until the block ends."""
        node = f"client-{sources.short_id()}"
        async with Link.open(transport, address, core.client_hello(node, token),
                             request_timeout=request_timeout, reconnect=reconnect,
                             rng=random.Random(f"aiki-link:{node}")) as link:
            client = cls(transport, address, sources, link, token)
            async with serving_nursery() as nursery:
                nursery.start_soon(client.stranded.serve, client)
                yield client

    async def call(self, call: Call[T]) -> T:
        """Send one :class:`~aiki.client.core.Call` and return what its reply means."""
        try:
            reply = await self.link.request(call.make, timeout=call.timeout)
        except TimeoutError:
            raise call.timed_out(self.link.request_timeout) from None
        return call.outcome(reply)


async def purge_runs(client: Caller, before: float | datetime.datetime) -> int:
    """``purge_runs`` of the Trio and asyncio clients: batches until one comes back short."""
    cutoff, total = core.purge_cutoff(before), 0
    while True:
        count = await client.call(core.purge_batch(cutoff))
        total += count
        if count < core.PURGE_BATCH:
            return total


__all__ = ["Client", "Operations", "RunHandle", "RunStatus", "RunSummary", "Schedule",
           "ScheduleDescription", "ScheduleOccurrence", "ScheduleSummary", "TaskStatus",
           "WaitStatus"]
