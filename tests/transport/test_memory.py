"""The in-process transport: serve/connect, closing, errors, and handler lifetime."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from aiki import protocol
from aiki.errors import ConnectionLost, ProtocolError
from aiki.records import Lease
from aiki.transport.base import Connection
from aiki.transport.memory import MemoryTransport, connection_pair


async def serve_in(
    scope: trio.CancelScope,
    transport: MemoryTransport,
    address: str,
    handler: Any,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """transport.serve inside ``scope``, so a test can stop that one server."""
    with scope:
        await transport.serve(address, handler, task_status=task_status)


async def echo(conn: Connection) -> None:
    """Answer every request with Ok(req) until the peer goes away or says goodbye."""
    while True:
        try:
            msg = await conn.receive()
        except ConnectionLost:
            return
        if isinstance(msg, protocol.Goodbye):
            return
        await conn.send(protocol.Ok(msg.req))


async def test_round_trip_both_ways(autojump_clock: trio.testing.MockClock) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(transport.serve, "server", echo)
        assert bound == "server"
        conn = await transport.connect("server")
        assert conn.peer == "server"
        for req in range(1, 6):
            await conn.send(protocol.GetRun(req, f"run-{req}"))
            assert await conn.receive() == protocol.Ok(req)
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_server_initiated_messages_and_rich_payloads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    received: list[Any] = []
    peers: list[str] = []
    lease = Lease("run-1", 3, "worker-é")

    async def handler(conn: Connection) -> None:
        peers.append(conn.peer)
        await conn.send(protocol.Welcome(0, "srv", 30.0, 5.0))
        received.append(await conn.receive())
        await conn.send(protocol.HeartbeatAck(1, ("run-1",)))

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", handler)
        conn = await transport.connect("srv")
        assert await conn.receive() == protocol.Welcome(0, "srv", 30.0, 5.0)
        await conn.send(protocol.Heartbeat(1, (lease,)))
        assert await conn.receive() == protocol.HeartbeatAck(1, ("run-1",))
        assert received == [protocol.Heartbeat(1, (lease,))]
        assert peers and peers[0] != "srv"
        nursery.cancel_scope.cancel()


async def test_many_clients_are_served_concurrently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", echo)
        conns = [await transport.connect("srv") for _ in range(5)]
        assert len({c.peer for c in conns}) == 1
        for i, conn in enumerate(conns):
            await conn.send(protocol.GetRun(i, "r"))
        for i, conn in reversed(list(enumerate(conns))):
            assert await conn.receive() == protocol.Ok(i)
        nursery.cancel_scope.cancel()


async def test_connect_to_unserved_address_raises_connection_lost() -> None:
    transport = MemoryTransport()
    with pytest.raises(ConnectionLost, match="nowhere-at-all"):
        await transport.connect("nowhere-at-all")


async def test_serving_an_address_twice_raises_os_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "busy", echo)
        with pytest.raises(OSError, match="busy"):
            await nursery.start(transport.serve, "busy", echo)
        # The first server is unaffected.
        conn = await transport.connect("busy")
        await conn.send(protocol.GetRun(7, "r"))
        assert await conn.receive() == protocol.Ok(7)
        # Another address on the same transport is fine.
        await nursery.start(transport.serve, "other", echo)
        nursery.cancel_scope.cancel()


async def test_address_is_released_when_serve_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        await nursery.start(serve_in, scope, transport, "addr", echo)
        scope.cancel()
    with pytest.raises(ConnectionLost, match="addr"):
        await transport.connect("addr")
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "addr", echo)
        conn = await transport.connect("addr")
        await conn.send(protocol.GetRun(1, "r"))
        assert await conn.receive() == protocol.Ok(1)
        nursery.cancel_scope.cancel()


async def test_client_close_is_seen_by_the_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    seen: list[Any] = []
    done = trio.Event()

    async def handler(conn: Connection) -> None:
        try:
            while True:
                seen.append(await conn.receive())
        except ConnectionLost as exc:
            seen.append(exc)
        done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", handler)
        conn = await transport.connect("srv")
        await conn.send(protocol.Goodbye("bye"))
        await conn.aclose()
        with trio.fail_after(5):
            await done.wait()
        # Messages sent before the close are delivered first, then ConnectionLost.
        assert seen[0] == protocol.Goodbye("bye")
        assert isinstance(seen[1], ConnectionLost)
        nursery.cancel_scope.cancel()


async def test_after_one_end_closes_the_other_cannot_receive_or_send() -> None:
    a, b = connection_pair("a", "b")
    assert a.peer == "b" and b.peer == "a"
    await a.send(protocol.Ok(1))
    await a.aclose()
    assert await b.receive() == protocol.Ok(1)
    with pytest.raises(ConnectionLost, match="a"):
        await b.receive()
    with pytest.raises(ConnectionLost):
        await b.send(protocol.Ok(2))
    # The closed end itself refuses both ways too.
    with pytest.raises(ConnectionLost):
        await a.send(protocol.Ok(3))
    with pytest.raises(ConnectionLost):
        await a.receive()
    await b.aclose()
    await a.aclose()  # closing twice is harmless


async def test_receive_blocked_when_peer_closes_raises_connection_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = connection_pair("a", "b")
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            await b.receive()
        except ConnectionLost as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)
        assert outcome == []
        await a.aclose()
    assert len(outcome) == 1


async def test_sending_a_non_message_raises_protocol_error_and_connection_survives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", echo)
        conn = await transport.connect("srv")
        for bad in (object(), {"type": "ok", "req": 1}, "ok", protocol.WorkflowRef("w", "1")):
            with pytest.raises(ProtocolError, match="not a protocol message"):
                await conn.send(bad)
        await conn.send(protocol.GetRun(9, "r"))
        assert await conn.receive() == protocol.Ok(9)
        nursery.cancel_scope.cancel()


async def test_undecodable_text_raises_protocol_error_and_connection_survives() -> None:
    a, b = connection_pair("a", "b")
    # Bypass the sender's encoder to put garbage on the wire.
    await a._send.send("this is not json")
    await a._send.send('{"type": "no_such_message"}')
    await a.send(protocol.Ok(1))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        await b.receive()
    with pytest.raises(ProtocolError, match="no_such_message"):
        await b.receive()
    assert await b.receive() == protocol.Ok(1)


async def test_handler_connection_is_closed_when_the_handler_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    server_ends: list[Connection] = []

    async def handler(conn: Connection) -> None:
        server_ends.append(conn)
        await conn.send(protocol.Goodbye("done"))

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "srv", handler)
        conn = await transport.connect("srv")
        with trio.fail_after(5):
            assert await conn.receive() == protocol.Goodbye("done")
            with pytest.raises(ConnectionLost):
                await conn.receive()
        # aclose() closes the two directions one after the other (with a checkpoint between
        # them), so give the server end a moment to finish closing before sending.
        await trio.sleep(1)
        with pytest.raises(ConnectionLost):
            await conn.send(protocol.Ok(1))
        with pytest.raises(ConnectionLost):
            await server_ends[0].send(protocol.Ok(1))
        nursery.cancel_scope.cancel()


async def test_handler_connection_is_closed_when_the_handler_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()

    async def handler(conn: Connection) -> None:
        await conn.receive()
        raise RuntimeError("handler blew up")

    expected = pytest.RaisesExc(RuntimeError, match="blew up")
    with pytest.RaisesGroup(expected, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve, "srv", handler)
            conn = await transport.connect("srv")
            await conn.send(protocol.Ok(1))
            with trio.fail_after(5), pytest.raises(ConnectionLost):
                await conn.receive()
            await trio.sleep_forever()


async def test_stopping_serve_cancels_handlers_and_closes_their_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    started = trio.Event()

    async def handler(conn: Connection) -> None:
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        await nursery.start(serve_in, scope, transport, "srv", handler)
        conn = await transport.connect("srv")
        await started.wait()
        scope.cancel()
        with trio.fail_after(5), pytest.raises(ConnectionLost):
            await conn.receive()


async def test_connection_accepted_during_shutdown_is_not_left_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        await nursery.start(serve_in, scope, transport, "srv", echo)
        scope.cancel()  # serve has not run its cleanup yet: no checkpoint since
        conn = await transport.connect("srv")  # succeeds: the address is still listed
    # serve has stopped; the connection it queued must not be left open.
    with trio.move_on_after(60) as timeout, pytest.raises(ConnectionLost):
        await conn.send(protocol.GetRun(1, "r"))  # the server end is closed: this or
        await conn.receive()  # the receive raises, instead of waiting forever
    assert not timeout.cancelled_caught, "receive() still blocked 60 s after serve stopped"


@pytest.mark.parametrize("check_wire", [False, True])
async def test_unchecked_mode_hands_objects_over_checked_mode_round_trips(
    check_wire: bool, autojump_clock: trio.testing.MockClock,
) -> None:
    """Embedded mode passes message objects as they are; the checked mode (the tests'
    default, AIKI_CHECK_WIRE=1) decodes a fresh equal copy. Both refuse what the codec would
    refuse, and both decode raw text as a network peer's."""
    a, b = connection_pair("a", "b", check_wire=check_wire)
    msg = protocol.GetRun(1, "run-1")
    await a.send(msg)
    got = await b.receive()
    assert got == msg
    assert (got is msg) is (not check_wire)
    for bad in (object(), protocol.WorkflowRef("w", "1")):
        with pytest.raises(ProtocolError, match="not a protocol message"):
            await a.send(bad)
    await a.send_raw('{"type": "ok", "req": 2}')
    assert await b.receive() == protocol.Ok(2)


def test_check_wire_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIKI_CHECK_WIRE", "1")
    assert MemoryTransport().check_wire
    monkeypatch.setenv("AIKI_CHECK_WIRE", "0")
    assert not MemoryTransport().check_wire
    monkeypatch.delenv("AIKI_CHECK_WIRE")
    assert not MemoryTransport().check_wire


async def test_embedded_mode_skips_the_codec_and_the_testing_kit_keeps_it(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    import aiki
    import aiki.testing

    monkeypatch.delenv("AIKI_CHECK_WIRE")
    async with aiki.embedded("memory") as client:
        assert isinstance(client.transport, MemoryTransport)
        assert not client.transport.check_wire
    async with aiki.embedded("memory", check_wire=True) as client:
        assert isinstance(client.transport, MemoryTransport)
        assert client.transport.check_wire
    async with aiki.testing.environment([]) as env:
        assert isinstance(env.client.transport, MemoryTransport)
        assert env.client.transport.check_wire
