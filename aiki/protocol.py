"""The messages that cross a transport, and the one cattrs converter that encodes them.

Every message is a frozen attrs class registered under a type tag; on the wire it is a JSON
object ``{"type": tag, ...fields}``. Requests carry ``req``, a number chosen by the sender,
and every reply echoes it. User payloads travel as JSON text produced by
:func:`encode_value` with the same converter, so a payload is encoded exactly once, at the
call site, and a value that cannot be encoded is refused there.

Version 3 of the protocol. Adding an optional field that an older peer may ignore is
compatible (a newer reader takes an older writer's message); anything else bumps
``PROTOCOL_VERSION``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import json
import math
import pathlib
import typing
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

import attrs
import cattrs
from cattrs.errors import IterableValidationNote

from aiki.errors import PayloadError, ProtocolError
from aiki.protocol_fast import FastCodec
from aiki.records import (
    HistoryEvent,
    Lease,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitFor,
    WaitRecord,
)

# 2: waits (sleeps, events) replace suspend_run. 3: a run may be pushed to its worker
# before its lease commits (``Assign.provisional``, ``Confirm``): a worker of version 2 would
# run it at once, so the versions must match. 4: a worker sends a task's start under such a
# lease before it hears the verdict, naming the push (``Assign.push_id``,
# ``StartStep.push_id``): a version 3 peer would refuse the fields.
PROTOCOL_VERSION = 4

converter = cattrs.Converter(forbid_extra_keys=True)


# Strict primitives: JSON of the wrong type is refused, never coerced ("7" is not 7, null
# is not "None", 1.5 is not 1, "abc" is not a tuple of characters).
def _strict(kind: type, accept: Callable[[Any], bool]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, target: Any) -> Any:
        if target is not kind and isinstance(target, type) and issubclass(target, enum.Enum):
            return _enum_hook(target)(value, target)  # an IntEnum or StrEnum: not a plain int
        if not accept(value):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return kind(value)

    return structure


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


converter.register_structure_hook(
    int, _strict(int, lambda v: isinstance(v, int) and not isinstance(v, bool)))
converter.register_structure_hook(float, _strict(float, _is_number))
converter.register_structure_hook(str, _strict(str, lambda v: isinstance(v, str)))
converter.register_structure_hook(bool, _strict(bool, lambda v: isinstance(v, bool)))


# Values users pass every day, as JSON strings, parsed back strictly: only a string of the
# right form is accepted (a number is not a Decimal, a naive time is not a datetime).
def _from_string(kind: type, parse: Callable[[str], Any]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"expected {kind.__name__} as a string, got "
                            f"{type(value).__name__} {value!r}")
        return parse(value)

    return structure


def _aware(d: datetime.datetime) -> datetime.datetime:
    if d.tzinfo is None or d.utcoffset() is None:
        raise ValueError(f"datetime {d.isoformat()!r} has no timezone: give it one, e.g. "
                         "datetime.now(timezone.utc), so every machine reads the same instant")
    return d


def _date_only(d: datetime.date) -> str:
    if isinstance(d, datetime.datetime):
        raise TypeError(f"expected a date, got a datetime {d.isoformat()!r}")
    return d.isoformat()


def _decimal(text: str) -> decimal.Decimal:
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None


converter.register_unstructure_hook(uuid.UUID, str)
converter.register_structure_hook(uuid.UUID, _from_string(uuid.UUID, uuid.UUID))
converter.register_unstructure_hook(decimal.Decimal, str)
converter.register_structure_hook(decimal.Decimal, _from_string(decimal.Decimal, _decimal))
converter.register_unstructure_hook(datetime.datetime, lambda d: _aware(d).isoformat())
converter.register_structure_hook(datetime.datetime, _from_string(
    datetime.datetime, lambda v: _aware(datetime.datetime.fromisoformat(v))))
converter.register_unstructure_hook(datetime.date, _date_only)
converter.register_structure_hook(datetime.date, _from_string(
    datetime.date, datetime.date.fromisoformat))
def _enum_hook(kind: type[enum.Enum]) -> Callable[[Any, Any], Any]:
    """An enum from its member's value, of the value's own JSON type (``"2"`` is not 2)."""
    value_types = {type(member.value) for member in kind}

    def structure(value: Any, _: Any) -> Any:
        if type(value) not in value_types:
            raise TypeError(f"expected a {kind.__name__} value, got {type(value).__name__} "
                            f"{value!r}")
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid {kind.__name__}") from None

    return structure


converter.register_unstructure_hook(enum.Enum, lambda member: member.value)
converter.register_structure_hook_factory(
    lambda t: isinstance(t, type) and issubclass(t, enum.Enum), _enum_hook)
converter.register_unstructure_hook(pathlib.PurePath, str)
for _path in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
              pathlib.PosixPath, pathlib.WindowsPath):
    converter.register_structure_hook(_path, _from_string(_path, _path))


def _is_collection(t: Any) -> bool:
    origin = typing.get_origin(t) or t
    return origin in (list, tuple, set, frozenset, collections.abc.Sequence,
                      collections.abc.MutableSequence, collections.abc.Set)


def _collection_hook(t: Any) -> Callable[[Any, Any], Any]:
    """Lists, tuples and sets come only from JSON arrays (a string is not a sequence)."""
    origin = typing.get_origin(t) or t
    args = typing.get_args(t)
    make: Callable[[Any], Any] = {
        tuple: tuple, set: set, frozenset: frozenset, collections.abc.Set: frozenset,
    }.get(origin, list)

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError(f"expected a JSON array, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} items, got {len(value)}")
            return tuple(converter.structure(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        if item is Any:
            return make(value)
        out, errors = [], []
        for i, v in enumerate(value):
            try:
                out.append(converter.structure(v, item))
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(
                    f"Structuring {t} @ index {i}", i, item)]
                errors.append(exc)
        if errors:
            raise cattrs.IterableValidationError(f"While structuring {t!r}", errors, t)
        return make(out)

    return structure


converter.register_structure_hook_factory(_is_collection, _collection_hook)


_MESSAGES: dict[str, type[Any]] = {}
M = TypeVar("M")


def message(tag: str) -> Callable[[type[M]], type[M]]:
    """Class decorator (above ``@attrs.frozen``): register a message under ``tag``."""

    def register(cls: type[M]) -> type[M]:
        if not attrs.has(cast(type, cls)):
            raise TypeError(f"message {cls.__name__} must be an attrs class")
        if tag in _MESSAGES:
            raise RuntimeError(f"message tag {tag!r} registered twice")
        _MESSAGES[tag] = cls
        cls.TAG = tag  # type: ignore[attr-defined]
        return cls

    return register


@attrs.frozen
class WorkflowRef:
    name: str
    version: str
    events: tuple[str, ...] = ()  # the events the version declares (sends are checked)


# -- session opening -----------------------------------------------------------------------
@message("hello")
@attrs.frozen
class Hello:
    """First message of every connection. A worker lists the workflow versions it runs,
    how many runs it takes at once, and the leases it still holds (after a reconnect)."""

    req: int
    role: Literal["client", "worker"]
    node_id: str
    workflows: tuple[WorkflowRef, ...] = ()
    slots: int = 0
    held: tuple[Lease, ...] = ()
    token: str | None = None
    protocol: int = PROTOCOL_VERSION
    # A worker's process: random per Worker, the same across its reconnections, so the
    # server can tell a reconnection (takes over the id) from a second process (refused).
    incarnation: str | None = None


@message("welcome")
@attrs.frozen
class Welcome:
    req: int
    server_id: str
    lease_ttl: float
    heartbeat_interval: float
    # The server's wall clock as it sent this (durable deadlines are kept on it: see
    # aiki.actors.server_time); None from a server that does not say.
    server_time: float | None = None


# -- generic replies -----------------------------------------------------------------------
@message("ok")
@attrs.frozen
class Ok:
    req: int


@message("refused")
@attrs.frozen
class Refused:
    """A request was refused; ``error_type`` names the aiki error class (e.g. StaleLease)."""

    req: int
    error_type: str
    message: str


# -- clients -------------------------------------------------------------------------------
@message("enqueue")
@attrs.frozen
class Enqueue:
    """Start a run. Without ``version`` the server picks the newest version a worker
    registered, and refuses a name no worker registered."""

    req: int
    workflow: str
    payload: str
    version: str | None = None
    idempotency_key: str | None = None
    # Chosen by the client, so that a retried or duplicated enqueue cannot create a second
    # run: the store keeps the first run with this id.
    run_id: str | None = None
    # The key names a run of another payload: "raise" (IdempotencyConflict) or
    # "return_existing".
    on_conflict: str = "raise"
    # The enqueuing code's W3C trace context ({"traceparent": ..., "tracestate": ...}), so
    # the run's spans join its trace (aiki.tracing); None without OpenTelemetry.
    trace_context: dict[str, str] | None = None


@message("enqueued")
@attrs.frozen
class Enqueued:
    req: int
    run_id: str
    version: str
    created: bool


@message("get_run")
@attrs.frozen
class GetRun:
    req: int
    run_id: str


@message("run_info")
@attrs.frozen
class RunInfo:
    req: int
    run: RunRecord
    steps: tuple[StepRecord, ...]
    waits: tuple[WaitRecord, ...] = ()
    children: tuple[RunRecord, ...] = ()  # the child runs it started


@message("get_history")
@attrs.frozen
class GetHistory:
    req: int
    run_id: str


@message("history")
@attrs.frozen
class History:
    req: int
    events: tuple[HistoryEvent, ...]


@message("watch_run")
@attrs.frozen
class WatchRun:
    """Ask to be told when a run ends; answered by ``RunEnded`` with the same ``req``."""

    req: int
    run_id: str


@message("run_ended")
@attrs.frozen
class RunEnded:
    req: int
    run: RunRecord


# -- workers -------------------------------------------------------------------------------
@message("assign")
@attrs.frozen
class Assign:
    """Server → worker: run this run under ``run.lease_epoch``; ``steps`` are its checkpoints.

    ``provisional``: pushed while the claim that grants the lease commits (an enqueue's own
    claim of an idle worker's slot): run the workflow's code up to its first write or task
    body, and go no further until the server says the lease is committed (``Confirm``) or
    not (``Revoke``). Its actor writes nothing before: a lease not committed may be granted
    later, under the same epoch, to the same worker. But a task's start goes at once, naming
    this push (``push_id``, unique in the server's process; see ``StartStep``)."""

    run: RunRecord
    steps: tuple[StepRecord, ...]
    provisional: bool = False
    push_id: int = 0


@message("confirm")
@attrs.frozen
class Confirm:
    """Server → worker: the lease of a provisional ``Assign`` (``run_id``, ``epoch``) is
    committed: its run goes on."""

    run_id: str
    epoch: int


@message("heartbeat")
@attrs.frozen
class Heartbeat:
    """Renew these leases; the reply lists the ones that are lost."""

    req: int
    leases: tuple[Lease, ...]


@message("heartbeat_ack")
@attrs.frozen
class HeartbeatAck:
    req: int
    lost: tuple[str, ...]
    server_time: float | None = None  # as in Welcome


@message("start_step")
@attrs.frozen
class StartStep:
    """Worker → server: record a task's start (fenced: its body runs once this commits).

    ``push_id``: sent early, under the lease of the provisional push of that id
    (``Assign.push_id``), before the worker heard whether it was committed. The server
    holds it until its own verdict on that push, and applies it only if the claim committed
    that very lease (it pushed ``Confirm``); else it refuses it as a stale lease, for good,
    even should the same lease be pushed again and granted."""

    req: int
    lease: Lease
    step: StepRecord
    # Completed task outcomes of the same run, committed first in the same transaction.
    saved: tuple[StepRecord, ...] = ()
    push_id: int = 0


@message("save_step")
@attrs.frozen
class SaveStep:
    req: int
    lease: Lease
    step: StepRecord
    # Completed task outcomes of the same run, committed first in the same transaction.
    saved: tuple[StepRecord, ...] = ()


@message("complete_run")
@attrs.frozen
class CompleteRun:
    req: int
    lease: Lease
    result: str
    # Completed task outcomes of the same run, committed first in the same transaction.
    saved: tuple[StepRecord, ...] = ()


@message("fail_run")
@attrs.frozen
class FailRun:
    req: int
    lease: Lease
    error_type: str
    error_message: str
    traceback: str | None = None


@message("await_step")
@attrs.frozen
class AwaitStep:
    """A sleep or event wait reached (fenced); answered by ``StepResult``: the step as
    stored, final if it ended (now or before), else waiting."""

    req: int
    lease: Lease
    step: StepRecord


@message("start_child")
@attrs.frozen
class StartChild:
    """A parent's ``start_child`` step (fenced by its lease): the child run ``child_id`` is
    queued with the step recorded; answered by ``StepResult`` (the step as stored)."""

    req: int
    lease: Lease
    step: StepRecord
    child_id: str
    workflow: str
    version: str
    payload: str
    detached: bool = False


@message("abandon_steps")
@attrs.frozen
class AbandonSteps:
    """The deadline scope these steps stood in expired (fenced): the ones not final end
    failed with ``DeadlineExceeded``; answered by ``Ok``."""

    req: int
    lease: Lease
    positions: tuple[str, ...]
    scope: str
    # Task starts and waits' first asks (AwaitStep) the scope cut while they were on their
    # way (not known to be stored).
    starts: tuple[StepRecord, ...] = ()
    # The position the code after the scope was to take next, in the branch that opened it
    # (``aiki.records.deadline_after``): None from a worker that does not say.
    after: str | None = None


@message("step_result")
@attrs.frozen
class StepResult:
    req: int
    step: StepRecord


@message("wait_run")
@attrs.frozen
class WaitRun:
    """Give the run back until one of ``conditions`` holds (a sleep or retry delay comes
    due, an event arrives, an event wait times out)."""

    req: int
    lease: Lease
    conditions: tuple[WaitFor, ...]
    reason: str


@message("nudge")
@attrs.frozen
class Nudge:
    """Server → worker: a wait of this run you hold ended (a wakeup, a delivered event);
    ask again where it stands."""

    run_id: str


@message("release_run")
@attrs.frozen
class ReleaseRun:
    """Give the run back. ``paused``: because a client paused it (else the worker drains,
    and the server sends it no more runs)."""

    req: int
    lease: Lease
    paused: bool = False


@message("drain")
@attrs.frozen
class Drain:
    """Worker → server: this worker is shutting down; assign it no more runs."""

    req: int


# -- run controls from clients ------------------------------------------------------------
@message("send_event")
@attrs.frozen
class SendEvent:
    """Send event ``event`` (``payload``: JSON text) to a run; answered by ``EventSent``."""

    req: int
    run_id: str
    event: str
    payload: str
    idempotency_key: str | None = None


@message("event_sent")
@attrs.frozen
class EventSent:
    req: int
    delivered: bool  # to a waiting wait at once (else buffered for the next one)
    duplicate: bool  # the idempotency key was used already: nothing was stored


@message("retry_run")
@attrs.frozen
class RetryRun:
    """Queue a failed run again, re-pinned to ``version`` if given; answered by ``Retried``."""

    req: int
    run_id: str
    version: str | None = None
    # The client's id of this call: the same request sent again (its reply lost) is answered
    # as done instead of refused.
    control_id: str | None = None


@message("retried")
@attrs.frozen
class Retried:
    req: int
    run: RunRecord


@message("pause_run")
@attrs.frozen
class PauseRun:
    """Pause a run at its next step boundary; answered by ``Controlled``. ``control_id``:
    see ``RetryRun``."""

    req: int
    run_id: str
    control_id: str | None = None


@message("resume_run")
@attrs.frozen
class ResumeRun:
    """Resume a paused run; answered by ``Controlled``. ``control_id``: see ``RetryRun``."""

    req: int
    run_id: str
    control_id: str | None = None


@message("fork_run")
@attrs.frozen
class ForkRun:
    """A new run ``new_run_id`` (chosen by the client, so a retried request makes one run)
    whose first ``from_step`` steps are copied from run ``run_id``; answered by
    ``Controlled`` with the new run."""

    req: int
    run_id: str
    from_step: int
    new_run_id: str
    version: str | None = None


@message("controlled")
@attrs.frozen
class Controlled:
    """The run as a control left it (paused, resumed, or the new run of a fork)."""

    req: int
    run: RunRecord


@message("run_control")
@attrs.frozen
class RunControl:
    """Server → worker: a client controlled a run you hold under lease ``epoch``. ``pause``:
    no new step starts; let the task in flight finish and record it, then give the run back
    (``ReleaseRun``, or ``WaitRun`` if it waits). A hint: the store refuses the next step of
    a paused run all the same (``RunPaused``)."""

    run_id: str
    epoch: int
    action: Literal["pause"] = "pause"


@message("wakeup")
@attrs.frozen
class Wakeup:
    """End a run's current sleep early; answered by ``WokenUp``."""

    req: int
    run_id: str


@message("woken_up")
@attrs.frozen
class WokenUp:
    req: int
    woken: bool  # False: the run was not sleeping, and nothing changed


@message("cancel_run")
@attrs.frozen
class CancelRun:
    """Cancel a run, its workflow given ``grace`` seconds to compensate; answered by
    ``CancelAnswer``."""

    req: int
    run_id: str
    reason: str | None = None
    grace: float = 60.0


@message("cancel_answer")
@attrs.frozen
class CancelAnswer:
    req: int
    cancelled: bool  # False: the run had ended already, and nothing changed


@message("revoke")
@attrs.frozen
class Revoke:
    """Server → worker: the lease you hold on this run is revoked (it was cancelled): stop
    its workflow and its tasks now, and write nothing more under that lease. ``epoch``: the
    lease epoch revoked, when known (relayed from another server): a newer lease of the run
    (its compensation) is not touched."""

    run_id: str
    reason: str | None = None
    epoch: int | None = None


@message("purge_runs")
@attrs.frozen
class PurgeRuns:
    """Delete up to ``limit`` runs that finished before ``before`` (epoch seconds), oldest
    first; answered by ``Purged``."""

    req: int
    before: float
    limit: int = 500


@message("purged")
@attrs.frozen
class Purged:
    req: int
    count: int


# -- listings ------------------------------------------------------------------------------
@message("list_runs")
@attrs.frozen
class ListRuns:
    """The newest runs, optionally only of one workflow and/or in one state."""

    req: int
    workflow: str | None = None
    state: str | None = None
    limit: int = 100
    # Only queued runs stranded: of a version no connected worker has registered, queued
    # longer than the server's threshold.
    stranded: bool = False


@message("run_list")
@attrs.frozen
class RunList:
    req: int
    runs: tuple[RunRecord, ...]


@attrs.frozen
class WorkerInfo:
    """A connected worker as the server sees it. Times are epoch seconds."""

    id: str
    workflows: tuple[WorkflowRef, ...]
    slots: int
    in_use: int
    connected_at: float
    last_heartbeat: float | None
    draining: bool = False


@message("list_workers")
@attrs.frozen
class ListWorkers:
    req: int
    stranded: bool = False  # also the versions with stranded runs (one store read)


@message("worker_list")
@attrs.frozen
class WorkerList:
    req: int
    workers: tuple[WorkerInfo, ...]
    stranded: tuple[StrandedVersion, ...] = ()


@attrs.frozen
class StrandedVersion:
    """Queued runs of a workflow version that no connected worker has registered, the
    oldest queued since ``since`` (epoch seconds)."""

    workflow: str
    version: str
    runs: int
    since: float


# -- schedules -----------------------------------------------------------------------------
@message("define_schedule")
@attrs.frozen
class DefineSchedule:
    """Create (or find, or with ``update`` replace) the schedule ``id``: start ``workflow``
    (``version``: None, the newest a worker registered) with ``payload`` (JSON text) on
    ``cron`` in ``timezone``, or ``every`` seconds. Answered by ``ScheduleDefined``."""

    req: int
    id: str
    workflow: str
    payload: str
    version: str | None = None
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    overlap: str = "skip"
    catchup_window: float = 60.0
    update: bool = False


@message("schedule_defined")
@attrs.frozen
class ScheduleDefined:
    req: int
    schedule: ScheduleRecord
    created: bool
    updated: bool
    warning: str | None = None  # e.g. no worker has registered its version (yet)


@message("get_schedule")
@attrs.frozen
class GetSchedule:
    """A schedule, its next ``upcoming`` fire times and its newest ``firings``; answered by
    ``ScheduleInfo``."""

    req: int
    id: str
    firings: int = 10
    upcoming: int = 5


@message("schedule_info")
@attrs.frozen
class ScheduleInfo:
    req: int
    schedule: ScheduleRecord
    next_fire_times: tuple[float, ...]
    firings: tuple[ScheduleFiring, ...]
    runs: tuple[RunRecord, ...]  # the runs the firings started, where they still exist


@message("change_schedule")
@attrs.frozen
class ChangeSchedule:
    """``pause``, ``resume`` or ``delete`` a schedule; answered by ``ScheduleChanged``."""

    req: int
    id: str
    action: str


@message("schedule_changed")
@attrs.frozen
class ScheduleChanged:
    req: int
    schedule: ScheduleRecord | None  # None once deleted
    existed: bool = True


@message("trigger_schedule")
@attrs.frozen
class TriggerSchedule:
    """Fire a schedule once now (``trigger_id``, chosen by the client: a request sent again
    fires once); answered by ``ScheduleFired``."""

    req: int
    id: str
    trigger_id: str


@message("backfill_schedule")
@attrs.frozen
class BackfillSchedule:
    """Every occurrence of a schedule in ``[start, end]`` (epoch seconds) never handled, by
    its overlap policy; answered by ``ScheduleFired``."""

    req: int
    id: str
    start: float
    end: float


@message("schedule_fired")
@attrs.frozen
class ScheduleFired:
    req: int
    firings: tuple[ScheduleFiring, ...]


@message("list_schedules")
@attrs.frozen
class ListSchedules:
    req: int


@message("schedule_list")
@attrs.frozen
class ScheduleList:
    req: int
    schedules: tuple[ScheduleRecord, ...]


@message("goodbye")
@attrs.frozen
class Goodbye:
    """Either side is closing the connection, and why. ``error_type`` names the aiki error
    when the close is a refusal that retrying will not fix (``AuthenticationFailed``,
    ``ProtocolError``); None when the peer may simply connect again (a shutdown)."""

    reason: str
    error_type: str | None = None


def message_types() -> dict[str, type[Any]]:
    """Every registered message class by tag (a copy)."""
    return dict(_MESSAGES)


# -- the wire codec ------------------------------------------------------------------------
def to_wire(msg: Any) -> dict[str, Any]:
    tag = getattr(type(msg), "TAG", None)
    if tag is None or _MESSAGES.get(tag) is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a protocol message")
    body: dict[str, Any] = converter.unstructure(msg)
    body["type"] = tag
    return body


def from_wire(obj: Any) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(obj).__name__}")
    fields = dict(obj)
    tag = fields.pop("type", None)
    if not isinstance(tag, str):
        raise ProtocolError("message has no 'type' string")
    cls = _MESSAGES.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    try:
        return converter.structure(fields, cls)
    except RecursionError:
        raise ProtocolError(f"malformed {tag!r} message: nested too deeply") from None
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed {tag!r} message: {_describe(exc)}") from exc


# The codec's JSON encoders and decoder, made once: json.dumps and json.loads with any
# option build a new encoder or decoder per call, a few microseconds each on the hot path.
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_STRICT = json.JSONDecoder(parse_constant=_refuse_constant)


def _loads(text: str | bytes) -> Any:
    """``json.loads(text, parse_constant=_refuse_constant)``, with the decoder made once."""
    if isinstance(text, str) and not text.startswith("\ufeff"):
        return _STRICT.decode(text)
    return json.loads(text, parse_constant=_refuse_constant)  # bytes, or a BOM to refuse


def encode(msg: Any) -> str:
    """One message as compact JSON text."""
    fast = _fast().encode(msg)
    if fast is not None:
        return fast
    try:
        return _COMPACT.encode(to_wire(msg))
    except ValueError as exc:  # NaN or infinity in a float field
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def decode(text: str | bytes) -> Any:
    """A message from JSON text; :class:`ProtocolError` names what is wrong with it."""
    fast = _fast().decode(text)
    if fast is not None:
        return fast
    return _decode_strictly(text)


def _decode_strictly(text: str | bytes) -> Any:
    """:func:`decode` through the cattrs converter alone: the judge of what the fast path
    refuses, and the one that says what is wrong."""
    try:
        obj = _loads(text)
    except RecursionError:
        raise ProtocolError("message is nested too deeply to decode") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from exc
    return from_wire(obj)


def decode_frame(text: str | bytes) -> list[Any]:
    """The messages of one frame: a JSON object is one message, a JSON array a batch.

    Each item of the result is a message, or the :class:`ProtocolError` that says why that
    item does not decode; one bad item does not spoil the others of its batch.
    """
    fast = _fast().decode_frame(text)
    if fast is None:
        return _decode_frame_strictly(text)
    for i, item in enumerate(fast):
        if type(item) is bytes:  # an item the fast path refused: the converter decides
            try:
                fast[i] = _decode_strictly(item)
            except ProtocolError as exc:
                fast[i] = exc
    return fast


def _decode_frame_strictly(text: str | bytes) -> list[Any]:
    """:func:`decode_frame` through the cattrs converter alone."""
    try:
        obj = _loads(text)
    except RecursionError:
        return [ProtocolError("frame is nested too deeply to decode")]
    except (ValueError, UnicodeDecodeError) as exc:
        return [ProtocolError(f"frame is not valid JSON: {exc}")]
    if not isinstance(obj, list):
        obj = [obj]
    elif not obj:
        return [ProtocolError("frame is an empty batch: a batch is a JSON array of messages")]
    out: list[Any] = []
    for item in obj:
        try:
            out.append(from_wire(item))
        except ProtocolError as exc:
            out.append(exc)
    return out


def frame_bytes(text: str) -> int:
    """The bytes ``text`` from :func:`encode` takes in a text frame: the codec writes
    non-ASCII characters as UTF-8, not as ``\\u`` escapes, so a character may take up to
    four. Its length when it is ASCII (a check that costs nothing)."""
    return len(text) if text.isascii() else len(text.encode())


def encode_frame(encoded: list[str]) -> str:
    """One frame of messages already encoded by :func:`encode`: the message itself when it
    is alone, else a JSON array of them."""
    if len(encoded) == 1:
        return encoded[0]
    return "[" + ",".join(encoded) + "]"


@functools.cache
def _fast() -> FastCodec:
    """The fast codec (:mod:`aiki.protocol_fast`), built at first use, once every message
    class is registered."""
    return FastCodec(_MESSAGES)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        notes = cattrs.transform_error(exc)
        return "; ".join(notes) if notes else str(exc)
    return f"{type(exc).__name__}: {exc}"


# -- user payloads -------------------------------------------------------------------------
def encode_value(value: Any, annotation: Any = Any, *, what: str = "payload") -> str:
    """``value`` as canonical JSON text (sorted keys), typed by ``annotation``.

    A typed value is decoded back into ``annotation`` before it is accepted, so what the
    worker would refuse later (``"abc"`` for an ``int``) is refused here, with nothing stored.
    Raises :class:`PayloadError` (a TypeError) naming ``what`` and the offending type.
    """
    if annotation in _PLAIN and type(value) is annotation:  # (the converter is the identity)
        return _CANONICAL.encode(value)
    if (isinstance(annotation, type) and annotation not in (Any, float)  # 3 is a float
            and not typing.get_args(annotation) and not isinstance(value, annotation)):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise PayloadError(
            f"{what} does not match its annotation {annotation.__name__}: expected "
            f"{annotation.__name__}, got {type(value).__name__} {shown}"
        )
    try:
        typed = not (annotation is Any or annotation is None or annotation is type(None))
        if typed:
            plain = converter.unstructure(value, unstructure_as=annotation)
        else:
            plain = _unstructure_plain(value)
        text = _CANONICAL.encode(plain)
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise PayloadError(
            f"cannot encode {what} of type {type(value).__name__} to JSON: {exc}. "
            "Use attrs classes, dataclasses, str, int, float, bool, None, lists, dicts with "
            "string keys, UUID, Decimal, timezone-aware datetime, date, enums and paths."
        ) from exc
    if typed:
        try:
            converter.structure(json.loads(text), annotation)  # as the worker will
        except (cattrs.BaseValidationError, ValueError, TypeError, KeyError,
                AttributeError, RecursionError) as exc:
            raise PayloadError(
                f"{what} does not match its annotation "
                f"{_type_name(annotation)}: {_describe(exc)}"
            ) from exc
    return text


_PLAIN = (str, int, bool)  # (not float: its NaN and infinities need the converter's refusal)


def _unstructure_plain(value: Any) -> Any:
    if attrs.has(type(value)) or dataclasses.is_dataclass(value):
        return converter.unstructure(value)
    if isinstance(value, (list, tuple)):
        return [_unstructure_plain(v) for v in value]
    if isinstance(value, dict):
        return {_key(k): _unstructure_plain(v) for k, v in value.items()}
    return converter.unstructure(value)


def _key(k: Any) -> str:
    if not isinstance(k, str):
        raise TypeError(f"dict keys must be str, got {type(k).__name__}")
    return k


def decode_value(text: str, annotation: Any = Any, *, what: str = "payload") -> Any:
    """JSON text back into ``annotation`` (an attrs class, dataclass, primitive, list, dict)."""
    try:
        plain = _loads(text)
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to decode") from None
    except ValueError as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from exc
    if annotation is Any or annotation is None or annotation is type(None):
        return plain
    try:
        return converter.structure(plain, annotation)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PayloadError(
            f"cannot decode {what} into {_type_name(annotation)}: "
            f"{_describe(exc)}"
        ) from exc


def _type_name(annotation: Any) -> str:
    """``int``, ``Order``, ``list[int]``: an annotation as its reader wrote it."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def content_hash(name: str, encoded_input: str) -> str:
    """The content address of a step: a hash of its name and canonical input."""
    digest = hashlib.sha256(name.encode() + b"\x00" + encoded_input.encode())
    return digest.hexdigest()[:32]
