"""``aiki.sync.connect()``: the client for blocking code (Django, Flask, scripts, notebooks).

::

    with aiki.sync.connect("ws://127.0.0.1:9090", token=token) as client:
        handle = checkout.enqueue(client, order)        # or client.enqueue("checkout", {...})
        print(handle.wait_for_completion(timeout=30))

The same operations, errors and semantics as the Trio client, as plain blocking calls; the
protocol logic is :mod:`aiki.client.core`'s, over a ``websockets`` threading connection.

**One client is safe to share between threads**, and needs no thread of its own (nor a Trio
or asyncio loop): the threads waiting for replies take turns reading the connection. One of
them reads frames and hands every reply to the thread that waits for it; the others wait on
a condition; when the reader's own reply comes it hands the reading over. In the same way,
the first thread that finds the connection lost reconnects (after a jittered backoff delay),
and every request still waiting goes out again once the server welcomes the new connection,
each within its own timeout. Nobody reads while nobody waits, so a lost connection is
noticed by the next call. (``websockets`` keeps one thread per connection that answers
pings and buffers frames.)
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import attrs
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from aiki import protocol as p
from aiki.client import core
from aiki.client.core import Call, Closing, Event, Failed, Replied, Welcomed
from aiki.client.views import (
    RunStatus,
    RunSummary,
    ScheduleDescription,
    ScheduleOccurrence,
    ScheduleSummary,
)
from aiki.client.websocket import Settings, connect_failure, lost_reason
from aiki.errors import ConnectionLost
from aiki.records import HistoryEvent
from aiki.sources import Sources

R = TypeVar("R")
T = TypeVar("T")


@attrs.frozen
class RunHandle(Generic[R]):
    """A handle on one run: its id, status, history and (eventual) result; blocking calls."""

    client: Client
    id: str
    result_type: Any = Any
    created: bool = True

    def status(self) -> RunStatus:
        return self.client.call(core.get_status(self.id))

    def history(self) -> tuple[HistoryEvent, ...]:
        return self.client.call(core.get_history(self.id))

    def send(self, event: Any, value: Any = None, *, idempotency_key: str | None = None) -> bool:
        """Send ``event`` to this run (see ``aiki.RunHandle.send``)."""
        return self.client.call(core.send_event(self.id, event, value, idempotency_key,
                                                self.client.sources.uuid4()))

    def wakeup(self) -> bool:
        """End the run's current ``run.sleep()`` early (see ``aiki.RunHandle.wakeup``)."""
        return self.client.call(core.wakeup(self.id))

    def cancel(self, reason: str | None = None, *,
               grace: float | datetime.timedelta = core.DEFAULT_GRACE) -> bool:
        """Cancel this run (see ``aiki.RunHandle.cancel``); False if it had ended."""
        return self.client.call(core.cancel(self.id, reason, grace))

    def retry(self, version: str | None = None) -> None:
        """Queue this failed run again (see ``aiki.RunHandle.retry``)."""
        self.client.call(core.retry(self.id, version, self.client.sources.uuid4()))

    def pause(self) -> None:
        """Pause this run at its next step boundary (see ``aiki.RunHandle.pause``)."""
        self.client.call(core.pause(self.id, self.client.sources.uuid4()))

    def resume(self) -> None:
        """Resume this paused run (see ``aiki.RunHandle.resume``)."""
        self.client.call(core.resume(self.id, self.client.sources.uuid4()))

    def wait_for_completion(self, timeout: float | None = None) -> R:
        """The run's result once it completed (see ``aiki.RunHandle.wait_for_completion``)."""
        call = core.wait_for_completion(self.id, self.result_type, timeout)
        return self.client.call(call)  # type: ignore[no-any-return]


@attrs.frozen
class Schedule:
    """A handle on one schedule; blocking calls (see ``aiki.Schedule``)."""

    client: Client
    id: str
    created: bool = False
    updated: bool = False

    def pause(self) -> None:
        self.client.call(core.change_schedule(self.id, "pause"))

    def resume(self) -> None:
        self.client.call(core.change_schedule(self.id, "resume"))

    def trigger(self) -> ScheduleOccurrence:
        return self.client.call(core.trigger_schedule(self.id, self.client.sources.uuid4()))

    def backfill(self, start: float | datetime.datetime,
                 end: float | datetime.datetime) -> list[ScheduleOccurrence]:
        return self.client.call(core.backfill_schedule(self.id, start, end))

    def describe(self, *, firings: int = 10) -> ScheduleDescription:
        return self.client.call(core.describe_schedule(self.id, firings=firings))

    def delete(self) -> bool:
        return self.client.call(core.delete_schedule(self.id))


class Client:
    """A client of one Aiki server for blocking code, safe to share between threads. Get one
    from :func:`connect`."""

    def __init__(self, settings: Settings, sources: Sources) -> None:
        self.settings = settings
        self.sources = sources
        self._core = settings.protocol(sources)
        self._lock = threading.Lock()  # guards everything below and the core
        self._changed = threading.Condition(self._lock)
        self._ws: ClientConnection | None = None  # the connection, welcomed or not yet
        self._reading = False  # a thread is reading the connection for everyone
        self._connecting = False  # a thread is (re)connecting
        self._retry_at = 0.0  # time.monotonic() before which no new connection is tried
        self._closed = threading.Event()  # wakes a thread waiting out a backoff delay
        self._waiting: set[int] = set()
        self._done: dict[int, Replied | Failed] = {}

    @property
    def connections(self) -> int:
        """How many connections were opened (welcomed) so far: above 1 after a reconnect."""
        return self._core.connections

    # -- the operations: one line each, the Call says the rest ----------------------------
    def call(self, call: Call[T]) -> T:
        """Send one :class:`~aiki.client.core.Call` and return what its reply means."""
        limit = call.limit(self.settings.request_timeout)
        deadline = None if limit is None else time.monotonic() + limit
        with self._lock:
            req, frame = self._core.request(call)
            self._waiting.add(req)
            ws = self._ws
        try:
            if frame is not None and ws is not None:
                self._send(ws, frame)
            if not self._serve_until(lambda: req in self._done, deadline):
                raise call.timed_out(self.settings.request_timeout)
            with self._lock:
                event = self._done.pop(req)
            if isinstance(event, Failed):
                raise event.error
            return event.value  # type: ignore[no-any-return]
        finally:
            with self._lock:
                self._waiting.discard(req)
                self._done.pop(req, None)
                self._core.abandon(req)

    def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                  limit: int = 100, stranded: bool = False) -> list[RunSummary]:
        """The newest ``limit`` runs (at most 1000), optionally of one ``workflow`` and/or
        in one ``state``."""
        return self.call(core.list_runs(workflow=workflow, state=state, limit=limit,
                                               stranded=stranded))

    def stranded_versions(self) -> list[p.StrandedVersion]:
        """Workflow versions whose queued runs no connected worker can take (for longer
        than the server's threshold, 60 s), with how many and since when."""
        return self.call(core.stranded_versions())

    def list_workers(self) -> list[p.WorkerInfo]:
        """The workers connected now."""
        return self.call(core.list_workers())

    def enqueue(self, workflow: str, payload: Any = None, *, version: str | None = None,
                idempotency_key: str | None = None,
                on_conflict: str = "raise") -> RunHandle[Any]:
        """Start a run by workflow name (untyped: the result comes back as plain JSON)."""
        return self._enqueue(workflow, core.encode_payload(workflow, payload), version=version,
                             idempotency_key=idempotency_key, result_type=Any,
                             on_conflict=on_conflict)

    def _enqueue(self, workflow: str, payload: str, *, version: str | None,
                 idempotency_key: str | None, result_type: Any,
                 on_conflict: str = "raise") -> RunHandle[Any]:
        reply = self.call(core.enqueue(workflow, payload, version=version,
                                       idempotency_key=idempotency_key,
                                       run_id=self.sources.new_id(),
                                       on_conflict=on_conflict))
        return RunHandle(self, reply.run_id, result_type, reply.created)

    def purge_runs(self, *, before: float | datetime.datetime) -> int:
        """Delete the runs that finished before ``before`` (see ``aiki.Client.purge_runs``)."""
        cutoff, total = core.purge_cutoff(before), 0
        while True:
            count = self.call(core.purge_batch(cutoff))
            total += count
            if count < core.PURGE_BATCH:
                return total

    def handle(self, run_id: str, result_type: Any = Any) -> RunHandle[Any]:
        """The handle of an existing run."""
        return RunHandle(self, run_id, result_type, created=False)

    def schedule(self, workflow: str, payload: Any = None, *, id: str,
                 version: str | None = None, cron: str | None = None, timezone: str = "UTC",
                 every: float | datetime.timedelta | None = None, overlap: str = "skip",
                 catchup_window: float | datetime.timedelta = 60.0,
                 update: bool = False) -> Schedule:
        """Schedule a workflow by name (see ``aiki.Workflow.schedule``)."""
        return self._schedule(workflow, core.encode_payload(workflow, payload), id=id,
                              version=version, cron=cron, timezone=timezone, every=every,
                              overlap=overlap, catchup_window=catchup_window, update=update)

    def _schedule(self, workflow: str, payload: str, *, id: str, version: str | None,
                  cron: str | None, timezone: str, every: float | datetime.timedelta | None,
                  overlap: str, catchup_window: float | datetime.timedelta,
                  update: bool) -> Schedule:
        reply = self.call(core.define_schedule(
            id, workflow, payload, version=version, cron=cron, timezone=timezone, every=every,
            overlap=overlap, catchup_window=catchup_window, update=update))
        return Schedule(self, reply.schedule.id, reply.created, reply.updated)

    def list_schedules(self) -> list[ScheduleSummary]:
        return self.call(core.list_schedules())

    def schedule_handle(self, schedule_id: str) -> Schedule:
        return Schedule(self, schedule_id)

    def fork(self, run_id: str, *, from_step: int,
             version: str | None = None) -> RunHandle[Any]:
        """A new run whose first ``from_step`` steps are copied from run ``run_id``'s (see
        ``aiki.Client.fork``)."""
        new_id = self.call(core.fork(run_id, from_step, version, self.sources.new_id()))
        return RunHandle(self, new_id, Any)

    # -- taking turns at the connection -----------------------------------------------------
    def _serve_until(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Read, reconnect or wait, as this thread's turn comes, until ``done()`` (checked
        under the lock) is true; False once ``deadline`` passed first."""
        while True:
            with self._lock:
                while True:
                    if done():
                        return True
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    if self._core.ended is not None:
                        raise self._core.ended
                    if self._ws is None and not self._connecting:
                        self._connecting = True
                        role = self._connect
                        break
                    if self._ws is not None and not self._reading:
                        self._reading = True
                        role = partial(self._read, self._ws)
                        break
                    self._changed.wait(left)
            role(left)

    def _connect(self, left: float | None) -> None:
        """This thread's turn to connect: wait out the backoff, then open and say hello."""
        url = self.settings.url
        try:
            pause = self._retry_at - time.monotonic()
            if pause > 0:
                self._closed.wait(pause if left is None else min(pause, left))
                if self._closed.is_set() or (left is not None and pause > left):
                    return
            opening = self.settings.open_timeout if left is None else min(
                self.settings.open_timeout, left)
            try:
                # Entered and left by hand: the connection outlives this call.
                ws = ws_connect(url, **self.settings.connect_options(opening)).__enter__()
            except Exception as exc:  # OSError, TimeoutError, a refused handshake, ...
                with self._lock:
                    self._deliver(self._core.lost(connect_failure(url, exc)))
                    if self._core.ended is None:
                        self._retry_at = time.monotonic() + self._core.next_delay()
                return
            with self._lock:
                if self._core.ended is not None:  # closed meanwhile
                    ws.close()
                    return
                hello = self._core.opened()
                self._ws = ws
            self._send(ws, hello)
        finally:
            with self._lock:
                self._connecting = False
                self._changed.notify_all()

    def _read(self, ws: ClientConnection, left: float | None) -> None:
        """This thread's turn to read ``ws``: one frame (or none before ``left`` seconds)."""
        try:
            try:
                frame = ws.recv(timeout=left)
            except TimeoutError:
                return
            except ConnectionClosed as exc:
                self._lose(ws, lost_reason(self.settings.url, exc))
                return
            with self._lock:
                events = self._core.receive(frame)
            for event in events:
                if isinstance(event, Welcomed):
                    if event.resend is not None:
                        self._send(ws, event.resend)
                elif isinstance(event, Closing):
                    self._lose(ws, event.error)
                else:
                    with self._lock:
                        self._deliver([event])
        finally:
            with self._lock:
                self._reading = False
                self._changed.notify_all()

    def _send(self, ws: ClientConnection, frame: str) -> None:
        try:
            ws.send(frame)  # thread-safe in websockets
        except ConnectionClosed as exc:
            self._lose(ws, lost_reason(self.settings.url, exc))

    def _lose(self, ws: ClientConnection, error: BaseException) -> None:
        """``ws`` is gone: requests wait for the next connection (or fail, if none may come)."""
        with self._lock:
            if self._ws is ws:
                self._ws = None
                self._deliver(self._core.lost(error))
                if self._core.ended is None:
                    self._retry_at = time.monotonic() + self._core.next_delay()
                self._changed.notify_all()
        ws.close()

    def _deliver(self, events: list[Event]) -> None:
        """Hand replies to their threads (called with the lock held)."""
        for event in events:
            assert isinstance(event, (Replied, Failed))
            if event.req in self._waiting:
                self._done[event.req] = event
        self._changed.notify_all()

    def _open_first(self) -> None:
        """The first connection: welcomed, or its failure raised (not retried)."""
        limit = self.settings.open_timeout + self.settings.request_timeout
        if not self._serve_until(lambda: self._core.is_open, time.monotonic() + limit):
            self.close()
            raise ConnectionLost(f"no welcome from {self.settings.url} within {limit} s")

    def close(self) -> None:
        """Close the connection; calls still waiting raise :class:`aiki.ConnectionLost`."""
        self._closed.set()
        with self._lock:
            self._deliver(self._core.end(ConnectionLost("the client is closed")))
            ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()


@contextmanager
def _open(settings: Settings, sources: Sources) -> Iterator[Client]:
    client = Client(settings, sources)
    client._open_first()
    try:
        yield client
    finally:
        client.close()


def connect(
    url: str, *, token: str | None = None, cafile: str | None = None,
    request_timeout: float = 30.0, max_frame_bytes: int | None = None,
    ping_interval: float | None = None, ping_timeout: float | None = None,
    sources: Sources | None = None,
) -> AbstractContextManager[Client]:
    """Connect to the Aiki server at ``url`` (``ws://host:port`` or ``wss://host:port``);
    use it with ``with``. The options are ``aiki.connect``'s.

    Raises :class:`aiki.AuthenticationFailed` if the server refuses the token and
    :class:`aiki.ConnectionLost` if it cannot be reached.
    """
    settings = Settings.of(url, token=token, cafile=cafile, request_timeout=request_timeout,
                           max_frame_bytes=max_frame_bytes, ping_interval=ping_interval,
                           ping_timeout=ping_timeout)
    return _open(settings, sources or Sources.system())


__all__ = ["Client", "RunHandle", "Schedule", "connect"]
