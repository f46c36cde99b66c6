"""Metrics end to end: a known workload, then the server's /metrics, counted exactly."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import aiki
from aiki.actors.worker import Worker
from aiki.errors import StoreUnavailable
from aiki.metrics import MAILBOX_DROPPED, RUNS, TASK_DURATION, Metrics
from aiki.observability import HttpRequest
from aiki.sdk.client import Client
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import MemoryStore, Store
from aiki.transport.memory import MemoryTransport

charges: dict[int, int] = {}


@aiki.task(name="charge", retry=aiki.Retry.fixed(3, 0.5))
async def charge(order: int) -> int:
    charges[order] = charges.get(order, 0) + 1
    if charges[order] == 1:
        raise ConnectionError("card network timed out")
    return order * 100


@aiki.task(name="ship")
async def ship(order: int) -> str:
    return f"shipped {order}"


@aiki.workflow(name="order", version="1")
async def order(run: aiki.WorkflowRun, n: int) -> str:
    await charge.run(run, n)
    return await ship.run(run, n)


@aiki.task(name="explode", retry=aiki.Retry.fixed(2, 0.1))
async def explode(n: int) -> int:
    raise ValueError(f"boom {n}")


@aiki.workflow(name="doomed", version="1")
async def doomed(run: aiki.WorkflowRun, n: int) -> int:
    return await explode.run(run, n)


@aiki.workflow(name="sleeper", version="1")
async def sleeper(run: aiki.WorkflowRun, n: int) -> int:
    await run.sleep(timedelta(minutes=5))
    return n


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(page: dict[Any, float], name: str, **labels: str) -> float | None:
    return page.get((name, tuple(sorted(labels.items()))))


async def test_metrics_count_a_known_workload_exactly(
    autojump_clock: trio.abc.Clock, engine_store: Store,
) -> None:
    charges.clear()
    sources = Sources.seeded(7)
    server = Server(engine_store, sources, lease_ttl=30.0)
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, transport, "embedded")
        async with Client.open(transport, address, sources) as client:
            enqueued_at = sources.clock.now()
            await client.enqueue("order", 7, version="2")  # nobody serves version 2
            worker = Worker(transport, address, [order, doomed, sleeper], "w-1", sources,
                            max_concurrent_runs=4)
            await nursery.start(worker.run)
            handles = [await order.enqueue(client, n) for n in (1, 2, 3)]
            again = await order.enqueue(client, 1, idempotency_key="k")
            assert (await order.enqueue(client, 1, idempotency_key="k")).id == again.id
            bad = await doomed.enqueue(client, 1)
            nap = await sleeper.enqueue(client, 5)
            for h in [*handles, again]:
                assert (await h.wait_for_completion(timeout=60)).startswith("shipped")
            with pytest.raises(aiki.WorkflowFailed):
                await bad.wait_for_completion(timeout=60)
            assert await nap.wait_for_completion(timeout=600) == 5
            # A client hears of a run's end as its write commits; the worker's slot is given
            # back when the request that ended it is answered, a moment later.
            await trio.testing.wait_all_tasks_blocked()

            app = server.http_app(protocol_port=True)
            response = await app(HttpRequest("GET", "/metrics", ()))
            assert response.status == 200
            assert response.content_type.startswith("text/plain; version=0.0.4")
            page = scrape(response.body.decode())
            now = sources.clock.now()
        nursery.cancel_scope.cancel()

    def runs(workflow: str, event: str, version: str = "1") -> float | None:
        return sample(page, "aiki_runs_total", workflow=workflow, version=version, event=event)

    assert [runs("order", e) for e in ("enqueued", "started", "completed", "failed")] == [
        4, 4, 4, None]
    assert [runs("doomed", e) for e in ("enqueued", "started", "completed", "failed")] == [
        1, 1, None, 1]
    # The sleeper is claimed twice: before its nap and after it.
    assert [runs("sleeper", e) for e in ("enqueued", "started", "completed")] == [1, 2, 1]
    assert runs("order", "enqueued", "2") == 1 and runs("order", "started", "2") is None

    def attempts(task: str, outcome: str) -> float | None:
        return sample(page, "aiki_task_attempts_total", task=task, outcome=outcome)

    # Order 1's second run (keyed "k") finds its charge working at once.
    assert attempts("charge", "retrying") == 3 and attempts("charge", "completed") == 4
    assert attempts("ship", "completed") == 4 and attempts("ship", "retrying") is None
    assert attempts("explode", "retrying") == 1 and attempts("explode", "failed") == 1

    # Runs now: version 2 still queued, since enqueued_at.
    assert sample(page, "aiki_runs_in_state", workflow="order", version="2",
                  state="queued") == 1
    assert not [k for k in page if k[0] == "aiki_runs_in_state" and ("version", "1") in k[1]]
    assert sample(page, "aiki_oldest_queued_run_age_seconds", workflow="order",
                  version="2") == pytest.approx(now - enqueued_at)
    # Each run's first claim is one dispatch latency; the nap one schedule lateness.
    for workflow, count in (("order", 4), ("doomed", 1), ("sleeper", 1)):
        assert sample(page, "aiki_dispatch_latency_seconds_count", workflow=workflow,
                      version="1") == count
    assert sample(page, "aiki_schedule_lateness_seconds_count", kind="wait") == 1
    assert sample(page, "aiki_schedule_lateness_seconds_sum", kind="wait") == pytest.approx(
        0, abs=1e-6)
    # The store: every op committed, none refused; workers and slots as the seats say.
    assert sample(page, "aiki_store_errors_total") is None
    assert sample(page, "aiki_stale_writes_refused_total") is None
    assert sample(page, "aiki_leases_expired_total") == 0
    ops = {dict(k[1])["op"]: v for k, v in page.items() if k[0] == "aiki_store_ops_total"}
    assert ops["Enqueue"] == 8 and ops["CompleteRun"] == 5 and ops["FailRun"] == 1
    assert ops["SaveStep"] == 3 + 4 + 4 + 2  # charge 3 retries, 4 done; ship 4; explode 2
    committed = sample(page, "aiki_store_transactions_total", result="committed")
    assert committed == sample(page, "aiki_store_ops_per_commit_count")
    assert sample(page, "aiki_store_ops_per_commit_sum") == sum(ops.values())
    assert sample(page, "aiki_workers_connected") == 1
    assert sample(page, "aiki_worker_slots", state="free") == 4
    assert sample(page, "aiki_worker_slots", state="busy") == 0
    # The worker's own metrics are in the same sink (one process), not on the server's page.
    assert not [k for k in page if k[0].startswith("aiki_worker_task")]
    durations = sources.metrics.histogram(TASK_DURATION, ("charge", "failed"))
    assert durations is not None and durations.count == 3
    assert sources.metrics.value(RUNS, ("order", "1", "completed")) == 4


async def test_health_and_ready_answer_probes(
    autojump_clock: trio.abc.Clock, engine_store: Store,
) -> None:
    server = Server(engine_store, Sources.seeded(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, MemoryTransport(), "embedded")
        app = server.http_app(protocol_port=True, token="s3cret")
        health = await app(HttpRequest("GET", "/health", ()))
        ready = await app(HttpRequest("GET", "/ready", ()))
        assert (health.status, ready.status) == (200, 200)
        assert b'"status": "ok"' in ready.body
        refused = await app(HttpRequest("GET", "/metrics", ()))
        assert refused.status == 401 and b"Bearer" in refused.body
        allowed = await app(HttpRequest("GET", "/metrics", (("authorization",
                                                              "Bearer s3cret"),)))
        assert allowed.status == 200 and b"aiki_runs_total" in allowed.body
        other = await app(HttpRequest("GET", "/", ()))
        assert other.status == 426 and b"Aiki server" in other.body
        plain = server.http_app()  # --metrics-listen: no token, 404 elsewhere
        assert (await plain(HttpRequest("GET", "/metrics", ()))).status == 200
        assert (await plain(HttpRequest("GET", "/nope", ()))).status == 404
        server.stop()
        stopping = await app(HttpRequest("GET", "/ready", ()))
        assert stopping.status == 503 and b"shutting down" in stopping.body
        nursery.cancel_scope.cancel()


async def test_a_store_that_does_not_answer_is_not_ready(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Down(MemoryStore):
        async def run_counts(self) -> Any:
            raise StoreUnavailable("the database is gone")

    server = Server(Down(), Sources.seeded(1))
    ok, why = await server.ready()
    assert not ok and "the database is gone" in why


def test_a_mailbox_drop_is_counted_in_the_sink_it_was_given() -> None:
    from aiki.actors.mailbox import Mailbox

    metrics = Metrics()
    box = Mailbox[int](1, "dispatcher", metrics)
    assert box.address.tell_nowait(1) and not box.address.tell_nowait(2)
    assert metrics.series(MAILBOX_DROPPED) == {("dispatcher", "full"): 1}


async def test_a_write_repeated_after_a_lost_reply_counts_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The StoreWriter counts what the store committed: a SaveStep sent again (its first reply
    lost) writes nothing and is not counted again; a write refused as stale is counted as
    refused, not as its run's event."""
    from aiki.actors.store_writer import StoreWriter
    from aiki.errors import StaleLease
    from aiki.metrics import STALE_WRITES, STORE_OPS, TASK_ATTEMPTS
    from aiki.records import StepRecord
    from aiki.store import ops

    metrics = Metrics()
    store = MemoryStore()
    writer = StoreWriter(store, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.write(ops.Enqueue("r1", "wf", "1", "0", None, 1.0))
        [claimed] = await writer.write(ops.Claim("w1", (("wf", "1"),), 1, 2.0, 30.0))
        done = StepRecord("0", "task", "charge", "h", "1", None, "completed", 1, "2")
        assert await writer.write(ops.SaveStep(claimed.lease, done, 3.0)) is True
        assert await writer.write(ops.SaveStep(claimed.lease, done, 4.0)) is False
        await writer.write(ops.CompleteRun(claimed.lease, "2", 5.0))
        with pytest.raises(StaleLease):
            await writer.write(ops.CompleteRun(claimed.lease, "2", 6.0))  # sent again
        nursery.cancel_scope.cancel()
    assert metrics.series(TASK_ATTEMPTS) == {("charge", "completed"): 1}
    assert metrics.series(RUNS) == {("wf", "1", "enqueued"): 1, ("wf", "1", "started"): 1,
                                    ("wf", "1", "completed"): 1}
    assert metrics.series(STALE_WRITES) == {("CompleteRun",): 1}
    assert metrics.value(STORE_OPS, ("SaveStep", "ok")) == 2


async def test_pause_resume_and_fork_count_as_their_events(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The run controls need no code of their own: a pause counts as the run's new state
    (paused), a resume as resumed, a fork as forked, once each: the same request sent again
    is answered with the run as it is and counts nothing."""
    from aiki.actors.store_writer import StoreWriter
    from aiki.store import ops

    metrics = Metrics()
    writer = StoreWriter(MemoryStore(), metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.write(ops.Enqueue("r1", "wf", "1", "0", None, 1.0))
        paused = await writer.write(ops.PauseRun("r1", "ops", 2.0))
        assert paused.run.state == "paused"
        await writer.write(ops.ResumeRun("r1", "ops", 3.0))
        # A control sent again (its control id) is answered as done, and counted once.
        await writer.write(ops.PauseRun("r1", "ops", 3.5, "id-1"),
                           ops.PauseRun("r1", "ops", 3.5, "id-1"))
        await writer.write(ops.PauseRun("r1", "ops", 3.5, "id-1"))
        await writer.write(ops.ResumeRun("r1", "ops", 3.6))
        await writer.write(ops.ForkRun("r1", "r2", 0, None, "ops", 4.0))
        await writer.write(ops.ForkRun("r1", "r2", 0, None, "ops", 5.0))  # sent again
        # A duplicated request: the same fork twice at one time, one transaction or two.
        await writer.write(ops.ForkRun("r1", "r3", 0, None, "ops", 6.0),
                           ops.ForkRun("r1", "r3", 0, None, "ops", 6.0))
        await writer.write(ops.ForkRun("r1", "r3", 0, None, "ops", 6.0))
        nursery.cancel_scope.cancel()
    assert metrics.series(RUNS) == {("wf", "1", "enqueued"): 1, ("wf", "1", "paused"): 2,
                                    ("wf", "1", "resumed"): 2, ("wf", "1", "forked"): 2}
