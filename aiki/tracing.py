"""OpenTelemetry traces of runs, when opentelemetry-api is installed and a tracer provider is
configured; otherwise every function here does nothing.

Each run is one trace. The client that enqueues sends its current trace context (W3C
``traceparent``) in the ``Enqueue`` message, so a FastAPI request span is the parent of all
the run's spans; the server's ``aiki.enqueue`` span is stored with the run
(``RunRecord.trace_context``) and parents, on whichever worker and however many days later,
``aiki.claim`` (server), and ``aiki.run`` per attempt with ``aiki.task`` per task attempt and
``aiki.complete`` / ``aiki.fail`` (worker). Attributes: ``aiki.run_id``, ``aiki.workflow``,
``aiki.version``, ``aiki.attempt``, ``aiki.worker_id``, and ``aiki.task`` on task spans.

OpenTelemetry is imported on first use only, and only looked for once: without it, or
without a configured provider (the API's default proxy), no span is made and nothing is
imported beyond that one look.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

AttributeValue = str | int | float | bool


@functools.cache
def _api() -> tuple[ModuleType, ModuleType] | None:
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return trace, propagate


# A tracer provider for the current task and the tasks it starts, instead of the global one
# (tests: OpenTelemetry sets its global provider once per process).
_PROVIDER: contextvars.ContextVar[Any] = contextvars.ContextVar("aiki_tracer_provider",
                                                               default=None)


@contextlib.contextmanager
def provider(tracer_provider: Any) -> Iterator[None]:
    """Trace with ``tracer_provider`` inside the block (and in the tasks started from it)."""
    token = _PROVIDER.set(tracer_provider)
    try:
        yield
    finally:
        _PROVIDER.reset(token)


@functools.cache
def _provider_named() -> bool:
    """Whether the environment names a provider for the API to load on first use."""
    return "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def _tracing() -> tuple[ModuleType, ModuleType] | None:
    """The API modules if a real tracer provider is set (not the default proxy/no-op)."""
    api = _api()
    if api is None:
        return None
    if _PROVIDER.get() is not None:
        return api
    if getattr(api[0], "_TRACER_PROVIDER", True) is None and not _provider_named():
        return None  # none set yet: the API's proxy, known without its read of os.environ
    current = api[0].get_tracer_provider()
    if type(current).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return None
    return api


def current_context() -> dict[str, str] | None:
    """The caller's trace context as W3C headers, to send with an enqueue; None if there
    is no span (or no OpenTelemetry)."""
    api = _tracing()
    if api is None:
        return None
    carrier: dict[str, str] = {}
    api[1].inject(carrier)
    return carrier or None


def _parent(api: tuple[ModuleType, ModuleType], carrier: Mapping[str, str] | str | None) -> Any:
    if carrier is None:
        return None  # the current context
    if isinstance(carrier, str):
        try:
            carrier = json.loads(carrier)
        except ValueError:
            return None
        if not isinstance(carrier, dict):
            return None
    return api[1].extract(carrier)


# Without tracing, every span is this one shared no-op block (cheaper than a generator's
# context manager: a run opens half a dozen spans).
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(name: str, attributes: Mapping[str, AttributeValue | None], *,
         parent: Mapping[str, str] | str | None = None, kind: str = "INTERNAL",
         ) -> contextlib.AbstractContextManager[Any]:
    """A span, current inside the block, child of ``parent`` (W3C headers, or their JSON as
    stored with a run) or of the current span. An ``Exception`` leaving the block is
    recorded and sets an error status; Trio's cancellation and the engine's own control
    flow (BaseExceptions: a run suspended or given back) leave the span as it is. Yields
    the span, or None without tracing."""
    api = _tracing()
    if api is None:
        return _NO_SPAN
    return _span(api, name, attributes, parent, kind)


@contextlib.contextmanager
def _span(api: tuple[ModuleType, ModuleType], name: str,
          attributes: Mapping[str, AttributeValue | None],
          parent: Mapping[str, str] | str | None, kind: str) -> Iterator[Any]:
    trace = api[0]
    tracer = (_PROVIDER.get() or trace.get_tracer_provider()).get_tracer("aiki")
    with tracer.start_as_current_span(
        name, context=_parent(api, parent), kind=getattr(trace.SpanKind, kind),
        attributes={k: v for k, v in attributes.items() if v is not None},
        record_exception=False, set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            current.record_exception(exc)
            current.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: "
                                                                    f"{exc}"))
            raise


def context_of(current: Any) -> str | None:
    """The JSON W3C context of ``current`` (a span from :func:`span`), to store with a run."""
    api = _tracing()
    if api is None or current is None:
        return None
    carrier: dict[str, str] = {}
    api[1].inject(carrier, context=api[0].set_span_in_context(current))
    return json.dumps(carrier, sort_keys=True) if carrier else None


def stored_context(current: Any, carrier: Mapping[str, str] | None) -> str | None:
    """What to store with a new run: ``current``'s context (the server's enqueue span), or
    without tracing here the client's ``carrier`` as it came, for the workers to use."""
    mine = context_of(current)
    if mine is not None:
        return mine
    if not carrier:
        return None
    return json.dumps({str(k): str(v) for k, v in carrier.items()}, sort_keys=True)


def run_attributes(run_id: str, workflow: str, version: str, attempt: int,
                   worker_id: str | None) -> dict[str, AttributeValue | None]:
    return {"aiki.run_id": run_id, "aiki.workflow": workflow, "aiki.version": version,
            "aiki.attempt": attempt, "aiki.worker_id": worker_id}


def fail(current: Any, description: str) -> None:
    """Mark ``current`` as failed (the run failed, as a value rather than an exception)."""
    api = _tracing()
    if api is not None and current is not None:
        current.set_status(api[0].Status(api[0].StatusCode.ERROR, description))


def set_attribute(current: Any, key: str, value: AttributeValue) -> None:
    if current is not None:
        current.set_attribute(key, value)
