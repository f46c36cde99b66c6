"""OpenTelemetry: each run is one trace under the span that enqueued it, exported in memory."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import aiki
from aiki import tracing
from aiki.sources import Sources
from aiki.store import Store

tries: dict[int, int] = {}


@aiki.task(name="reserve", retry=aiki.Retry.fixed(3, 0.1))
async def reserve(n: int) -> int:
    tries[n] = tries.get(n, 0) + 1
    if tries[n] == 1:
        raise ConnectionError("stock service timed out")
    return n


@aiki.task(name="pay")
async def pay(n: int) -> str:
    return f"paid {n}"


@aiki.workflow(name="shop", version="3")
async def shop(run: aiki.WorkflowRun, n: int) -> str:
    await reserve.run(run, n)
    await run.sleep(timedelta(minutes=1))  # a second attempt (claim) after the nap
    return await pay.run(run, n)


@aiki.task(name="refuse")
async def refuse(n: int) -> int:
    raise aiki.NonRetryableError(f"no {n}")


@aiki.workflow(name="refused", version="1")
async def refused(run: aiki.WorkflowRun, n: int) -> int:
    return await refuse.run(run, n)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.provider(provider):
        yield memory


def tree(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[ReadableSpan]:
    """``root`` and its descendants, in start order."""
    by_parent: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        if s.parent is not None:
            by_parent.setdefault(s.parent.span_id, []).append(s)
    out, todo = [], [root]
    while todo:
        s = todo.pop()
        out.append(s)
        todo.extend(by_parent.get(s.context.span_id, []))
    return sorted(out, key=lambda s: s.start_time or 0)


def attrs_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_run_is_one_trace_under_the_request_that_enqueued_it(
    autojump_clock: trio.abc.Clock, engine_store: Store, exporter: InMemorySpanExporter,
) -> None:
    tries.clear()
    async with aiki.embedded(engine_store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[shop, refused], id="w-7"):
            tracer = tracing._PROVIDER.get().get_tracer("web")
            with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER) as request:
                handle = await shop.enqueue(client, 5)
                doomed = await refused.enqueue(client, 1)
            assert await handle.wait_for_completion(timeout=600) == "paid 5"
            with pytest.raises(aiki.WorkflowFailed):
                await doomed.wait_for_completion(timeout=60)
    spans = tuple(exporter.get_finished_spans())
    [root] = [s for s in spans if s.name == "POST /orders"]
    assert root.context.span_id == request.get_span_context().span_id
    assert {s.context.trace_id for s in tree(spans, root)} == {root.context.trace_id}
    run_spans = [s for s in tree(spans, root) if attrs_of(s).get("aiki.run_id") == handle.id]
    names = [s.name for s in run_spans]
    # Enqueued once; claimed and run twice (before and after the nap).
    assert names.count("aiki.enqueue shop") == 1
    assert names.count("aiki.claim shop") == 2 and names.count("aiki.run shop") == 2
    [enqueue] = [s for s in run_spans if s.name == "aiki.enqueue shop"]
    assert enqueue.parent is not None and enqueue.parent.span_id == root.context.span_id
    assert enqueue.kind == SpanKind.SERVER
    for s in run_spans:
        if s.name != "aiki.enqueue shop":  # everything else hangs under the enqueue
            assert s.parent is not None and s.parent.span_id == enqueue.context.span_id, s.name
    runs = [s for s in run_spans if s.name == "aiki.run shop"]
    assert [attrs_of(s)["aiki.attempt"] for s in runs] == [1, 2]
    for s in runs:
        assert attrs_of(s)["aiki.workflow"] == "shop" and attrs_of(s)["aiki.version"] == "3"
        assert attrs_of(s)["aiki.worker_id"] == "w-7"
    first, second = runs
    under_first = [s for s in tree(spans, first) if s is not first]
    under_second = [s for s in tree(spans, second) if s is not second]
    # The first attempt: reserve fails once (an error span), then succeeds; then the nap.
    assert [(s.name, attrs_of(s)["aiki.task.attempt"], s.status.status_code)
            for s in under_first] == [("aiki.task reserve", 1, StatusCode.ERROR),
                                      ("aiki.task reserve", 2, StatusCode.UNSET)]
    assert [s.name for s in under_second] == ["aiki.task pay", "aiki.complete shop"]

    [failing] = [s for s in spans if s.name == "aiki.fail refused"]
    assert failing.status.status_code == StatusCode.ERROR
    assert "NonRetryableError" in (failing.status.description or "")
    assert failing.context.trace_id == root.context.trace_id  # same request, same trace


async def test_without_a_configured_provider_nothing_is_traced(
    autojump_clock: trio.abc.Clock, engine_store: Store,
) -> None:
    """The API is installed here but no provider is set: no span, no context stored."""
    assert tracing.current_context() is None
    with tracing.span("anything", {"a": 1}) as span:
        assert span is None
    async with aiki.embedded(engine_store, sources=Sources.seeded(4)) as client:
        async with aiki.worker(client, workflows=[refused]):
            handle = await refused.enqueue(client, 2)
            with pytest.raises(aiki.WorkflowFailed):
                await handle.wait_for_completion(timeout=60)
    run = await engine_store.get_run(handle.id)
    assert run is not None and run.trace_context is None


def test_every_client_sends_the_callers_trace_context(exporter: InMemorySpanExporter) -> None:
    """The sans-IO core (under the Trio, asyncio and blocking clients) puts the current
    span's W3C context in the Enqueue, so an HTTP request span (FastAPI's, say) parents the
    run; outside any span it sends none."""
    from aiki.client import core

    tracer = tracing._PROVIDER.get().get_tracer("web")
    outside = core.enqueue("wf", "1", version=None, idempotency_key=None, run_id="r")
    assert outside.make(1).trace_context is None
    with tracer.start_as_current_span("GET /checkout") as request:
        call = core.enqueue("wf", "1", version=None, idempotency_key=None, run_id="r")
    sent = call.make(2).trace_context
    context = request.get_span_context()
    assert sent is not None and list(sent) == ["traceparent"]
    assert sent["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
