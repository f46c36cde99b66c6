"""A worker id belongs to one live session (issue 16): a second process with a live id is
refused naming the holder, a reconnection takes its id over at once, and a worker silent for
longer than a lease loses its id to a new one and is told so. In virtual time over the memory
transport."""

from __future__ import annotations

import pytest
import trio

from aiki import protocol as p
from aiki.errors import WorkerIdInUse
from aiki.transport.base import Connection
from tests.actors.test_link_and_worker import cluster, gate, reset, running, two_steps, worker


async def hello_as_worker(conn: Connection, worker_id: str, incarnation: str) -> None:
    """Say hello on a raw connection, as a worker process would, and expect a welcome."""
    await conn.send(p.Hello(1, "worker", worker_id, (p.WorkflowRef("two-steps", "1"),), 1,
                            incarnation=incarnation))
    assert isinstance(await conn.receive(), p.Welcome)


async def test_a_second_worker_with_a_live_id_is_refused_naming_the_holder(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        first = worker(transport, [two_steps], "w1")
        async with running(first):
            second = worker(transport, [two_steps], "w1")
            second.incarnation = "another-process"  # seeded alike, else the same
            connects = transport.connects
            with pytest.raises(WorkerIdInUse, match=r"worker id 'w1' is in use by a live "
                                                    r"worker \(session \d+ from \S+, last heard"):
                await second.run()
            assert transport.connects == connects + 1, "a refused id is not retried"
            # The first worker is untouched: still listed, still connected, still working.
            await trio.sleep(30)  # past several heartbeats and lease ttls
            assert [w.id for w in await client.list_workers()] == ["w1"]
            assert first.link is not None and first.link.connections == 1
            gate("x-a").set()
            gate("x-b").set()
            handle = await two_steps.enqueue(client, "x")
            assert await handle.wait_for_completion(timeout=30) == ["done x-a", "done x-b"]


async def test_a_reconnection_takes_its_id_over_at_once_and_the_old_session_is_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The same process (same incarnation) says hello again while the server still holds its
    old, half-open connection: the new session wins and the old one is closed."""
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        old = await transport.inner.connect("srv")
        await hello_as_worker(old, "w1", "inc-1")
        w1 = worker(transport, [two_steps], "w1")
        w1.incarnation = "inc-1"
        async with running(w1):
            goodbye = await old.receive()
            assert isinstance(goodbye, p.Goodbye) and goodbye.error_type is None
            assert "reconnected" in goodbye.reason
            assert [w.id for w in await client.list_workers()] == ["w1"]
            gate("r-a").set()
            gate("r-b").set()
            handle = await two_steps.enqueue(client, "r")
            assert await handle.wait_for_completion(timeout=30) == ["done r-a", "done r-b"]


async def test_a_worker_silent_for_longer_than_a_lease_loses_its_id_and_is_told(
    autojump_clock: trio.abc.Clock,
) -> None:
    reset()
    async with cluster(lease_ttl=10) as (server, transport, client):
        frozen = await transport.inner.connect("srv")
        await hello_as_worker(frozen, "w1", "frozen-process")
        await trio.sleep(11)  # no heartbeat for longer than the lease ttl
        async with running(worker(transport, [two_steps], "w1")) as w1:
            assert w1.incarnation != "frozen-process"
            goodbye = await frozen.receive()
            assert isinstance(goodbye, p.Goodbye) and goodbye.error_type == "WorkerIdInUse"
            assert "taken over" in goodbye.reason and "silent for 11.0 s" in goodbye.reason
            [listed] = await client.list_workers()
            assert listed.id == "w1" and listed.slots == w1.max_concurrent_runs


async def test_a_worker_heard_from_within_the_lease_keeps_its_id(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Any message counts as a sign of life, not only the time since the hello."""
    async with cluster(lease_ttl=10) as (server, transport, client):
        holder = await transport.inner.connect("srv")
        await hello_as_worker(holder, "w1", "alive")
        for req in range(2, 5):
            await trio.sleep(6)
            await holder.send(p.Heartbeat(req, ()))
            ack = await holder.receive()
            assert isinstance(ack, p.HeartbeatAck) and (ack.req, ack.lost) == (req, ())
            assert ack.server_time is not None  # the server's clock, for deadlines
        second = worker(transport, [two_steps], "w1")
        assert second.incarnation != "alive"
        with pytest.raises(WorkerIdInUse, match="last heard 0.0 s ago"):
            await second.run()


async def test_an_id_whose_connection_closed_is_free_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cluster(lease_ttl=10) as (server, transport, client):
        async with running(worker(transport, [two_steps], "w1")):
            pass  # left normally
        async with running(worker(transport, [two_steps], "w1")):
            assert [w.id for w in await client.list_workers()] == ["w1"]
