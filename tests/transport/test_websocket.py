"""The WebSocket transport: real WebSocket framing (trio-websocket over wsproto) over
in-memory byte streams, in virtual time. Nothing here opens a socket."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trio_websocket as tw

from aiki import protocol as p
from aiki.errors import AuthenticationFailed, ConfigError, ConnectionLost, ProtocolError
from aiki.transport.base import Connection
from aiki.transport.websocket import (
    WebSocketSettings,
    WebSocketTransport,
    parse_address,
)

URL = "ws://aiki.test:9090"


@attrs.define
class Wire:
    """A client transport whose every connection is a memory stream served in-process."""

    server: WebSocketTransport
    client: WebSocketTransport
    streams: list[Any] = attrs.field(factory=list)


@asynccontextmanager
async def wire(
    handler: Callable[[Connection], Awaitable[None]],
    server: WebSocketSettings | None = None,
    client: WebSocketSettings | None = None,
    *, pair: Callable[[], Any] = trio.testing.memory_stream_pair,
) -> AsyncIterator[Wire]:
    server_transport = WebSocketTransport(server or WebSocketSettings())
    async with trio.open_nursery() as nursery:

        async def open_stream(host: str, port: int, context: ssl.SSLContext | None) -> Any:
            client_end, server_end = pair()
            result.streams.append(client_end)
            nursery.start_soon(server_transport.serve_stream, server_end, handler, "peer")
            return client_end

        client_transport = WebSocketTransport(client or WebSocketSettings(),
                                              open_stream=open_stream)
        result = Wire(server_transport, client_transport)
        async with client_transport:
            yield result
        nursery.cancel_scope.cancel()


async def echo(conn: Connection) -> None:
    """Answer each request with Ok(req); ProtocolErrors are answered with Refused."""
    while True:
        try:
            msg = await conn.receive()
        except ConnectionLost:
            return
        except ProtocolError as exc:
            await conn.send(p.Refused(-1, "ProtocolError", str(exc)))
            continue
        if isinstance(msg, p.Goodbye):
            await conn.send(p.Goodbye("bye"))
            return
        await conn.send(p.Ok(msg.req))


async def test_round_trip_and_goodbye_is_flushed_before_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with wire(echo) as w:
        conn = await w.client.connect(URL)
        assert conn.peer == URL
        for req in range(1, 4):
            await conn.send(p.GetRun(req, "r"))
            assert await conn.receive() == p.Ok(req)
        await conn.send(p.Goodbye("done"))
        assert await conn.receive() == p.Goodbye("bye")  # sent just before the server closed
        with pytest.raises(ConnectionLost, match="closed with code 1000"):
            await conn.receive()
        await conn.aclose()
        await conn.aclose()  # twice is fine


async def test_a_backlog_goes_out_as_batch_frames_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the socket is blocked, queued messages are sent together as a JSON array."""
    got: list[Any] = []
    reading = trio.Event()

    async def slow_reader(conn: Connection) -> None:
        await reading.wait()
        while len(got) < 100:
            got.append(await conn.receive())

    async with wire(slow_reader, pair=trio.testing.lockstep_stream_pair) as w:
        conn = await w.client.connect(URL)
        for req in range(100):
            await conn.send(p.Ok(req))
        reading.set()
        with trio.fail_after(5):
            while len(got) < 100:
                await trio.sleep(0.01)
        assert [m.req for m in got] == list(range(100))
        ws_conn: Any = conn
        assert ws_conn.messages_sent == 100
        assert ws_conn.frames_sent < 10, "a backlog should leave in few frames"


async def test_a_batch_respects_the_frame_limit(autojump_clock: trio.testing.MockClock) -> None:
    got: list[Any] = []
    reading = trio.Event()
    settings = WebSocketSettings(max_frame_bytes=2048)

    async def reader(conn: Connection) -> None:
        await reading.wait()
        while len(got) < 40:
            got.append(await conn.receive())

    async with wire(reader, settings, settings, pair=trio.testing.lockstep_stream_pair) as w:
        conn = await w.client.connect(URL)
        for req in range(40):
            await conn.send(p.GetRun(req, "x" * 300))  # ~330 bytes each
        reading.set()
        with trio.fail_after(5):
            while len(got) < 40:
                await trio.sleep(0.01)
        assert [m.req for m in got] == list(range(40))
        ws_conn: Any = conn
        assert ws_conn.frames_sent >= 40 * 330 // 2048  # several frames, none over the limit


async def raw_client(w: Wire, token: str | None = None) -> tw.WebSocketConnection:
    """A bare trio-websocket client on the wire, for sending frames the encoder never makes."""
    stream = await w.client.open_stream("aiki.test", 9090, None)
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    nursery = w.client._nursery
    assert nursery is not None
    return await tw.wrap_client_stream(nursery, stream, "aiki.test", "/",  # type: ignore[arg-type]
                                       extra_headers=headers)


async def messages(ws: tw.WebSocketConnection, n: int) -> list[Any]:
    """The next ``n`` messages, however the peer framed them."""
    out: list[Any] = []
    with trio.fail_after(10):
        while len(out) < n:
            out.extend(p.decode_frame(await ws.get_message()))
    assert len(out) == n
    return out


async def test_batch_frames_from_a_peer_are_split_and_bad_items_refused_one_by_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with wire(echo) as w:
        ws = await raw_client(w)
        await ws.send_message(json.dumps([
            {"type": "get_run", "req": 1, "run_id": "a"},
            {"type": "launch_missiles", "req": 2},
            7,
            {"type": "get_run", "req": 3, "run_id": "b"},
        ]))
        flat = await messages(ws, 4)
        assert flat[0] == p.Ok(1)
        assert isinstance(flat[1], p.Refused) and "unknown message type" in flat[1].message
        assert isinstance(flat[2], p.Refused) and "must be a JSON object" in flat[2].message
        assert flat[3] == p.Ok(3)
        for frame, expected in [("[]", "empty batch"), ("{nope", "not valid JSON"),
                                ("[" * 5000 + "]" * 5000, "nested too deeply")]:
            await ws.send_message(frame)
            [refused] = await messages(ws, 1)
            assert isinstance(refused, p.Refused) and expected in refused.message
        await ws.send_message(b'{"type": "get_run", "req": 9, "run_id": "bytes"}')
        assert await messages(ws, 1) == [p.Ok(9)]
        await ws.aclose()


async def test_a_frame_over_the_limit_closes_with_a_reason_and_others_are_untouched(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = WebSocketSettings(max_frame_bytes=4096)
    async with wire(echo, settings, settings) as w:
        good = await w.client.connect(URL)
        ws = await raw_client(w)
        await ws.send_message(json.dumps({"type": "get_run", "req": 1, "run_id": "x" * 5000}))
        with pytest.raises(tw.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1009
        assert "4096" in (closed.value.reason.reason or "")
        await good.send(p.GetRun(2, "fine"))
        assert await good.receive() == p.Ok(2)


# The codec writes non-ASCII characters as UTF-8, not as \u escapes: the limit counts bytes
# (1,500 snowmen are 4,500 of them), for one message and for a backlog's batches.
@pytest.mark.parametrize("big,small", [("x" * 5000, "small" * 60),
                                       ("\u2603" * 1500, "\u2603" * 300)],
                         ids=["ascii", "utf8-bytes-not-characters"])
async def test_sending_a_message_over_the_limit_is_refused_at_the_call_site(
    autojump_clock: trio.testing.MockClock, big: str, small: str,
) -> None:
    settings = WebSocketSettings(max_frame_bytes=4096)
    async with wire(echo, settings, settings) as w:
        conn = await w.client.connect(URL)
        with pytest.raises(ProtocolError, match=r"'get_run' message of \d+ bytes is over the "
                                                r"frame limit of 4096 bytes"):
            await conn.send(p.GetRun(1, big))
        for req in range(12):  # the connection is still fine; a backlog leaves in batches
            await conn.send(p.GetRun(req, small))
        assert [await conn.receive() for _ in range(12)] == [p.Ok(req) for req in range(12)]


@pytest.mark.parametrize("token,expected", [
    (None, "no token"),
    ("guess", "wrong token"),
])
async def test_a_missing_or_wrong_token_is_refused_before_anything_else(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
    token: str | None, expected: str,
) -> None:
    handled: list[Connection] = []

    async def handler(conn: Connection) -> None:
        handled.append(conn)

    caplog.set_level(logging.WARNING, "aiki.transport.websocket")
    async with wire(handler, WebSocketSettings(token="s3cret"),
                    WebSocketSettings(token=token)) as w:
        with pytest.raises(AuthenticationFailed, match=f"HTTP 401: authentication failed: "
                                                      f"{expected}"):
            await w.client.connect(URL)
        assert not handled, "the handler must never see an unauthenticated connection"
        assert f"refusing connection from peer: authentication failed: {expected}" in (
            caplog.text)


async def test_the_right_token_is_accepted(autojump_clock: trio.testing.MockClock) -> None:
    async with wire(echo, WebSocketSettings(token="s3cret"),
                    WebSocketSettings(token="s3cret")) as w:
        conn = await w.client.connect(URL)
        await conn.send(p.GetRun(1, "x"))
        assert await conn.receive() == p.Ok(1)


async def test_a_client_that_never_handshakes_is_disconnected(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "aiki.transport.websocket")
    async with wire(echo, WebSocketSettings(handshake_timeout=3)) as w:
        stream = await w.client.open_stream("aiki.test", 9090, None)
        start = trio.current_time()
        with trio.fail_after(10):
            assert await stream.receive_some() == b""  # closed by the server
        assert trio.current_time() - start == pytest.approx(3)
        assert "no WebSocket handshake within 3" in caplog.text


async def test_a_silent_peer_is_dropped_by_the_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that stops answering pings (frozen, partitioned) is dropped after the timeout,
    and the waiting receive fails with the reason."""
    frozen = trio.Event()

    class Freezable(trio.abc.Stream):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            data = await self.inner.receive_some(max_bytes)
            if frozen.is_set():
                await trio.sleep_forever()
            return data  # type: ignore[no-any-return]

        async def aclose(self) -> None:
            await self.inner.aclose()

    def pair() -> tuple[Any, Any]:
        a, b = trio.testing.memory_stream_pair()
        return a, Freezable(b)  # the server's side goes deaf when frozen

    async def server_hangs(conn: Connection) -> None:
        await trio.sleep_forever()

    client = WebSocketSettings(ping_interval=5, ping_timeout=2)
    async with wire(server_hangs, client=client, pair=pair) as w:
        conn = await w.client.connect(URL)
        frozen.set()
        start = trio.current_time()
        with pytest.raises(ConnectionLost, match="no answer to a ping within 2"):
            await conn.receive()
        assert trio.current_time() - start == pytest.approx(7)
        with pytest.raises(ConnectionLost, match="no answer to a ping"):
            await conn.send(p.Ok(1))


async def test_pings_keep_an_idle_connection_up(autojump_clock: trio.testing.MockClock) -> None:
    settings = WebSocketSettings(ping_interval=1, ping_timeout=1)
    async with wire(echo, settings, settings) as w:
        conn = await w.client.connect(URL)
        await trio.sleep(60)
        await conn.send(p.GetRun(1, "x"))
        assert await conn.receive() == p.Ok(1)


async def test_connect_failures_name_the_address(autojump_clock: trio.testing.MockClock) -> None:
    async def refuse(host: str, port: int, context: Any) -> Any:
        raise OSError(111, "Connection refused")

    async with WebSocketTransport(open_stream=refuse) as transport:
        with pytest.raises(ConnectionLost, match=r"cannot connect to ws://h:1: .*refused"):
            await transport.connect("ws://h:1")
    with pytest.raises(RuntimeError, match="async with WebSocketTransport"):
        await WebSocketTransport().connect("ws://h:1")


def test_addresses_parse_with_clear_errors() -> None:
    assert parse_address("127.0.0.1:9090").url == "ws://127.0.0.1:9090"
    assert parse_address("ws://localhost").port == 9090
    assert parse_address("[::1]:80", secure=True).url == "wss://[::1]:80"
    assert parse_address("wss://h:1/aiki?x=1").path == "/aiki?x=1"
    assert parse_address("127.0.0.1:0").is_loopback
    assert parse_address("localhost:1").is_loopback
    assert not parse_address("0.0.0.0:1").is_loopback
    assert not parse_address("example.com:1").is_loopback
    for bad, message in [("http://h:1", "must start with ws://"), ("ws://:1", "no host"),
                         ("ws://h:99999", "cannot parse"), ("ws://u:p@h:1", "credentials")]:
        with pytest.raises(ConfigError, match=message):
            parse_address(bad)


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        WebSocketSettings(max_frame_bytes=10)
    with pytest.raises(ConfigError, match="ping_timeout"):
        WebSocketSettings(ping_timeout=0)
    with pytest.raises(ConfigError, match="token is empty"):
        WebSocketSettings(token="")


@pytest.mark.parametrize("attempt", range(12))  # Trio's scheduling order varies run to run
async def test_a_shutdown_goodbye_reaches_the_peer_before_the_server_stops(
    autojump_clock: trio.testing.MockClock, attempt: int,
) -> None:
    """Server.serve stops everything as soon as no session is left. The session's goodbye
    used to sit in the connection's send queue, whose writer task that stop could cancel
    first: the worker saw a bare close instead of "the server is shutting down"."""
    from aiki.actors.session import Session
    from aiki.server import Server
    from aiki.sources import Sources
    from aiki.store import MemoryStore

    server = Server(MemoryStore(), Sources.seeded(1))
    transport = WebSocketTransport()
    client_end, server_end = trio.testing.memory_stream_pair()

    async def handler(conn: Connection) -> None:
        await Session.serve(server.ctx, conn)

    async def open_stream(host: str, port: int, context: Any) -> Any:
        return client_end

    async with trio.open_nursery() as serving:
        serving.start_soon(transport.serve_stream, server_end, handler, "peer")
        async with WebSocketTransport(open_stream=open_stream) as client:
            conn = await client.connect(URL)
            await conn.send(p.Hello(1, "worker", "w"))
            assert isinstance(await conn.receive(), p.Welcome)

            class StopWhenNoSession:
                def set(self) -> None:  # what Server.serve does at that moment, at once
                    serving.cancel_scope.cancel()

            server.ctx.no_sessions = StopWhenNoSession()  # type: ignore[assignment]
            server.stop()
            assert await conn.receive() == p.Goodbye("the server is shutting down")


# -- plain HTTP on the WebSocket port ------------------------------------------------------
async def http_get(transport: WebSocketTransport, request: bytes) -> bytes:
    """Send ``request`` as a plain HTTP client would, to a served stream; all it gets back."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.serve_stream, server_end, echo, "curl")
        await client_end.send_all(request)
        got = b""
        while chunk := await client_end.receive_some():
            got += chunk
    return got


async def test_plain_http_gets_a_clear_answer_not_an_empty_400(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from aiki.observability import HttpRequest, HttpResponse

    seen: list[HttpRequest] = []

    async def app(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(200, b"ok\n")

    bare = WebSocketTransport(WebSocketSettings())  # no app: what this port is, and 426
    answer = await http_get(bare, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"upgrade: websocket" in answer.lower() and b"This is an Aiki server" in answer
    served = WebSocketTransport(WebSocketSettings(), http=app)
    answer = await http_get(served, b"GET /health?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok\n")
    assert [(r.method, r.path) for r in seen] == [("GET", "/health")]
    head = await http_get(served, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
    post = await http_get(served, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0"
                                  b"\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"use GET" in post
    garbage = await http_get(served, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ") and b"not an HTTP request" in garbage
    assert len(seen) == 2


async def test_a_websocket_upgrade_still_works_beside_plain_http(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bytes read to tell HTTP from an upgrade are replayed to the WebSocket handshake."""
    from aiki.observability import HttpRequest, HttpResponse

    async def app(request: HttpRequest) -> HttpResponse:
        raise AssertionError("an upgrade never reaches the HTTP app")

    async with wire(echo) as w:
        w.server.http = app
        conn = await w.client.connect(URL)
        await conn.send(p.GetRun(1, "r"))
        assert await conn.receive() == p.Ok(1)
        await conn.aclose()
