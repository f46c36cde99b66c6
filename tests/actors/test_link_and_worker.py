"""Link reconnection, a worker re-announcing its leases, and draining; in virtual time over
the memory transport, with connections a test can cut."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.actors.link import Link
from aiki.actors.worker import Worker
from aiki.errors import AuthenticationFailed, ConnectionLost
from aiki.sdk.client import Client
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store import ops as o
from aiki.transport.base import Connection, Handler
from aiki.transport.memory import MemoryTransport


@attrs.define(eq=False)
class Severable:
    """A memory transport whose client connections a test can cut, and refuse."""

    inner: MemoryTransport = attrs.field(factory=MemoryTransport)
    conns: list[Connection] = attrs.field(factory=list)
    down: bool = False
    connects: int = 0

    async def connect(self, address: str) -> Connection:
        self.connects += 1
        if self.down:
            raise ConnectionLost(f"nothing listens on {address!r} (the server is down)")
        conn = await self.inner.connect(address)
        self.conns.append(conn)
        return conn

    async def serve(self, address: str, handler: Handler, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await self.inner.serve(address, handler, task_status=task_status)

    async def sever(self) -> None:
        conns, self.conns = self.conns, []
        for conn in conns:
            await conn.aclose()


@asynccontextmanager
async def cluster(store: MemoryStore | None = None, transport: Severable | None = None,
                  **server_options: Any) -> AsyncIterator[tuple[Server, Severable, Client]]:
    transport = transport or Severable()
    server = Server(store or MemoryStore(), Sources.seeded(7), **server_options)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, transport, "srv")
        async with Client.open(transport, address, Sources.seeded(8)) as client:
            yield server, transport, client
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        yield worker
        nursery.cancel_scope.cancel()


def worker(transport: Severable, workflows: Sequence[Any], id: str, slots: int = 4) -> Worker:
    return Worker(transport, "srv", list(workflows), id, Sources.seeded(sum(map(ord, id))),
                  max_concurrent_runs=slots)


executed: Counter[str] = Counter()
gates: dict[str, trio.Event] = {}
started: dict[str, trio.Event] = {}


def reset() -> None:
    executed.clear()
    gates.clear()
    started.clear()


def gate(name: str) -> trio.Event:
    return gates.setdefault(name, trio.Event())


def began(name: str) -> trio.Event:
    return started.setdefault(name, trio.Event())


@aiki.task(name="gated")
async def gated(name: str) -> str:
    executed[name] += 1
    began(name).set()
    await gate(name).wait()
    return f"done {name}"


@aiki.workflow(name="two-steps", version="1")
async def two_steps(run: aiki.WorkflowRun, prefix: str) -> list[str]:
    return [await gated.run(run, f"{prefix}-a"), await gated.run(run, f"{prefix}-b")]


# -- reconnection --------------------------------------------------------------------------
async def test_a_cut_connection_is_replaced_and_the_run_goes_on_under_the_same_lease(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")) as w1:
            handle = await two_steps.enqueue(client, "r")
            await began("r-a").wait()
            await transport.sever()  # the worker's and the client's connections both drop
            gate("r-a").set()  # the task ends while the link is down: its save is resent
            gate("r-b").set()
            assert await handle.wait_for_completion(timeout=60) == ["done r-a", "done r-b"]
            assert w1.link is not None and w1.link.connections == 2
            assert client.link.connections == 2
        run = await server.store.get_run(handle.id)
        assert run is not None and run.lease_epoch == 1, "the run never changed hands"
        assert executed == Counter({"r-a": 1, "r-b": 1})
        seats = [s for s in server.ctx.dispatcher.seats.values() if s.worker_id == "w1"]
        assert len(seats) <= 1, "a reconnected worker has one seat, not two"


async def test_the_reconnecting_hello_reannounces_held_leases(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")) as w1:
            handle = await two_steps.enqueue(client, "h")
            await began("h-a").wait()
            [before] = server.ctx.dispatcher.seats.values()
            await transport.sever()
            with trio.fail_after(10):
                while w1.link is None or w1.link.connections < 2 or not [
                        s for s in server.ctx.dispatcher.seats.values()
                        if s.session != before.session]:
                    await trio.sleep(0.01)
            [after] = server.ctx.dispatcher.seats.values()
            assert after.session != before.session and after.worker_id == "w1"
            assert after.active == {handle.id}, "the new session knows the run it holds"
            gate("h-a").set()
            gate("h-b").set()
            await handle.wait_for_completion(timeout=60)


async def test_a_lease_lost_while_disconnected_is_dropped_on_reconnect(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Away longer than the lease: the run was queued again; the heartbeat right after the
    reconnection says so, and the run's actor under the old lease stops: nothing is saved
    under it. (The run may come back to the same worker under a new lease: it is queued,
    and the worker has room.)"""
    reset()
    async with cluster(lease_ttl=4) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")) as w1:
            handle = await two_steps.enqueue(client, "l")
            await began("l-a").wait()
            transport.down = True
            await transport.sever()
            await trio.sleep(20)  # the lease expires; the run is queued again
            run = await server.store.get_run(handle.id)
            assert run is not None and run.state == "queued"
            transport.down = False
            with trio.fail_after(30):
                # The reconnection's heartbeat reports the lease lost.
                while any(h.lease.epoch == 1 for h in w1.held.values()):
                    await trio.sleep(0.01)
            gate("l-a").set()
            gate("l-b").set()
            async with running(worker(transport, [two_steps], "w2")):
                assert await handle.wait_for_completion(timeout=60) == ["done l-a",
                                                                        "done l-b"]
        history = await handle.history()
        again = next(i for i, e in enumerate(history)
                     if e.event == "run.running" and e.detail == "lease epoch 2")
        done = [i for i, e in enumerate(history) if e.event == "task.completed"]
        assert len(done) == 2 and min(done) > again, "nothing completed under epoch 1"


async def test_a_request_waits_for_the_reconnection_within_its_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cluster() as (server, transport, client):
        transport.down = True
        await transport.sever()
        start = trio.current_time()
        with pytest.raises(TimeoutError, match="within 5"):
            await client.link.request(p.ListWorkers, timeout=5)
        assert trio.current_time() - start == pytest.approx(5)
        assert transport.connects > 2, "it kept trying, with backoff"
        transport.down = False
        assert await client.list_workers() == []


async def test_an_enqueue_whose_reply_was_lost_is_resent_and_makes_one_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = Severable()

    class ReplyLosingStore(MemoryStore):
        lost = False

        async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
            out = await super().apply(ops)
            if not self.lost and any(isinstance(op, o.Enqueue) for op in ops):
                self.lost = True
                await transport.sever()  # committed, but the reply will not arrive
            return out

    store = ReplyLosingStore()
    async with cluster(store, transport) as (server, _, client):
        handle = await client.enqueue("anything", {"x": 1}, version="1")
        assert store.lost
        assert [r.id for r in await store.list_runs()] == [handle.id]
        assert client.link.connections == 2


async def test_the_first_connection_must_succeed(autojump_clock: trio.abc.Clock) -> None:
    transport = Severable(down=True)
    with pytest.raises(ConnectionLost, match="the server is down"):
        async with Client.open(transport, "srv", Sources.seeded(1)):
            pass  # pragma: no cover


async def test_a_refused_token_ends_the_link_with_a_clear_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = Severable()
    server = Server(MemoryStore(), Sources.seeded(1), token="right")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        with pytest.raises(AuthenticationFailed, match="wrong or missing token"):
            async with Link.open(transport, "srv",
                                 lambda req: p.Hello(req, "client", "c", token="wrong")):
                pass  # pragma: no cover
        assert transport.connects == 1, "a refused token is not retried"
        nursery.cancel_scope.cancel()


# -- draining ------------------------------------------------------------------------------
async def test_drain_lets_the_task_in_flight_finish_then_gives_the_run_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")) as w1:
            handle = await two_steps.enqueue(client, "d")
            await began("d-a").wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w1.drain, 60)
                await trio.sleep(1)
                [info] = await client.list_workers()
                assert info.draining and info.id == "w1"
                other = await two_steps.enqueue(client, "o")  # not for a draining worker
                await trio.sleep(5)
                assert not began("o-a").is_set()
                gate("d-a").set()  # the task in flight finishes; the run is given back
            assert not w1.held
            run = await server.store.get_run(handle.id)
            assert run is not None and run.state == "queued"
            steps = await server.store.get_steps(handle.id)
            assert [(s.name, s.state) for s in steps] == [("gated", "completed")]
        gate("d-b").set()
        gate("o-a").set()
        gate("o-b").set()
        async with running(worker(transport, [two_steps], "w2")):
            assert await handle.wait_for_completion(timeout=60) == ["done d-a", "done d-b"]
            await other.wait_for_completion(timeout=60)
        assert executed["d-a"] == 1, "the task that finished during the drain did not run again"
        history = [(e.event, e.worker_id) for e in await handle.history()]
        released = history.index(("run.queued", "w1"))  # given back by w1
        assert history[released - 1] == ("task.completed", "w1")


async def test_drain_releases_what_is_still_busy_after_the_grace_period(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")) as w1:
            handle = await two_steps.enqueue(client, "g")
            await began("g-a").wait()
            start = trio.current_time()
            await w1.drain(3)
            assert trio.current_time() - start == pytest.approx(3)
            assert not w1.held
            run = await server.store.get_run(handle.id)
            assert run is not None and run.state == "queued"
        gate("g-a").set()
        gate("g-b").set()
        async with running(worker(transport, [two_steps], "w2")):
            assert await handle.wait_for_completion(timeout=60) == ["done g-a", "done g-b"]
        assert executed["g-a"] == 2, "cut off by the grace period, the task ran again elsewhere"


flaky_calls: Counter[str] = Counter()


@aiki.task(name="flaky", retry=aiki.Retry.fixed(max_attempts=3, delay=5.0))
async def flaky(x: int) -> int:
    flaky_calls["n"] += 1
    if flaky_calls["n"] == 1:
        raise ConnectionError("try again")
    return x


@aiki.workflow(name="retrying", version="1")
async def retrying(run: aiki.WorkflowRun, x: int) -> int:
    return await flaky.run(run, x)


async def test_a_run_waiting_to_retry_is_suspended_until_its_retry_time_by_a_drain(
    autojump_clock: trio.abc.Clock,
) -> None:
    flaky_calls.clear()
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [retrying], "w1")) as w1:
            handle = await retrying.enqueue(client, 3)
            with trio.fail_after(10):
                while flaky_calls["n"] < 1 or not w1.held:
                    await trio.sleep(0.1)
            await trio.sleep(1)
            await w1.drain(30)
            run = await server.store.get_run(handle.id)
            assert run is not None and run.state == "waiting"
            [wait] = await server.store.get_waits(handle.id)
            assert (wait.kind, wait.name) == ("retry", "flaky")
        async with running(worker(transport, [retrying], "w2")):
            assert await handle.wait_for_completion(timeout=60) == 3
        assert flaky_calls["n"] == 2


# -- listings ------------------------------------------------------------------------------
async def test_list_workers_shows_versions_slots_in_use_and_heartbeats(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=9) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1", slots=3)), \
                running(worker(transport, [retrying], "w2", slots=5)):
            handle = await two_steps.enqueue(client, "s")
            await began("s-a").wait()
            await trio.sleep(4)  # past a heartbeat (every lease_ttl / 3 = 3 s)
            w1, w2 = await client.list_workers()
            assert (w1.id, [(r.name, r.version) for r in w1.workflows], w1.slots, w1.in_use) \
                == ("w1", [("two-steps", "1")], 3, 1)
            assert (w2.id, w2.slots, w2.in_use, w2.draining) == ("w2", 5, 0, False)
            now = server.sources.clock.now()
            assert w1.last_heartbeat is not None and 0 <= now - w1.last_heartbeat <= 3.5
            assert w1.connected_at <= w1.last_heartbeat
            gate("s-a").set()
            gate("s-b").set()
            await handle.wait_for_completion(timeout=60)


async def test_list_runs_filters_orders_and_limits(autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as (server, transport, client):
        ids = []
        for i in range(5):
            ids.append((await client.enqueue("alpha" if i % 2 else "beta", i, version="1")).id)
            await trio.sleep(1)
        runs = await client.list_runs()
        assert [r.id for r in runs] == ids[::-1], "newest first"
        assert {r.state for r in runs} == {"queued"}
        assert [r.id for r in await client.list_runs(workflow="alpha")] == [ids[3], ids[1]]
        assert [r.id for r in await client.list_runs(limit=2)] == [ids[4], ids[3]]
        assert await client.list_runs(state="completed") == []
        with pytest.raises(ValueError, match="unknown run state 'done'; the states are queued"):
            await client.list_runs(state="done")
        with pytest.raises(ValueError, match="limit must be an int from 1 to 1000"):
            await client.list_runs(limit=0)
        with pytest.raises(aiki.AikiError, match="limit must be 1 to 1000, got 5000"):
            await client.link.request(lambda req: p.ListRuns(req, limit=5000))
        with pytest.raises(aiki.AikiError, match="unknown run state 'x'"):
            await client.link.request(lambda req: p.ListRuns(req, state="x"))


# -- graceful server shutdown --------------------------------------------------------------
async def test_shutdown_answers_requests_in_flight_then_says_goodbye(
    autojump_clock: trio.abc.Clock,
) -> None:
    writing = trio.Event()
    finish = trio.Event()

    class SlowStore(MemoryStore):
        async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
            if any(isinstance(op, o.Enqueue) for op in ops):
                writing.set()
                await finish.wait()
            return await super().apply(ops)

    store = SlowStore()
    transport = Severable()
    server = Server(store, Sources.seeded(3), shutdown_grace=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        conn = await transport.inner.connect("srv")
        await conn.send(p.Hello(1, "client", "c"))
        assert isinstance(await conn.receive(), p.Welcome)
        await conn.send(p.Enqueue(2, "wf", "null", "1", None, "run-1"))
        await writing.wait()
        server.stop()
        await trio.sleep(1)
        late = await transport.inner.connect("srv")  # connecting during the shutdown
        await late.send(p.Hello(1, "client", "late"))
        assert await late.receive() == p.Goodbye("the server is shutting down")
        finish.set()
        assert await conn.receive() == p.Enqueued(2, "run-1", "1", True)
        assert await conn.receive() == p.Goodbye("the server is shutting down")
        with trio.fail_after(5):
            while nursery.child_tasks:  # serve() returned by itself
                await trio.sleep(0.1)
    assert [r.id for r in await store.list_runs()] == ["run-1"]


async def test_a_worker_told_of_a_shutdown_reconnects_to_the_next_server(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    store = MemoryStore()
    transport = Severable()
    first = Server(store, Sources.seeded(3), lease_ttl=10)
    first_done = trio.Event()

    async def serve_first(*, task_status: trio.TaskStatus[str]) -> None:
        await first.serve(transport, "srv", task_status=task_status)
        first_done.set()

    async with trio.open_nursery() as servers:
        await servers.start(serve_first)
        async with Client.open(transport, "srv", Sources.seeded(4)) as client:
            async with running(worker(transport, [two_steps], "w1")) as w1:
                handle = await two_steps.enqueue(client, "s")
                await began("s-a").wait()
                first.stop()
                with trio.fail_after(15):
                    await first_done.wait()  # it said goodbye to everyone and returned
                second = Server(store, Sources.seeded(5), lease_ttl=10)
                await servers.start(second.serve, transport, "srv")
                gate("s-a").set()
                gate("s-b").set()
                assert await handle.wait_for_completion(timeout=60) == ["done s-a", "done s-b"]
                assert w1.link is not None and w1.link.connections >= 2
        servers.cancel_scope.cancel()


# -- request timeouts: one sweep per Link, a scope only where a request has to wait ----------
@asynccontextmanager
async def silent_server(reads: bool = True, request_timeout: float = 30.0
                        ) -> AsyncIterator[Link]:
    """A server that welcomes the Link and then answers nothing: it reads every request
    (``reads``) or, once welcomed, stops reading, so the Link's sends fill the connection."""
    transport = MemoryTransport()

    async def handler(conn: Connection) -> None:
        hello = await conn.receive()
        await conn.send(p.Welcome(hello.req, "silent", 30.0, 10.0))
        with contextlib.suppress(ConnectionLost):  # (the Link closing it)
            while reads:
                await conn.receive()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", handler)
        async with Link.open(transport, "srv", lambda req: p.Hello(req, "client", "c"),
                             request_timeout=request_timeout) as link:
            yield link
        nursery.cancel_scope.cancel()


async def test_requests_time_out_at_their_deadlines_through_the_links_sweep(
    autojump_clock: trio.abc.Clock,
) -> None:
    timed_out: dict[str, float] = {}

    async def ask(link: Link, name: str, timeout: float | None) -> None:
        with pytest.raises(TimeoutError, match=f"within {timeout or 5.0} s"):
            await link.request(p.ListWorkers, timeout=timeout)
        timed_out[name] = trio.current_time()

    async with silent_server(request_timeout=5.0) as link:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(ask, link, f"swept-{i}", None)
            await trio.sleep(0.5)
            assert len(link._deadlines.queue) == 5, "waiting without scopes of their own"
            nursery.start_soon(ask, link, "shorter", 2.0)  # other timeouts: a scope each
            nursery.start_soon(ask, link, "longer", 7.0)
        assert {name: at - start for name, at in timed_out.items()} == {
            **{f"swept-{i}": pytest.approx(5.0) for i in range(5)},
            "shorter": pytest.approx(2.5), "longer": pytest.approx(7.5)}
        assert not link._deadlines.queue and link.in_flight == 0
        # A request given up by its caller leaves nothing behind either.
        with trio.move_on_after(1):
            await link.request(p.ListWorkers)
        assert not link._deadlines.queue and link.in_flight == 0


async def test_a_request_after_an_answered_one_times_out_on_time_whatever_came_before(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The sweep slept until the deadline of a request answered since (or for ever, after a
    # wait with no timeout): a new request wakes it for its own, earlier deadline.
    async with silent_server(request_timeout=2.0) as link:
        for first in (30.0, math.inf, 2.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(link.request, p.ListWorkers, timeout=first))
                await trio.sleep(0.1)
                ((req, waiter),) = link._waiting.items()
                waiter.value = p.Ok(req)  # answered, as the reader does
                waiter.done.set()
            await trio.sleep(0.5)  # the sweep sleeps on
            start = trio.current_time()
            with pytest.raises(TimeoutError, match="within 2.0 s"):
                await link.request(p.ListWorkers)
            assert trio.current_time() - start == pytest.approx(2.0)


async def test_a_request_not_to_be_resent_fails_at_once_on_a_closed_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = MemoryTransport()

    async def handler(conn: Any) -> None:
        hello = await conn.receive()
        await conn.send(p.Welcome(hello.req, "srv", 30.0, 10.0))
        await conn._receive.aclose()  # it stops reading: the client's sends now fail
        with contextlib.suppress(Exception):
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", handler)
        async with Link.open(transport, "srv", lambda req: p.Hello(req, "client", "c"),
                             request_timeout=5.0) as link:
            await trio.sleep(0.1)
            start = trio.current_time()
            with pytest.raises(ConnectionLost):
                await link.request(p.ListWorkers, retry=False)
            assert trio.current_time() == start
        nursery.cancel_scope.cancel()


async def test_a_request_that_cannot_be_sent_at_once_still_ends_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The server stops reading: the connection's buffer fills, and the requests behind it
    # wait to be sent (in a scope of their own) and still time out on time.
    from aiki.transport.memory import CONNECTION_BUFFER

    outcomes: list[tuple[float, bool]] = []

    async def ask(link: Link) -> None:
        with pytest.raises(TimeoutError, match="within 5.0 s"):
            await link.request(p.ListWorkers)
        outcomes.append((trio.current_time(), len(link._deadlines.queue) > 0))

    async with silent_server(reads=False, request_timeout=5.0) as link:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTION_BUFFER + 10):
                nursery.start_soon(ask, link)
        assert all(at - start == pytest.approx(5.0) for at, _ in outcomes)
        assert len(outcomes) == CONNECTION_BUFFER + 10
        assert not link._deadlines.queue and link.in_flight == 0


def test_a_run_that_starts_as_its_worker_is_cancelled_has_its_shields_stopped() -> None:
    # The worker's stopper stops the runs it finds held; a run whose actor got its state
    # just after (its assignment woken in the same round as the cancellation) stops its
    # shields itself, seeing its worker cancelled.
    from types import SimpleNamespace

    from aiki.actors.worker import Held
    from aiki.records import Lease

    async def main() -> list[str]:
        stopped: list[str] = []
        with trio.CancelScope() as worker:
            worker.cancel()  # from outside: the worker stops
            late = Held(Lease("r1", 1, "w"), trio.CancelScope())
            late.running(SimpleNamespace(stop=lambda: stopped.append("r1")))  # type: ignore[arg-type]
        live = Held(Lease("r2", 1, "w"), trio.CancelScope())
        live.running(SimpleNamespace(stop=lambda: stopped.append("r2")))  # type: ignore[arg-type]
        live.cancel()
        return stopped

    assert trio.run(main) == ["r1", "r2"]


async def test_a_lease_reported_lost_spares_the_newer_lease_of_the_same_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The heartbeat carried epoch 1; while it was on its way the run came back to this
    # worker under epoch 2 (it was queued again, the worker had room). The ack's "lost"
    # is about epoch 1: the epoch-2 actor keeps running.
    from aiki.actors.worker import Held
    from aiki.records import Lease

    w = worker(Severable(), [two_steps], "w1")
    old, new = Lease("r", 1, "w1"), Lease("r", 2, "w1")
    w.held["r"] = Held(old, trio.CancelScope())
    newer = Held(new, trio.CancelScope())

    class Beating:
        welcome = p.Welcome(1, "srv", 4.0, 1.0)
        beats: list[tuple[Lease, ...]] = []

        async def request(self, make: Any, timeout: float | None = None) -> Any:
            beat = make(0)
            self.beats.append(beat.leases)
            if len(self.beats) == 1:
                w.held["r"] = newer  # the new assignment arrives meanwhile
            await trio.sleep(0)
            lost = ("r",) if old in beat.leases else ()
            return p.HeartbeatAck(0, lost, None)

    link = Beating()
    with trio.move_on_after(2.5):
        await w._heartbeat(link)  # type: ignore[arg-type]
    assert w.held.get("r") is newer and not newer.scope.cancel_called
    assert link.beats[:2] == [(old,), (new,)]  # and the next beat renews the new lease


async def test_a_finished_runs_state_is_freed_without_the_cycle_collector(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A run's state (its actor's ``RunState``: some thirty objects) and the worker's
    ``Held`` entry refer to each other while it runs; once it ends, the worker lets go of
    the state, so reference counting frees it at once. Left to the cycle collector, runs in
    flight across its collections reached the oldest generation and stayed until a full
    collection (found with ``gc.DEBUG_SAVEALL``: 33 objects a run)."""
    import gc
    import weakref

    from aiki.actors.worker import Held

    states: list[weakref.ref[Any]] = []
    real = Held.running

    def running_state(self: Held, state: Any) -> None:
        states.append(weakref.ref(state))
        real(self, state)

    reset()
    gate("g-a").set()
    gate("g-b").set()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Held, "running", running_state)
            async with cluster(lease_ttl=10) as (server, transport, client):
                async with running(worker(transport, [two_steps], "w1")):
                    handle = await two_steps.enqueue(client, "g")
                    assert await handle.wait_for_completion(timeout=30) == ["done g-a",
                                                                            "done g-b"]
                    await trio.sleep(1)  # the run's actor has ended
                    assert len(states) == 1
                    assert states[0]() is None, gc.get_referrers(states[0]())
    finally:
        if was_enabled:
            gc.enable()
