"""What an operator reaches over plain HTTP: ``/metrics``, ``/health`` and ``/ready``.

Two ways in, one set of answers (an :data:`HttpApp`):

- ``--metrics-listen HOST:PORT`` (server and worker): :func:`serve_http` listens there.
- The server's own WebSocket port: a request without ``Upgrade: websocket`` never reaches
  trio-websocket (which would answer 400 with an empty body, since wsproto refuses it), but
  is answered here (:func:`read_request`, then :func:`respond`); an upgrade goes on to the
  WebSocket handshake with the bytes already read replayed (:class:`ReplayStream`).

HTTP is parsed by h11 (the parser under wsproto and trio-websocket, so no new dependency);
the Prometheus text (or OpenMetrics, by the ``Accept`` header) is written by
prometheus-client from the :class:`~aiki.metrics.Metrics` sink, only when scraped. Each
connection answers one request and closes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

from aiki.metrics import CATALOG, Metric, Metrics

log = logging.getLogger("aiki.http")

MAX_HEAD = 16 * 1024  # bytes of request line and headers


@attrs.frozen
class HttpRequest:
    method: str
    path: str  # without the query string
    headers: tuple[tuple[str, str], ...]  # names in lower case

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any, **kwargs: Any) -> HttpResponse:
        return cls(status, (json.dumps(value) + "\n").encode(), "application/json", **kwargs)


HttpApp = Callable[[HttpRequest], Awaitable[HttpResponse]]


# -- the Prometheus text ------------------------------------------------------------------------
def render(metrics: Metrics, accept: str | None = None, *,
           sides: Iterable[str] = ("server", "worker")) -> tuple[bytes, str]:
    """The sink's metrics of these ``sides`` in the exposition format the ``Accept`` header
    asks for (Prometheus text by default, OpenMetrics if asked); the body and its type."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    wanted = set(sides)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, [m for m in CATALOG if m.side in wanted]))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


@attrs.define(eq=False)
class _Collector:
    metrics: Metrics
    which: list[Metric]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        for m in self.which:
            series = sorted(self.metrics.series(m).items())
            labels = list(m.labels)
            family: Any
            if m.kind == "histogram":
                family = HistogramMetricFamily(m.name, m.help, labels=labels)
                for values, hist in series:
                    family.add_metric(
                        list(values),
                        [(_le(b), n) for b, n in hist.cumulative()], hist.sum)
            else:
                cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
                family = cls(m.name, m.help, labels=labels)
                if not series and not labels:
                    series = [((), 0.0)]  # a label-less metric is always there, from 0
                for values, value in series:
                    family.add_metric(list(values), value)
            yield family


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``+Inf``, ``1.0``, ``0.25``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


# -- HTTP over a Trio stream --------------------------------------------------------------------
async def read_request(stream: trio.abc.Stream) -> tuple[h11.Connection, h11.Request | None,
                                                        bytes]:
    """Read one request's head: the h11 connection (to answer on), the request (None if the
    peer closed or sent something that is not HTTP), and every byte read so far."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return conn, None, bytes(raw)
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(4096))
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return conn, event, bytes(raw)
        return conn, None, bytes(raw)


def request_of(event: h11.Request) -> HttpRequest:
    target = event.target.decode("latin-1")
    return HttpRequest(
        event.method.decode("ascii", "replace"), target.split("?", 1)[0],
        tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers))


def is_websocket_upgrade(event: h11.Request) -> bool:
    return any(k.lower() == b"upgrade" and b"websocket" in v.lower() for k, v in event.headers)


async def respond(stream: trio.abc.Stream, conn: h11.Connection, request: HttpRequest | None,
                  response: HttpResponse) -> None:
    """Send ``response`` (no body to a HEAD) and say the connection closes."""
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body))),
               ("cache-control", "no-store"), ("connection", "close"), *response.headers]
    if conn.our_state is not h11.SEND_RESPONSE:  # the request was not HTTP: answer raw
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
    reason = HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if request is None or request.method != "HEAD":
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def answer(stream: trio.abc.Stream, conn: h11.Connection, event: h11.Request | None,
                 app: HttpApp) -> None:
    """Answer one plain HTTP request with ``app`` (400 for what is not HTTP)."""
    if event is None:
        await respond(stream, conn, None, HttpResponse(400, b"not an HTTP request\n"))
        return
    request = request_of(event)
    if request.method not in ("GET", "HEAD"):
        response = HttpResponse(405, f"{request.method} is not allowed: use GET\n".encode(),
                                headers=(("allow", "GET, HEAD"),))
    else:
        try:
            response = await app(request)
        except Exception:
            log.exception("answering %s %s failed", request.method, request.path)
            response = HttpResponse(500, b"internal error: see the server's log\n")
    log.debug("http %s %s -> %d", request.method, request.path, response.status)
    await respond(stream, conn, request, response)


async def serve_http(app: HttpApp, host: str, port: int, *, timeout: float = 10.0,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` (0: any free port, given to ``task_status``) until
    cancelled; each connection gets one answer within ``timeout`` seconds."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def one(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(timeout):
                conn, event, _ = await read_request(stream)
                await answer(stream, conn, event, app)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, one, listeners[:1])
        for extra in listeners[1:]:
            await extra.aclose()
        log.info("metrics and health on http://%s:%d/metrics",
                 f"[{host}]" if ":" in host else host, bound)
        task_status.started(bound)


@attrs.define(eq=False)
class ReplayStream(trio.abc.Stream):
    """``stream`` with ``head`` (bytes already read from it) received again first."""

    stream: trio.abc.Stream
    head: bytes

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.head:
            size = len(self.head) if max_bytes is None else max_bytes
            data, self.head = self.head[:size], self.head[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- the answers ---------------------------------------------------------------------------------
NOT_FOUND = "no such page: try /metrics, /health or /ready"


def routes(metrics_page: Callable[[HttpRequest], Awaitable[HttpResponse]],
           live: Callable[[], Awaitable[tuple[bool, str]]],
           ready: Callable[[], Awaitable[tuple[bool, str]]]) -> HttpApp:
    """The app of ``--metrics-listen``: /metrics, /health (live), /ready."""

    async def app(request: HttpRequest) -> HttpResponse:
        if request.path == "/metrics":
            return await metrics_page(request)
        if request.path in ("/health", "/ready"):
            ok, why = await (live() if request.path == "/health" else ready())
            return HttpResponse.json(200 if ok else 503,
                                     {"status": "ok" if ok else "unavailable", "detail": why})
        return HttpResponse(404, f"{NOT_FOUND}\n".encode())

    return app


def metrics_page(metrics: Metrics, *, sides: Iterable[str],
                 refresh: Callable[[], Awaitable[None]] | None = None
                 ) -> Callable[[HttpRequest], Awaitable[HttpResponse]]:
    """``/metrics``: ``refresh`` the gauges read on demand, then render the sink."""
    sides = tuple(sides)

    async def page(request: HttpRequest) -> HttpResponse:
        if refresh is not None:
            await refresh()
        body, content_type = render(metrics, request.header("accept"), sides=sides)
        return HttpResponse(200, body, content_type)

    return page
