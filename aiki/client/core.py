"""The client's protocol logic, without I/O (as h11 and wsproto are).

The Trio, asyncio and blocking clients are thin front ends around this module: none of them
knows what a request looks like, what a reply means or when to send a request again.

- **Calls.** Each client operation is a function here that returns a :class:`Call`: the
  request to send (given its ``req``), the reply it expects, what that reply means (a value,
  or an error of :mod:`aiki.errors`) and how long it may take. Adding an operation is one
  function here and one line in each front end.
- **ClientProtocol.** The state of one client across its connections: it numbers requests,
  gives the frames to send (on each new connection the hello first, then, once welcomed,
  every request still waiting: each is safe to repeat, see :mod:`aiki.store.ops`), matches
  the frames received to their requests, and decides what a lost connection means: wait
  for the next one, or fail everything (a refusal no reconnection can fix, or a first
  connection that never got its welcome). It never touches a socket, a clock or a thread:
  the front end sends what it is given, feeds in what it receives, sleeps the delays it is
  told and owns the timers. It is not thread-safe; the blocking client holds a lock around
  it.

The Trio client reaches the server through the worker's :class:`aiki.actors.link.Link`
(the same connection machinery for clients and workers, over any :class:`Transport`), and
uses the Calls here for everything else.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import typing
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

from aiki import errors, tracing
from aiki import protocol as p
from aiki import schedules as sch
from aiki.client.views import (
    RunStatus,
    RunSummary,
    ScheduleDescription,
    ScheduleOccurrence,
    ScheduleSummary,
)
from aiki.records import HistoryEvent, RunRecord, RunState, ScheduleRecord

log = logging.getLogger("aiki.client")
T = TypeVar("T")
RUN_STATES: tuple[str, ...] = typing.get_args(RunState)
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_FRAME_BYTES = 16 * 2**20  # the server's default (``--max-frame-bytes``)

# -- refusals ---------------------------------------------------------------------------------
_REFUSALS: dict[str, type[errors.AikiError]] = {
    cls.__name__: cls
    for cls in (
        errors.StaleLease, errors.StepConflict, errors.RunNotFound, errors.UnknownWorkflow,
        errors.ProtocolError, errors.StoreUnavailable, errors.PayloadError,
        errors.AuthenticationFailed, errors.ConnectionLost, errors.RunFinished,
        errors.UnknownEvent, errors.RunNotRetryable, errors.RunNotPausable,
        errors.RunNotPaused, errors.InvalidFork, errors.RunPaused, errors.ControlRefused,
        errors.IdempotencyConflict, errors.WorkerIdInUse, errors.ScheduleInvalid,
        errors.ScheduleConflict, errors.ScheduleNotFound,
    )
}
#: Refusals of a connection that no reconnection can fix.
FATAL: tuple[type[errors.AikiError], ...] = (errors.AuthenticationFailed, errors.ProtocolError,
                                             errors.WorkerIdInUse)


def refusal_error(error_type: str, message: str) -> errors.AikiError:
    """The local exception for a server's refusal (``Refused`` or ``Goodbye``)."""
    cls = _REFUSALS.get(error_type, errors.AikiError)
    return cls(message) if cls is not errors.AikiError else cls(f"{error_type}: {message}")


def goodbye_error(msg: p.Goodbye) -> errors.AikiError:
    """Why the server closed a connection: a refusal no reconnection fixes (its
    ``error_type``), or a close after which a client may simply connect again."""
    if msg.error_type is not None:
        return refusal_error(msg.error_type, msg.reason)
    return errors.ConnectionLost(f"the server closed the connection: {msg.reason}")


def welcome_of(msg: Any, address: str) -> p.Welcome:
    """The server's answer to a hello: its ``Welcome``, or raised, the error it means."""
    if isinstance(msg, p.Welcome):
        return msg
    if isinstance(msg, p.Refused):
        raise refusal_error(msg.error_type, msg.message)
    raise errors.ProtocolError(f"expected 'welcome' from {address}, got {msg!r}")


@attrs.frozen
class Backoff:
    """Delays between reconnection attempts: doubling from ``initial`` up to ``maximum``,
    each drawn uniformly from its upper half (jitter, so clients do not reconnect in step)."""

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.initial * 2.0 ** min(attempt, 30))
        return ceiling / 2 + rng.random() * ceiling / 2


# -- calls --------------------------------------------------------------------------------------
@attrs.frozen
class Call(Generic[T]):
    """One operation: the request ``make(req)``, the reply type it expects, and ``read``,
    which turns that reply into the caller's value (or raises the caller's error).

    ``timeout``: seconds for the whole call, reconnections included; None means the client's
    ``request_timeout``, ``math.inf`` no limit. ``late`` is the message of the TimeoutError.
    """

    make: Callable[[int], Any]
    reply: type[Any]
    read: Callable[[Any], T]
    timeout: float | None = None
    late: str | None = None

    def outcome(self, msg: Any) -> T:
        """What the reply ``msg`` means: the value, or a raised error."""
        if isinstance(msg, p.Refused):
            raise refusal_error(msg.error_type, msg.message)
        if not isinstance(msg, self.reply):
            raise errors.ProtocolError(
                f"expected {self.reply.TAG!r} in reply, got {type(msg).__name__}")
        return self.read(msg)

    def limit(self, request_timeout: float) -> float | None:
        """Seconds this call may take in all, or None for no limit."""
        limit = request_timeout if self.timeout is None else self.timeout
        return None if math.isinf(limit) else limit

    def timed_out(self, request_timeout: float) -> TimeoutError:
        if self.late is not None:
            return TimeoutError(self.late)
        return TimeoutError(f"no reply from the server within {self.limit(request_timeout)} s")


def encode_payload(workflow: str, payload: Any, annotation: Any = Any) -> str:
    """A workflow's payload as JSON text; raises :class:`aiki.PayloadError` (a TypeError)
    here, at the call site, so nothing is sent or stored for a payload that cannot be encoded."""
    return p.encode_value(payload, annotation, what=f"payload of workflow {workflow!r}")


def enqueue(workflow: str, payload: str, *, version: str | None, idempotency_key: str | None,
            run_id: str, on_conflict: str = "raise") -> Call[p.Enqueued]:
    """Start a run of ``workflow`` with ``payload`` (JSON text from :func:`encode_payload`).
    ``run_id`` is chosen by the client, so a request sent again makes one run. A key that
    names a run of another payload raises ``aiki.IdempotencyConflict``, or returns that run
    with ``on_conflict="return_existing"``."""
    if on_conflict not in ("raise", "return_existing"):
        raise ValueError(f"on_conflict must be 'raise' or 'return_existing', "
                         f"got {on_conflict!r}")
    trace_context = tracing.current_context()  # the caller's span parents the run's spans
    return Call(lambda req: p.Enqueue(req, workflow, payload, version, idempotency_key, run_id,
                                      on_conflict, trace_context),
                p.Enqueued, lambda reply: reply)


def get_status(run_id: str) -> Call[RunStatus]:
    return Call(lambda req: p.GetRun(req, run_id), p.RunInfo,
                lambda info: RunStatus.of(info.run, info.steps, info.waits, info.children))


def send_event(run_id: str, event: Any, value: Any, idempotency_key: str | None,
               send_id: str) -> Call[bool]:
    """Send ``event`` (an ``aiki.event`` definition, which encodes ``value`` into its type,
    or an event name, with a JSON-able ``value``) to a run: True if delivered at once.
    The value is encoded here, so a bad one raises at the call site. Without an
    ``idempotency_key``, ``send_id`` (chosen by the client, new for each call) is the key,
    so a request sent again after a lost connection, or delivered twice, stores one event."""
    if idempotency_key is None:
        idempotency_key = f"send:{send_id}"
    if isinstance(event, str):
        name, payload = event, p.encode_value(value, what=f"event {event!r}")
    else:
        name, payload = event.name, event.encode(value)
    return Call(lambda req: p.SendEvent(req, run_id, name, payload, idempotency_key),
                p.EventSent, lambda reply: bool(reply.delivered))


def wakeup(run_id: str) -> Call[bool]:
    """End a run's current ``run.sleep()`` early; False if it was not sleeping."""
    return Call(lambda req: p.Wakeup(req, run_id), p.WokenUp, lambda reply: bool(reply.woken))


DEFAULT_GRACE = 60.0


def cancel(run_id: str, reason: str | None, grace: float | datetime.timedelta) -> Call[bool]:
    """Cancel a run: False, changing nothing, if it had ended already. ``grace`` (seconds or
    a timedelta) is how long its workflow may compensate inside ``run.shield()``; a bad one
    raises ValueError here, with nothing sent."""
    seconds = check_grace(grace)
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"cancel: reason must be a str or None, not {type(reason).__name__}")
    return Call(lambda req: p.CancelRun(req, run_id, reason, seconds), p.CancelAnswer,
                lambda reply: bool(reply.cancelled))


def check_grace(grace: float | datetime.timedelta) -> float:
    if isinstance(grace, datetime.timedelta):
        seconds = grace.total_seconds()
    elif isinstance(grace, (int, float)) and not isinstance(grace, bool):
        seconds = float(grace)
    else:
        raise TypeError(f"cancel: grace takes seconds or a datetime.timedelta, "
                        f"not {type(grace).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cancel: grace must be a finite number of seconds, 0 or more; "
                         f"got {seconds}")
    return seconds



def retry(run_id: str, version: str | None, control_id: str | None = None) -> Call[None]:
    """Queue a failed run again (``aiki.RunNotRetryable`` for one that has not failed).
    ``control_id`` (new for each call) makes the request safe to send again: a retry whose
    reply was lost is answered as done."""
    return Call(lambda req: p.RetryRun(req, run_id, version, control_id), p.Retried,
                lambda reply: None)


def pause(run_id: str, control_id: str | None = None) -> Call[None]:
    """Pause a run at its next step boundary (``aiki.RunNotPausable`` for a finished or
    paused one). ``control_id``: see :func:`retry`."""
    return Call(lambda req: p.PauseRun(req, run_id, control_id), p.Controlled,
                lambda reply: None)


def resume(run_id: str, control_id: str | None = None) -> Call[None]:
    """Resume a paused run (``aiki.RunNotPaused`` for one that is not paused).
    ``control_id``: see :func:`retry`."""
    return Call(lambda req: p.ResumeRun(req, run_id, control_id), p.Controlled,
                lambda reply: None)


def fork(run_id: str, from_step: int, version: str | None, new_run_id: str) -> Call[str]:
    """A new run whose first ``from_step`` steps are copied from ``run_id``'s; its id.
    ``new_run_id`` is chosen here, so the request sent again after a lost connection makes
    one run. A ``from_step`` that is not a whole number >= 0 raises here; one past the end of
    the run's history is :class:`aiki.InvalidFork` from the server."""
    if isinstance(from_step, bool) or not isinstance(from_step, int):
        raise TypeError(f"from_step must be an int (a number of steps), not "
                        f"{type(from_step).__name__}")
    if from_step < 0:
        raise errors.InvalidFork(f"from_step must be 0 or more, got {from_step}; nothing was "
                                 "stored")
    if version is not None and not (isinstance(version, str) and version):
        raise ValueError(f"version must be a non-empty string or None, got {version!r}")
    return Call(lambda req: p.ForkRun(req, run_id, from_step, new_run_id, version),
                p.Controlled, lambda reply: str(reply.run.id))


def get_history(run_id: str) -> Call[tuple[HistoryEvent, ...]]:
    return Call(lambda req: p.GetHistory(req, run_id), p.History, lambda reply: reply.events)


def wait_for_completion(run_id: str, result_type: Any, timeout: float | None) -> Call[Any]:
    """The run's result, decoded into ``result_type``, once it completed; the server pushes
    the end (``RunEnded``), nobody polls. A failed run raises :class:`aiki.WorkflowFailed`,
    a cancelled one :class:`aiki.WorkflowCancelled` (with the reason); ``timeout`` None
    waits as long as it takes."""

    def read(ended: p.RunEnded) -> Any:
        run: RunRecord = ended.run
        if run.state == "cancelled":
            raise errors.WorkflowCancelled(run.id, run.cancel_reason)
        if run.state != "completed":
            raise errors.WorkflowFailed(run.id, run.error_type or run.state,
                                        run.error_message or "", run.error_traceback)
        assert run.result is not None
        return p.decode_value(run.result, result_type, what=f"result of run {run.id}")

    return Call(lambda req: p.WatchRun(req, run_id), p.RunEnded, read,
                timeout=math.inf if timeout is None else timeout,
                late=f"run {run_id} did not finish within {timeout} s")


def list_runs(*, workflow: str | None, state: str | None, limit: int,
              stranded: bool = False) -> Call[list[RunSummary]]:
    """The newest ``limit`` runs (1 to 1000), optionally of one workflow and/or in one state,
    or only the stranded ones (queued for a version no connected worker has registered,
    longer than the server's threshold). Raises ValueError for a state or limit the server
    would refuse."""
    if state is not None and state not in RUN_STATES:
        raise ValueError(f"unknown run state {state!r}; the states are {', '.join(RUN_STATES)}")
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValueError(f"limit must be an int from 1 to 1000, got {limit!r}")
    return Call(lambda req: p.ListRuns(req, workflow, state, limit, stranded), p.RunList,
                lambda reply: [RunSummary.of(run) for run in reply.runs])


PURGE_BATCH = 500  # runs deleted per request: small batches do not stall the store


def purge_cutoff(before: float | datetime.datetime) -> float:
    """``before`` (epoch seconds, or a timezone-aware datetime) as epoch seconds."""
    if isinstance(before, datetime.datetime):
        if before.tzinfo is None:
            raise ValueError("before= must be a timezone-aware datetime (or epoch seconds)")
        return before.timestamp()
    return float(before)


def purge_batch(before: float) -> Call[int]:
    """Delete up to ``PURGE_BATCH`` runs that finished before ``before``; how many were.
    A client repeats it until a batch comes back short."""
    return Call(lambda req: p.PurgeRuns(req, before, PURGE_BATCH), p.Purged,
                lambda reply: int(reply.count))


def list_workers() -> Call[list[p.WorkerInfo]]:
    return Call(p.ListWorkers, p.WorkerList, lambda reply: list(reply.workers))


def stranded_versions() -> Call[list[p.StrandedVersion]]:
    """The workflow versions with stranded runs: queued, and no connected worker has them."""
    return Call(lambda req: p.ListWorkers(req, stranded=True), p.WorkerList,
                lambda reply: list(reply.stranded))


# -- schedules ----------------------------------------------------------------------------------
def seconds_of(value: float | datetime.timedelta, what: str) -> float:
    """A duration given as seconds or a ``timedelta``, as seconds."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise errors.ScheduleInvalid(f"{what} must be seconds or a timedelta, got {value!r}; "
                                 "nothing was stored")


def instant_of(value: float | datetime.datetime, what: str) -> float:
    """An instant given as epoch seconds or a timezone-aware datetime, as epoch seconds."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise errors.ScheduleInvalid(f"{what} must be a timezone-aware datetime (or "
                                         f"epoch seconds), got {value.isoformat()!r}")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise errors.ScheduleInvalid(f"{what} must be a datetime or epoch seconds, got {value!r}")


def define_schedule(
    schedule_id: str, workflow: str, payload: str, *, version: str | None,
    cron: str | None = None, timezone: str = "UTC",
    every: float | datetime.timedelta | None = None, overlap: str = "skip",
    catchup_window: float | datetime.timedelta = 60.0, update: bool = False,
) -> Call[p.ScheduleDefined]:
    """Define the schedule ``schedule_id`` (see ``aiki.Workflow.schedule``). Everything the
    server would refuse is refused here first, with :class:`aiki.ScheduleInvalid` naming
    it; a warning (:class:`aiki.UnservedVersionWarning`) says when no worker has the
    version yet."""
    sch.check_id(schedule_id)
    if (cron is None) == (every is None):
        raise errors.ScheduleInvalid(f"schedule {schedule_id!r}: give either cron= or every= "
                                     "(one of them); nothing was stored")
    tz = sch.check_timezone(timezone).key
    if cron is not None:
        cron = sch.check_cron(cron, tz)
    interval = None if every is None else sch.check_interval(seconds_of(every, "every"))
    sch.check_overlap(overlap)
    window = sch.check_catchup(seconds_of(catchup_window, "catchup_window"))

    def read(reply: p.ScheduleDefined) -> p.ScheduleDefined:
        if reply.warning is not None:
            warnings.warn(f"schedule {schedule_id!r}: {reply.warning}",
                          errors.UnservedVersionWarning, stacklevel=2)
        return reply

    return Call(lambda req: p.DefineSchedule(req, schedule_id, workflow, payload, version,
                                             cron, tz, interval, overlap, window, update),
                p.ScheduleDefined, read)


def describe_schedule(schedule_id: str, *, firings: int = 10) -> Call[ScheduleDescription]:
    """The schedule's definition, next five fire times and its ``firings`` latest
    occurrences (with the state of the runs they started)."""
    if not isinstance(firings, int) or not 0 <= firings <= 1000:
        raise ValueError(f"firings must be an int from 0 to 1000, got {firings!r}")
    return Call(lambda req: p.GetSchedule(req, schedule_id, firings), p.ScheduleInfo,
                lambda info: ScheduleDescription.of(info.schedule, info.next_fire_times,
                                                    info.firings, info.runs))


def change_schedule(schedule_id: str, action: str) -> Call[ScheduleRecord | None]:
    """``pause`` or ``resume`` a schedule (its record after), or ``delete`` it (None)."""
    return Call(lambda req: p.ChangeSchedule(req, schedule_id, action), p.ScheduleChanged,
                lambda reply: reply.schedule)


def delete_schedule(schedule_id: str) -> Call[bool]:
    """Delete a schedule (its runs stay); False if there was none."""
    return Call(lambda req: p.ChangeSchedule(req, schedule_id, "delete"), p.ScheduleChanged,
                lambda reply: bool(reply.existed))


def trigger_schedule(schedule_id: str, trigger_id: str) -> Call[ScheduleOccurrence]:
    """Fire once now, under the overlap policy. ``trigger_id`` (new per call, chosen by the
    client) makes a request sent again fire once."""
    return Call(lambda req: p.TriggerSchedule(req, schedule_id, trigger_id), p.ScheduleFired,
                lambda reply: ScheduleOccurrence.of(reply.firings[0]))


def backfill_schedule(schedule_id: str, start: float | datetime.datetime,
                      end: float | datetime.datetime) -> Call[list[ScheduleOccurrence]]:
    """Every occurrence from ``start`` to ``end`` never handled, under the overlap policy."""
    first, last = instant_of(start, "start"), instant_of(end, "end")
    if first > last:
        raise errors.ScheduleInvalid(f"backfill start {start!r} is after its end {end!r}")
    return Call(lambda req: p.BackfillSchedule(req, schedule_id, first, last),
                p.ScheduleFired,
                lambda reply: [ScheduleOccurrence.of(f) for f in reply.firings])


def list_schedules() -> Call[list[ScheduleSummary]]:
    return Call(p.ListSchedules, p.ScheduleList,
                lambda reply: [ScheduleSummary.of(s) for s in reply.schedules])


def client_hello(node_id: str, token: str | None) -> Callable[[int], p.Hello]:
    return lambda req: p.Hello(req, "client", node_id, token=token)


# -- the connection state ---------------------------------------------------------------------
@attrs.frozen
class Replied:
    """The call ``req`` is done: ``value`` is what it returns."""

    req: int
    value: Any


@attrs.frozen
class Failed:
    """The call ``req`` is done: ``error`` is what it raises."""

    req: int
    error: BaseException


@attrs.frozen
class Welcomed:
    """The connection is open: send ``resend`` (the requests still waiting) on it now."""

    welcome: p.Welcome
    resend: str | None


@attrs.frozen
class Closing:
    """The server ends this connection (a goodbye, or a refused hello): close it, then call
    :meth:`ClientProtocol.lost` with ``error``."""

    error: BaseException


Event = Replied | Failed | Welcomed | Closing


@attrs.define(eq=False)
class ClientProtocol:
    """One client's requests across its connections (see the module docstring).

    A front end's life: ``frame = opened()`` when a connection is up, send it; feed each
    frame received to ``receive`` and act on the events; when the connection is gone, call
    ``lost(error)`` and act on its events; while ``ended`` is None, sleep ``next_delay()``
    and connect again. A caller registers its call with ``request`` (which gives a frame to
    send now, or None while there is no open connection) and waits for the ``Replied`` or
    ``Failed`` event with its ``req``; a caller that stops waiting calls ``abandon``.
    """

    hello: Callable[[int], p.Hello]
    address: str
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    reconnect: Backoff | None = attrs.field(factory=Backoff)
    rng: random.Random = attrs.field(factory=lambda: random.Random(0))
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    welcome: p.Welcome | None = None
    connections: int = 0
    ended: BaseException | None = None
    _open: bool = False
    _hello_req: int | None = None
    _req: int = 0
    _attempt: int = 0
    _calls: dict[int, Call[Any]] = attrs.field(factory=dict)

    @property
    def is_open(self) -> bool:
        """Welcomed on the current connection: requests go out at once."""
        return self._open

    def request(self, call: Call[Any]) -> tuple[int, str | None]:
        """Register ``call``: its ``req``, and the frame to send now (None: it goes out with
        the next welcome). Raises ``ended`` if the client gave up, and ProtocolError for a
        request over the frame limit (nothing is registered then)."""
        if self.ended is not None:
            raise self.ended
        self._req += 1
        req = self._req
        text = p.encode(call.make(req))
        if p.frame_bytes(text) > self.max_frame_bytes:
            raise errors.ProtocolError(
                f"a request of {p.frame_bytes(text)} bytes is over the frame limit of "
                f"{self.max_frame_bytes} bytes; nothing was sent (raise max_frame_bytes on "
                "both sides, or send less)")
        self._calls[req] = call
        return req, text if self._open else None

    def abandon(self, req: int) -> None:
        """The caller of ``req`` stopped waiting (its timeout, or a cancellation)."""
        self._calls.pop(req, None)

    def opened(self) -> str:
        """A new connection is up: the hello to send on it first."""
        self._open = False
        self._req += 1
        self._hello_req = self._req
        return p.encode(self.hello(self._req))

    def receive(self, frame: str | bytes) -> list[Event]:
        """What one frame from the server means."""
        events: list[Event] = []
        for msg in p.decode_frame(frame):
            if isinstance(msg, errors.ProtocolError):
                log.warning("undecodable message from %s: %s", self.address, msg)
            elif isinstance(msg, p.Goodbye):
                events.append(Closing(goodbye_error(msg)))
            elif getattr(msg, "req", None) == self._hello_req and self._hello_req is not None:
                events.append(self._welcomed(msg))
            else:
                events.extend(self._reply(msg))
        return events

    def _welcomed(self, msg: Any) -> Event:
        self._hello_req = None
        try:
            self.welcome = welcome_of(msg, self.address)
        except errors.AikiError as exc:
            return Closing(exc)
        self.connections += 1
        self._open = True
        self._attempt = 0
        waiting = [p.encode(call.make(req)) for req, call in self._calls.items()]
        return Welcomed(self.welcome, p.encode_frame(waiting) if waiting else None)

    def _reply(self, msg: Any) -> list[Event]:
        req = getattr(msg, "req", None)
        call = self._calls.pop(req, None) if isinstance(req, int) else None
        if call is None:
            if isinstance(msg, p.Refused):
                log.warning("server refused a message: %s: %s", msg.error_type, msg.message)
            return []  # a reply to a call abandoned meanwhile, or a push clients ignore
        assert isinstance(req, int)
        try:
            return [Replied(req, call.outcome(msg))]
        except Exception as exc:
            return [Failed(req, exc)]

    def lost(self, error: BaseException) -> list[Event]:
        """The connection is gone (``error`` says why). Requests wait for the next one, unless
        no reconnection can help: then every call fails with the error, and ``ended`` is set."""
        self._open = False
        self._hello_req = None
        if self.ended is not None:
            return []
        if isinstance(error, FATAL):
            return self.end(error)
        if self.welcome is None:  # the first connection never opened: say why, at once
            return self.end(error if isinstance(error, errors.AikiError) else
                            errors.ConnectionLost(f"cannot connect to {self.address}: {error}"))
        if self.reconnect is None:
            return self.end(errors.ConnectionLost(f"the connection to {self.address} is closed"))
        log.warning("lost the connection to %s: %s", self.address, error)
        return []

    def end(self, error: BaseException) -> list[Event]:
        """No more connections (the client closes, or gave up): every call fails."""
        if self.ended is None:
            self.ended = error
        self._open = False
        failed: list[Event] = [Failed(req, self.ended) for req in self._calls]
        self._calls.clear()
        return failed

    def next_delay(self) -> float:
        """Seconds to wait before the next connection attempt (jittered, growing)."""
        assert self.reconnect is not None
        delay = self.reconnect.delay(self._attempt, self.rng)
        self._attempt += 1
        return delay

