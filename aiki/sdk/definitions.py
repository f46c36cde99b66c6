"""``@aiki.task`` and ``@aiki.workflow``: typed, named, versioned definitions."""

from __future__ import annotations

import datetime
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import attrs

from aiki.actors.run import WorkflowRun, check_duration
from aiki.errors import EventTimeout
from aiki.protocol import decode_value, encode_value
from aiki.retry import Retry
from aiki.task_styles import Style, run_body

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from aiki import asyncio as aio
    from aiki import sync
    from aiki.sdk.client import Client, RunHandle, Schedule

P = TypeVar("P")
R = TypeVar("R")


def _types(fn: Callable[..., Any], payload_index: int, kind: str) -> tuple[Any, Any]:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != payload_index + 1:
        expected = "(payload)" if kind == "task" else "(run, payload)"
        raise TypeError(
            f"@aiki.{kind} function {fn.__qualname__} must take {expected}, "
            f"it takes {len(params)} parameter(s)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to untyped JSON
        hints = {}
    return hints.get(params[payload_index].name, Any), hints.get("return", Any)


@attrs.frozen
class Task(Generic[P, R]):
    """A unit of work whose result is checkpointed. Call it from workflow code with
    ``await my_task.run(run, payload)``."""

    name: str
    fn: Callable[[P], Awaitable[R]] | Callable[[P], R]
    retry: Retry
    timeout: float | None
    payload_type: Any
    result_type: Any
    #: "trio" (``async def``), "thread" (a plain ``def``) or "asyncio"; see aiki.task_styles.
    style: Style = "trio"

    async def run(self, run: WorkflowRun, payload: P, *, idempotency_key: str | None = None) -> R:
        """Execute durably: the recorded result on replay, else run it (with retries),
        checkpoint the result, and return it. Failure for good raises ``aiki.TaskFailed``."""
        if not isinstance(run, WorkflowRun):
            raise TypeError(
                f"task {self.name!r}: the first argument of .run() must be the workflow's "
                f"aiki.WorkflowRun, got {type(run).__name__}"
            )
        return await run._execute_task(self, payload, idempotency_key)  # type: ignore[no-any-return]

    async def call(self, payload: Any) -> Any:
        """One attempt of the body, in its style, within ``timeout``."""
        if self.timeout is None:
            return await run_body(self.style, self.fn, payload)
        import trio

        with trio.fail_after(self.timeout):
            return await run_body(self.style, self.fn, payload)


@attrs.frozen
class Workflow(Generic[P, R]):
    """A named, versioned workflow. Start a run with ``await wf.enqueue(client, payload)``."""

    name: str
    version: str
    fn: Callable[[WorkflowRun, P], Awaitable[R]]
    payload_type: Any
    result_type: Any
    events: tuple[str, ...] = ()  # the names of the events it declares

    @overload
    def enqueue(self, client: sync.Client, payload: P, *, idempotency_key: str | None = None,
                on_conflict: str = "raise") -> sync.RunHandle[R]: ...

    @overload
    def enqueue(self, client: Client | aio.Client, payload: P, *,
                idempotency_key: str | None = None,
                on_conflict: str = "raise") -> Coroutine[Any, Any, RunHandle[R]]: ...

    def enqueue(self, client: Any, payload: P, *, idempotency_key: str | None = None,
                on_conflict: str = "raise") -> Any:
        """Start a run (or find the one with this idempotency key) and return its handle:
        ``await wf.enqueue(client, payload)`` with the Trio (``aiki.connect``,
        ``aiki.embedded``) or asyncio (``aiki.asyncio.connect``) client,
        ``wf.enqueue(client, payload)`` with the blocking one (``aiki.sync.connect``).

        An unencodable payload raises TypeError here, at the call, and stores nothing. A
        key that names a run of another payload raises ``aiki.IdempotencyConflict``, or
        returns that run with ``on_conflict="return_existing"``.
        """
        encoded = encode_value(payload, self.payload_type,
                               what=f"payload of workflow {self.name!r}")
        return client._enqueue(self.name, encoded, version=self.version,
                               idempotency_key=idempotency_key, result_type=self.result_type,
                               on_conflict=on_conflict)

    @overload
    def schedule(self, client: sync.Client, payload: P, *, id: str, cron: str | None = None,
                 timezone: str = "UTC", every: float | datetime.timedelta | None = None,
                 overlap: str = "skip",
                 catchup_window: float | datetime.timedelta = datetime.timedelta(minutes=1),
                 update: bool = False) -> sync.Schedule: ...

    @overload
    def schedule(self, client: Client | aio.Client, payload: P, *, id: str,
                 cron: str | None = None, timezone: str = "UTC",
                 every: float | datetime.timedelta | None = None, overlap: str = "skip",
                 catchup_window: float | datetime.timedelta = datetime.timedelta(minutes=1),
                 update: bool = False) -> Coroutine[Any, Any, Schedule]: ...

    def schedule(self, client: Any, payload: P, *, id: str, cron: str | None = None,
                 timezone: str = "UTC", every: float | datetime.timedelta | None = None,
                 overlap: str = "skip",
                 catchup_window: float | datetime.timedelta = datetime.timedelta(minutes=1),
                 update: bool = False) -> Any:
        """Start a run of this version with ``payload`` on a schedule, and return its
        handle (``await`` it with the Trio and asyncio clients).

        ``cron`` (five fields, in ``timezone``, an IANA name) or ``every`` (seconds or a
        ``timedelta``; occurrences at multiples of it since the Unix epoch). ``overlap``, for
        an occurrence that comes while the previous run is unfinished: ``"skip"`` it (the
        default), ``"buffer_one"`` (it starts when the previous one ends; at most one
        waits), ``"allow"`` (it starts alongside). Occurrences missed while no server was up
        fire on start-up if they are within ``catchup_window``; older ones are recorded as
        skipped. Each occurrence starts at most one run, whatever restarts or servers: its
        idempotency key is the schedule id and the occurrence's time.

        The same ``id`` with the same definition returns the existing schedule; another
        definition raises ``aiki.ScheduleConflict`` unless ``update=True``. Refused here,
        with nothing stored (``aiki.ScheduleInvalid``, a ValueError): an invalid cron
        expression (naming the bad field), an unknown time zone, an interval not above
        zero; an unencodable payload raises ``aiki.PayloadError`` (a TypeError). A version
        no connected worker has registered only warns (``aiki.UnservedVersionWarning``).
        """
        encoded = encode_value(payload, self.payload_type,
                               what=f"payload of workflow {self.name!r}")
        return client._schedule(self.name, encoded, id=id, version=self.version, cron=cron,
                                timezone=timezone, every=every, overlap=overlap,
                                catchup_window=catchup_window, update=update)

    async def execute(self, run: WorkflowRun, payload: Any) -> Any:
        """Run the workflow's function (the engine calls it, on replay too)."""
        return await self.fn(run, payload)

    async def start_child(self, run: WorkflowRun, payload: P, *,
                          idempotency_key: str | None = None,
                          detached: bool = False) -> ChildRun[R]:
        """Start a run of this workflow as a child of ``run``, a step of it: a replay gets
        the same child. Its address is this workflow, its version, and ``idempotency_key``
        (or the payload's hash). The child runs on any worker with its version. Unless
        ``detached``, ``run`` does not end before the child does: when its function
        returns it waits for the child, and when it fails or is cancelled it cancels the
        child (and the child's children) first. A bad payload raises TypeError here."""
        if not isinstance(run, WorkflowRun):
            raise TypeError(f"workflow {self.name!r}: start_child() takes the parent's "
                            f"aiki.WorkflowRun first, got {type(run).__name__}; a child is "
                            "started from inside a workflow")
        encoded = encode_value(payload, self.payload_type,
                               what=f"payload of child workflow {self.name!r}")
        child_id = await run._start_child(self.name, self.version, encoded, idempotency_key,
                                          detached)
        return ChildRun(run, child_id, self.result_type, detached)

    async def call(self, run: WorkflowRun, payload: P, *,
                   idempotency_key: str | None = None) -> R:
        """Start a child run of this workflow and wait for its result (``start_child``
        then ``result()``); ``aiki.ChildFailed`` or ``aiki.ChildCancelled`` if it did not
        complete."""
        child = await self.start_child(run, payload, idempotency_key=idempotency_key)
        return await child.result()


@attrs.frozen
class ChildRun(Generic[R]):
    """A child run started by ``wf.start_child(run, payload)``: its ``id`` is known at once."""

    run: WorkflowRun
    id: str
    result_type: Any
    detached: bool = False

    async def result(self) -> R:
        """Wait for the child to end, the worker's slot given back meanwhile: its result
        when it completed; ``aiki.ChildFailed`` (its id, error type and message) when it
        failed; ``aiki.ChildCancelled`` when it was cancelled. Recorded: a replay gets the
        same outcome."""
        return await self.run._join(self.id, self.result_type)  # type: ignore[no-any-return]

    @property
    def handle(self) -> Any:
        """A handle on the child run (``aiki.RunHandle``: its status, history, cancel...),
        through the client the worker running the parent was started from. Its calls are
        not steps of the parent: they are not recorded, and a replay makes them again. To
        wait for the child, use :meth:`result` (recorded); from outside the workflow,
        ``client.handle(child.id)``."""
        return self.run.client.handle(self.id, self.result_type)


class TaskDecorator(Protocol):
    """What ``@aiki.task(...)`` returns: it makes a Task of a coroutine function or a plain
    function."""

    @overload
    def __call__(self, fn: Callable[[P], Awaitable[R]]) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[[P], R]) -> Task[P, R]: ...


def task(
    *, name: str | None = None, retry: Retry | Mapping[str, Any] | None = None,
    timeout: float | None = None, loop: Literal["trio", "asyncio"] = "trio",
) -> TaskDecorator:
    """Make a task of ``f(payload) -> result``, in one of three styles:

    - ``async def`` (the default, ``loop="trio"``): a Trio coroutine; the fastest.
    - a plain ``def``: runs in a worker thread (at most ``task_threads`` at once per worker);
      cancelling the run abandons the thread and throws its result away (see
      :mod:`aiki.task_styles`).
    - ``async def`` with ``loop="asyncio"``: an asyncio coroutine, run on the worker's
      asyncio loop through trio-asyncio, so asyncio-only libraries work in it.

    ``retry``: an ``aiki.Retry`` or the dict form ``{"type": "exponential", "maxAttempts":
    3, "baseDelayMs": 1000}``. Retries, idempotency and checkpoints are the same in every
    style.
    """
    policy = Retry.coerce(retry)
    if loop not in ("trio", "asyncio"):
        raise ValueError(f"@aiki.task loop must be 'trio' or 'asyncio', got {loop!r}")

    def make(fn: Callable[[P], Any]) -> Task[P, Any]:
        is_async = inspect.iscoroutinefunction(fn)
        if loop == "asyncio" and not is_async:
            raise TypeError(f"@aiki.task(loop='asyncio') needs an 'async def' function, "
                            f"got {fn!r}")
        if not is_async and not callable(fn):
            raise TypeError(f"@aiki.task needs a function, got {fn!r}")
        style: Style = loop if is_async else "thread"
        payload_type, result_type = _types(fn, 0, "task")
        return Task(name or fn.__name__, fn, policy, timeout, payload_type, result_type, style)

    return make


def workflow(
    *, name: str | None = None, version: str = "1", events: Sequence[Event[Any]] = (),
) -> Callable[[Callable[[WorkflowRun, P], Awaitable[R]]], Workflow[P, R]]:
    """Make a workflow of ``async def f(run: aiki.WorkflowRun, payload) -> result``.
    ``events``: the ``aiki.event`` definitions its runs may be sent (others are refused)."""
    names = tuple(e.name for e in events)
    if len(set(names)) != len(names):
        raise ValueError(f"workflow {name!r}: an event is declared twice in {list(names)}")

    def make(fn: Callable[[WorkflowRun, P], Awaitable[R]]) -> Workflow[P, R]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@aiki.workflow needs an 'async def' function (workflows run on "
                            f"the worker's Trio loop), got {fn!r}")
        payload_type, result_type = _types(fn, 1, "workflow")
        return Workflow(name or fn.__name__, str(version), fn, payload_type, result_type,
                        names)

    return make


@attrs.frozen
class Event(Generic[P]):
    """A named, typed event a workflow can wait for: make one with ``aiki.event(name, T)``,
    declare it on the workflow (``@aiki.workflow(..., events=[approval])``), wait for it in
    workflow code with ``await approval.wait(run, timeout=...)``, and send it with
    ``await handle.send(approval, value)``."""

    name: str
    payload_type: Any = Any

    async def wait(self, run: WorkflowRun, *,
                   timeout: float | datetime.timedelta | None = None) -> P:
        """The next event of this name sent to the run, decoded into its type.

        Sends are buffered: one sent before the wait is delivered to it at once. Each send
        goes to exactly one wait, in send order. Waiting frees the worker's slot. With a
        ``timeout`` (seconds or a ``timedelta``), raises ``aiki.EventTimeout`` if none came
        in time; a send after that goes to the next wait. Replay returns the value recorded.
        """
        if not isinstance(run, WorkflowRun):
            raise TypeError(f"event {self.name!r}: the first argument of .wait() must be the "
                            f"workflow's aiki.WorkflowRun, got {type(run).__name__}")
        seconds = None if timeout is None else check_duration(
            timeout, f"event {self.name!r} .wait(timeout=...)")
        step = await run._wait_event(self.name, seconds)
        if step.state == "failed":
            raise EventTimeout(step.error_message or f"no {self.name!r} event in time")
        assert step.output is not None
        return decode_value(step.output, self.payload_type,  # type: ignore[no-any-return]
                            what=f"event {self.name!r}")

    def encode(self, value: Any) -> str:
        """``value`` as this event's payload, or PayloadError (TypeError) if it is not one."""
        return encode_value(value, self.payload_type, what=f"event {self.name!r}")


def event(name: str, payload_type: Any = Any) -> Event[Any]:
    """A typed event definition: ``approval = aiki.event("approval", Approval)``."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"an event name must be a non-empty string of at most 200 "
                         f"characters, got {name!r}")
    return Event(name, payload_type)
