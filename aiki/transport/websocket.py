"""The WebSocket transport: the Transport / Connection interface over trio-websocket.

Wire format: one WebSocket text frame carries one message (a JSON object from
:func:`aiki.protocol.encode`) or, when messages queue up faster than the socket takes them,
a JSON array of several (a *batch*). Nothing else is accepted.

Per connection:

- **Token in the handshake.** The client sends ``Authorization: Bearer <token>`` with its
  HTTP upgrade request; a server with a token compares it (in constant time) before it
  accepts the WebSocket, and refuses a missing or wrong one with HTTP 401 and a reason. No
  frame is read before that.
- **Maximum frame size** (``max_frame_bytes``, the same limit both ways). A peer that sends
  a larger frame is disconnected with close code 1009 and the limit in the reason; a local
  message larger than the limit is refused at ``send`` with :class:`ProtocolError`, and the
  connection stays usable. Batches are cut to stay under the limit.
- **Ping keepalive.** Every ``ping_interval`` seconds each side pings; a peer that does not
  answer within ``ping_timeout`` is dropped, so a dead or partitioned peer is noticed even
  when no message is due.
- **Handshake deadline.** A TCP client that does not finish the WebSocket handshake within
  ``handshake_timeout`` is disconnected (and logged).
- **Plain HTTP on the same port.** A request without ``Upgrade: websocket`` (``curl``, a
  Kubernetes probe, a Prometheus scrape) is answered by the server's ``http`` app
  (``/health``, ``/ready``, ``/metrics``), or with 426 and what this port is; it never
  reaches trio-websocket, which would refuse it with a bare 400.
- ``wss://``: the server gets an ``ssl.SSLContext`` with its certificate and key
  (:func:`server_ssl_context`); the client one that trusts it (:func:`client_ssl_context`).

Each connection runs a writer task (batches and sends the bounded outgoing queue) and a
keepalive task in a nursery that ends with the connection. Server connections live in the
``serve`` nursery; client connections in the transport's own, so a client transport is used
inside ``async with WebSocketTransport(...) as transport:``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket as tw

from aiki import protocol
from aiki.errors import AuthenticationFailed, ConfigError, ConnectionLost, ProtocolError
from aiki.observability import (
    HttpApp,
    HttpRequest,
    HttpResponse,
    ReplayStream,
    answer,
    is_websocket_upgrade,
    read_request,
)
from aiki.transport.base import Connection, Handler

log = logging.getLogger("aiki.transport.websocket")

DEFAULT_PORT = 9090
#: A stream opener for clients: ``(host, port, ssl_context) -> stream``. Tests and tools may
#: inject one (e.g. a memory stream) instead of TCP.
OpenStream = Callable[[str, int, "ssl.SSLContext | None"], Awaitable[trio.abc.Stream]]


@attrs.frozen
class WebSocketSettings:
    """Knobs of one side of the transport. Both sides should agree on ``max_frame_bytes``."""

    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    max_frame_bytes: int = 16 * 2**20
    max_batch: int = 256
    send_buffer: int = 256
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0

    def __attrs_post_init__(self) -> None:
        if self.max_frame_bytes < 1024:
            raise ConfigError(f"max_frame_bytes must be at least 1024, got {self.max_frame_bytes}")
        for name in ("max_batch", "send_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("ping_interval", "ping_timeout", "handshake_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, "
                                  f"got {getattr(self, name)!r}")
        if self.token is not None and not self.token:
            raise ConfigError("the token is empty; give a non-empty token or none")


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The TLS context for ``wss://`` serving, from a PEM certificate (chain) and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {certfile!r} with key {keyfile!r}: {exc}"
        ) from exc
    return context


def client_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """The TLS context for ``wss://`` clients: the system's CAs, or only ``cafile``'s."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA certificates from {cafile!r}: {exc}") from exc


# -- addresses ------------------------------------------------------------------------------
@attrs.frozen
class Endpoint:
    """Where to listen or connect: ``ws://host:port/path`` or ``wss://...``."""

    secure: bool
    host: str
    port: int
    path: str = "/"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = "" if self.path == "/" else self.path
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}{path}"

    @property
    def is_loopback(self) -> bool:
        """True if the host is a loopback address or ``localhost`` (no name lookup)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(address: str, *, secure: bool | None = None) -> Endpoint:
    """``ws://host:port[/path]``, ``wss://...`` or a bare ``host:port`` (``[::1]:9090`` for
    IPv6). A bare address is ``wss`` when ``secure`` says so. Raises :class:`ConfigError`."""
    text = address.strip()
    if "://" not in text:
        text = f"{'wss' if secure else 'ws'}://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"cannot parse address {address!r}: {exc}") from exc
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(
            f"address {address!r} must start with ws:// or wss:// (or be a bare host:port)"
        )
    if not parts.hostname:
        raise ConfigError(f"address {address!r} has no host (e.g. ws://127.0.0.1:9090)")
    if parts.username or parts.password:
        raise ConfigError(f"address {address!r} must not carry credentials; give a token")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme == "wss", parts.hostname,
                    DEFAULT_PORT if port is None else port, path)


# -- one connection -------------------------------------------------------------------------
def _describe_close(reason: tw.CloseReason | None) -> str:
    if reason is None:
        return "closed"
    text = f"closed with code {reason.code} ({reason.name})"
    return f"{text}: {reason.reason}" if reason.reason else text


@attrs.define(eq=False)
class WebSocketConnection:
    """One WebSocket connection speaking Aiki messages.

    ``send`` queues (bounded by ``send_buffer``: a slow socket slows its senders) and returns;
    the writer task sends whatever is queued as one frame. ``receive`` returns messages one
    at a time, in order, also those of a batch frame. ``aclose`` sends what is queued
    (within ``close_timeout``) and then closes the WebSocket.
    """

    peer: str
    _ws: tw.WebSocketConnection
    _stream: trio.abc.Stream
    _settings: WebSocketSettings
    _out_send: trio.MemorySendChannel[str] = attrs.field(init=False)
    _out_receive: trio.MemoryReceiveChannel[str] = attrs.field(init=False)
    _incoming: deque[Any] = attrs.field(factory=deque)
    _lost: str | None = None
    _writer_done: trio.Event = attrs.field(factory=trio.Event)
    _closed: trio.Event = attrs.field(factory=trio.Event)
    frames_sent: int = 0
    messages_sent: int = 0
    frames_received: int = 0

    def __attrs_post_init__(self) -> None:
        self._out_send, self._out_receive = trio.open_memory_channel[str](
            self._settings.send_buffer)

    def _frame_text(self, msg: Any) -> str:
        text = protocol.encode(msg)
        limit = self._settings.max_frame_bytes
        size = protocol.frame_bytes(text)
        if size > limit:
            tag = getattr(type(msg), "TAG", type(msg).__name__)
            raise ProtocolError(
                f"a {tag!r} message of {size} bytes is over the frame limit of "
                f"{limit} bytes; nothing was sent (raise max_frame_bytes on both sides, or "
                "send less)"
            )
        if self._lost is not None:
            raise ConnectionLost(self._lost)
        return text

    async def send(self, msg: Any) -> None:
        text = self._frame_text(msg)
        try:
            await self._out_send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost(self._lost or f"connection to {self.peer} is closed") from None

    def try_send(self, msg: Any) -> bool:
        text = self._frame_text(msg)
        try:
            self._out_send.send_nowait(text)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost(self._lost or f"connection to {self.peer} is closed") from None
        return True

    async def receive(self) -> Any:
        while not self._incoming:
            try:
                frame = await self._ws.get_message()
            except tw.ConnectionClosed as exc:
                why = self._lost or f"connection to {self.peer} {_describe_close(exc.reason)}"
                if exc.reason is not None and exc.reason.code == 1009:
                    log.warning("%s", why)  # a frame over the limit: we closed it
                raise ConnectionLost(why) from None
            self.frames_received += 1
            self._incoming.extend(protocol.decode_frame(frame))
        item = self._incoming.popleft()
        if isinstance(item, ProtocolError):
            raise item
        return item

    async def aclose(self) -> None:
        """Flush and close; safe to call twice and under cancellation (bounded, shielded)."""
        if self._closed.is_set():
            return
        self._out_send.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._settings.close_timeout):
                await self._writer_done.wait()
            with trio.move_on_after(self._settings.close_timeout):
                await self._ws.aclose()
            await self._abort()
        self._closed.set()

    # -- background work ---------------------------------------------------------------
    async def run(self) -> None:
        """The writer and keepalive; returns once the connection is closed or lost."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive)
            try:
                await self._write()
            finally:
                self._writer_done.set()
                nursery.cancel_scope.cancel()

    async def _write(self) -> None:
        settings = self._settings
        carry: str | None = None
        while True:
            if carry is not None:
                first, carry = carry, None
            else:
                try:
                    first = await self._out_receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return  # closed by us (aclose) or lost
            batch, size = [first], protocol.frame_bytes(first) + 2
            while len(batch) < settings.max_batch:
                try:
                    more = self._out_receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if size + protocol.frame_bytes(more) + 1 > settings.max_frame_bytes:
                    carry = more
                    break
                batch.append(more)
                size += protocol.frame_bytes(more) + 1
            try:
                await self._ws.send_message(protocol.encode_frame(batch))
            except tw.ConnectionClosed as exc:
                self._lose(f"connection to {self.peer} {_describe_close(exc.reason)}")
                return
            self.frames_sent += 1
            self.messages_sent += len(batch)

    async def _keepalive(self) -> None:
        settings = self._settings
        pings = 0
        while True:
            await trio.sleep(settings.ping_interval)
            pings += 1
            with trio.move_on_after(settings.ping_timeout) as waited:
                try:
                    await self._ws.ping(pings.to_bytes(8, "big"))
                except tw.ConnectionClosed:
                    return
            if waited.cancelled_caught:
                why = (f"connection to {self.peer} dropped: no answer to a ping within "
                       f"{settings.ping_timeout} s")
                log.warning("%s", why)
                self._lose(why)
                await self._abort()
                return

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        self._out_receive.close()  # senders now get ConnectionLost

    async def _abort(self) -> None:
        """Close the byte stream under the WebSocket, without a closing handshake (the peer
        may be gone); a ``receive`` waiting on it wakes up with ConnectionLost."""
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.close_timeout):
            await self._stream.aclose()


# -- the transport --------------------------------------------------------------------------
async def open_tcp(host: str, port: int, context: ssl.SSLContext | None) -> trio.abc.Stream:
    if context is None:
        return await trio.open_tcp_stream(host, port)
    return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context,
                                               https_compatible=True)


@attrs.define(eq=False)
class WebSocketTransport:
    """Serve (``serve``) or connect (``connect``, inside ``async with``) over WebSocket."""

    settings: WebSocketSettings = attrs.field(factory=WebSocketSettings)
    open_stream: OpenStream = open_tcp
    # What a server answers to plain HTTP requests on its port (None: 426 to every one).
    http: HttpApp | None = None
    connections: int = 0
    _nursery: trio.Nursery | None = None
    _nursery_cm: Any = None

    async def __aenter__(self) -> WebSocketTransport:
        """Open the nursery that client connections run in; leaving it closes them all."""
        if self._nursery_cm is not None:
            raise RuntimeError("this WebSocketTransport is already open")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._nursery is not None and self._nursery_cm is not None
        self._nursery.cancel_scope.cancel()
        try:
            # The body's own exception (if any) propagates as itself, not inside a group:
            # the connections' tasks never raise once connected.
            await self._nursery_cm.__aexit__(None, None, None)
        finally:
            self._nursery = self._nursery_cm = None

    # -- client side --------------------------------------------------------------------
    async def connect(self, address: str) -> Connection:
        """Open a connection to ``address`` (``ws://host:port`` or ``wss://...``).

        Raises :class:`AuthenticationFailed` if the server refuses the token, and
        :class:`ConnectionLost` (naming the address and the cause) for anything else.
        """
        if self._nursery is None:
            raise RuntimeError(
                "WebSocketTransport.connect needs the transport to be open: "
                "use `async with WebSocketTransport(...) as transport:`"
            )
        endpoint = parse_address(address)
        conn: WebSocketConnection = await self._nursery.start(self._client, endpoint)
        return conn

    async def _client(
        self, endpoint: Endpoint, *,
        task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One client connection: raises (to ``connect``) until it is up, never after."""
        settings = self.settings
        url = endpoint.url
        context = None
        if endpoint.secure:
            context = settings.ssl_context or client_ssl_context()
        try:
            with trio.fail_after(settings.handshake_timeout):
                stream = await self.open_stream(endpoint.host, endpoint.port, context)
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
        except (OSError, trio.BrokenResourceError) as exc:
            raise ConnectionLost(f"cannot connect to {url}: {_reason(exc)}") from exc
        except trio.TooSlowError:
            raise ConnectionLost(f"cannot connect to {url}: no answer within "
                                 f"{settings.handshake_timeout} s") from None
        headers = []
        if settings.token is not None:
            headers.append((b"authorization", f"Bearer {settings.token}".encode()))
        port = endpoint.port
        host_header = endpoint.host if port in (80, 443) else f"{endpoint.host}:{port}"
        conn: WebSocketConnection | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(settings.handshake_timeout) as waited:
                    ws = await tw.wrap_client_stream(
                        nursery, stream, host_header, endpoint.path,  # type: ignore[arg-type]
                        extra_headers=headers, max_message_size=settings.max_frame_bytes,
                    )
                if waited.cancelled_caught:
                    raise ConnectionLost(f"no WebSocket handshake from {url} within "
                                         f"{settings.handshake_timeout} s")
                self.connections += 1
                conn = WebSocketConnection(url, ws, stream, settings)
                task_status.started(conn)
                try:
                    await conn.run()
                finally:
                    await conn.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            failure = _sole(group)
            if isinstance(failure, tw.ConnectionRejected):
                body = (failure.body or b"").decode("utf-8", "replace").strip()
                cls = AuthenticationFailed if failure.status_code in (401, 403) else ConnectionLost
                raise cls(f"{url} refused the connection: HTTP {failure.status_code}"
                          + (f": {body}" if body else "")) from None
            if isinstance(failure, ConnectionLost) and conn is None:
                raise failure from None
            if conn is None or not isinstance(failure, Exception):
                raise
            log.error("connection to %s failed", url, exc_info=failure)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(settings.close_timeout):
                await stream.aclose()

    # -- server side --------------------------------------------------------------------
    async def serve(
        self, address: str, handler: Handler, *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` (``host:port``, port 0 for any free one) and serve each
        connection with ``handler``; ``task_status.started`` gets the URL to connect to."""
        endpoint = parse_address(address, secure=self.settings.ssl_context is not None)
        if endpoint.secure and self.settings.ssl_context is None:
            raise ConfigError(f"cannot serve {address!r}: wss:// needs a certificate and key")
        listeners: list[Any]
        try:
            if self.settings.ssl_context is None:
                listeners = list(await trio.open_tcp_listeners(endpoint.port, host=endpoint.host))
            else:
                listeners = list(await trio.open_ssl_over_tcp_listeners(
                    endpoint.port, self.settings.ssl_context, host=endpoint.host,
                    https_compatible=True))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {endpoint.host}:{endpoint.port}: {exc}") from exc
        if endpoint.port == 0 and len(listeners) > 1:
            # Each listener got its own free port; keep one so there is one address.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        first = listeners[0]
        socket = first.transport_listener.socket if hasattr(first, "transport_listener") \
            else first.socket
        port = socket.getsockname()[1]
        bound = attrs.evolve(endpoint, secure=self.settings.ssl_context is not None, port=port)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                trio.serve_listeners, partial(self.serve_stream, handler=handler), listeners,
                handler_nursery=nursery,
            ))
            log.info("listening on %s", bound.url)
            task_status.started(bound.url)

    async def serve_stream(self, stream: trio.abc.Stream, handler: Handler,
                           peer: str | None = None) -> None:
        """Serve one accepted byte stream: handshake, token check, then ``handler``.

        Never raises (except Cancelled): whatever goes wrong with one connection is logged
        and ends that connection only.
        """
        name = peer or _peer_name(stream)
        try:
            await self._serve_stream(stream, handler, name)
        except Exception as exc:
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.info("connection from %s broke: %r", name, exc)
            else:
                log.exception("connection from %s failed", name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.settings.close_timeout):
                await stream.aclose()

    async def _serve_stream(self, stream: trio.abc.Stream, handler: Handler, name: str) -> None:
        settings = self.settings
        if isinstance(stream, trio.SSLStream):
            with trio.move_on_after(settings.handshake_timeout) as waited:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.warning("TLS handshake with %s failed: %s", name, exc.__cause__ or exc)
                    return
            if waited.cancelled_caught:
                log.warning("closing connection from %s: no TLS handshake within %s s",
                            name, settings.handshake_timeout)
                return
        deadline = trio.current_time() + settings.handshake_timeout
        with trio.move_on_at(deadline) as waited:
            http_conn, head, raw = await read_request(stream)
            if head is None or not is_websocket_upgrade(head):
                await answer(stream, http_conn, head, self.http or _upgrade_required)
                return
        if waited.cancelled_caught:
            log.warning("closing connection from %s: no WebSocket handshake within %s s",
                        name, settings.handshake_timeout)
            return
        stream = ReplayStream(stream, raw)
        async with trio.open_nursery() as nursery:
            with trio.move_on_at(deadline) as waited:
                request = await tw.wrap_server_stream(
                    nursery, stream, max_message_size=settings.max_frame_bytes)
            if waited.cancelled_caught:
                log.warning("closing connection from %s: no WebSocket handshake within %s s",
                            name, settings.handshake_timeout)
                nursery.cancel_scope.cancel()
                return
            refusal = self._check_token(request)
            if refusal is not None:
                log.warning("refusing connection from %s: %s", name, refusal)
                with trio.move_on_after(settings.close_timeout):
                    await request.reject(401, body=refusal.encode())
                nursery.cancel_scope.cancel()
                return
            ws = await request.accept()
            conn = WebSocketConnection(name, ws, stream, settings)
            async with trio.open_nursery() as inner:
                inner.start_soon(conn.run)
                try:
                    await handler(conn)
                finally:
                    await conn.aclose()
            nursery.cancel_scope.cancel()

    def _check_token(self, request: tw.WebSocketRequest) -> str | None:
        """Why this handshake is refused, or None to accept it."""
        expected = self.settings.token
        if expected is None:
            return None
        given = [v for k, v in request.headers if k.lower() == b"authorization"]
        if not given:
            return "authentication failed: no token (send 'Authorization: Bearer <token>')"
        scheme, _, token = given[0].partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(),
                                                                  expected.encode()):
            return "authentication failed: wrong token"
        return None


UPGRADE_REQUIRED = (
    "This is an Aiki server: it speaks WebSocket here (connect with aiki.connect(), or "
    "`aiki runs --server ...`). Plain HTTP: /health, /ready, /metrics.\n")


async def _upgrade_required(request: HttpRequest) -> HttpResponse:
    return HttpResponse(426, UPGRADE_REQUIRED.encode(), headers=(("upgrade", "websocket"),))


def _reason(exc: BaseException) -> str:
    """Why a connect failed: trio says "all attempts to connect failed" and keeps each
    attempt's error in a group as the cause."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return f"{exc}: {cause}" if cause is not None else str(exc)


def _sole(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception a group holds (looking through nested groups), else None."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def _peer_name(stream: trio.abc.Stream) -> str:
    inner = getattr(stream, "transport_stream", stream)
    socket = getattr(inner, "socket", None)
    if socket is not None:
        try:
            host, port, *_ = socket.getpeername()
            return f"{host}:{port}"
        except OSError:
            pass
    return type(stream).__name__


__all__ = [
    "UPGRADE_REQUIRED", "Endpoint", "WebSocketConnection", "WebSocketSettings",
    "WebSocketTransport", "client_ssl_context", "parse_address", "server_ssl_context",
]
