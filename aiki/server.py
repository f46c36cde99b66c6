"""The server: its supervision tree (StoreWriter, Dispatcher, Timer, listener with one Session
per connection) assembled from a configuration. The server never imports user code.

:class:`Server` is the tree over any Transport (memory in embedded mode, the simulation's
network); :func:`run_server` is the ``aiki server`` process: a :class:`ServerConfig`, the
store it names, the WebSocket transport, and SIGINT / SIGTERM handling.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable

import attrs
import trio

from aiki.actors.dispatcher import Dispatcher
from aiki.actors.doubts import Doubts
from aiki.actors.retention import Retention
from aiki.actors.session import ServerContext, Session
from aiki.actors.store_writer import StoreWriter
from aiki.actors.supervisor import ChildSpec, Supervisor
from aiki.actors.timer import LeaseClock, ObservedClock, Timer
from aiki.actors.watchers import RunWatchers
from aiki.errors import ConfigError
from aiki.metrics import OLDEST_QUEUED, RUNS_NOW, SESSIONS, SLOTS, WORKERS
from aiki.observability import (
    HttpApp,
    HttpRequest,
    HttpResponse,
    metrics_page,
    routes,
    serve_http,
)
from aiki.protocol import Nudge
from aiki.records import RunRecord
from aiki.sources import Sources
from aiki.store import open_store, redact_url
from aiki.store.base import Store
from aiki.store.machine import started_by_a_schedule
from aiki.store.ops import Outcomes
from aiki.transport.base import Connection, Transport
from aiki.transport.websocket import (
    UPGRADE_REQUIRED,
    Endpoint,
    WebSocketSettings,
    WebSocketTransport,
    parse_address,
    server_ssl_context,
)

log = logging.getLogger("aiki.server")
SHARED_STORE_POLL = 30.0


@attrs.define(eq=False)
class Server:
    """One Aiki server over ``store``. ``await nursery.start(server.serve, transport, address)``
    returns once it accepts connections, with the address it listens on.

    ``serve`` runs until cancelled, or until :meth:`stop` asks for a graceful shutdown: no
    new runs are handed out, every session finishes the requests it has (their writes are
    committed and answered) and says goodbye (workers reconnect elsewhere or later), then
    ``serve`` returns. Sessions still busy after ``shutdown_grace`` seconds are cut off.
    """

    store: Store
    sources: Sources
    lease_ttl: float = 30.0
    heartbeat_interval: float | None = None
    token: str | None = None
    # The fallback poll (Dispatcher claims, Timer re-reads) for a store shared by several
    # servers, whose notifications are hints that can be lost. None: 30 s for a shared store;
    # a store of one server's own is never polled.
    poll_interval: float | None = None
    supervisor: Supervisor = attrs.field(
        factory=lambda: Supervisor("server", max_restarts=5, within=10.0)
    )
    hello_timeout: float = 10.0
    shutdown_grace: float = 10.0
    retention: float | None = None  # seconds finished runs are kept; None: for ever
    stranded_after: float = 60.0  # queued this long with no worker for its version
    ctx: ServerContext = attrs.field(init=False)
    doubts: Doubts = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # (Lease expiry sees every reading of the server's clock: see LeaseClock.)
        leases = LeaseClock(hold=self.lease_ttl)
        self.sources = attrs.evolve(self.sources,
                                    clock=ObservedClock(self.sources.clock, leases))
        writer = StoreWriter(self.store, self.sources.metrics)
        poll = self.poll_interval
        if poll is None and getattr(self.store, "watch", None) is not None:
            poll = SHARED_STORE_POLL
        dispatcher = Dispatcher(writer, self.sources, self.lease_ttl, poll,
                                stranded_after=self.stranded_after,
                                push_before_commit=getattr(self.store, "commits_off_the_loop",
                                                           False))
        timer = Timer(self.store, writer, self.sources, dispatcher.poke,
                      reconcile_interval=poll, leases=leases)
        writer.on_expired = dispatcher.expired
        dispatcher.on_leased = timer.hint
        watchers = RunWatchers()

        def ended(runs: tuple[RunRecord, ...]) -> None:  # a cancel's grace period over
            for run in runs:  # (its watchers hear it from the commit, as for every end)
                dispatcher.revoke(run.id, run.cancel_reason)  # (a worker may still hold it)

        timer.on_ended = ended

        def committed(out: Outcomes) -> None:
            """What a committed batch did beyond its outcomes, acted on at its commit (not by
            the request that caused it, which its connection's loss may cut short)."""
            poke = bool(out.revoked) or out.due is not None  # (cancelled: queued again)
            for run_id, epoch, reason in out.revoked:  # their workers hear it now
                dispatcher.revoke(run_id, reason, epoch)
            if out.due is not None:
                timer.hint(out.due)
            for run in out.ended:
                watchers.ended(run)
                if run.parent_id is not None:  # its parent's wait for it ended
                    poke = True
                    dispatcher.push_to_holder(run.parent_id, Nudge(run.parent_id))
                if started_by_a_schedule(run):  # it may have started a buffered occurrence
                    poke = True
            if poke:
                dispatcher.poke()

        writer.on_committed = committed
        writer.on_applying, writer.on_queued = watchers.applying, watchers.queued
        writer.on_ended_by_holders = dispatcher.ended  # (before their watchers hear)
        writer.on_held = dispatcher.held

        def orphaned() -> None:  # a write committed whose asker had gone: look again
            dispatcher.poke()
            timer.hint(None)

        writer.on_orphaned = orphaned

        self.doubts = Doubts(self.store, watchers, orphaned)  # (see its module)
        writer.on_unknown = self.doubts.doubt
        self.ctx = ServerContext(
            store=self.store, writer=writer, dispatcher=dispatcher, timer=timer,
            watchers=watchers, sources=self.sources, server_id=self.sources.new_id(),
            lease_ttl=self.lease_ttl,
            heartbeat_interval=self.heartbeat_interval or self.lease_ttl / 3,
            token=self.token, hello_timeout=self.hello_timeout,
        )

    def _notices(self, nursery: trio.Nursery) -> Callable[[str], None]:
        """What to do with another server's notice (see ``PostgresStore.watch``)."""
        ctx = self.ctx

        async def ended(run_ids: list[str]) -> None:
            for run_id in run_ids:
                run = await ctx.store.get_run(run_id)
                if run is not None:
                    ctx.watchers.ended(run)

        def on_notice(notice: str) -> None:
            if notice == "":
                ctx.dispatcher.poke()
            elif notice == "due":
                ctx.timer.hint(None)
            elif notice.startswith("revoked:"):  # a cancel through another server
                epoch, _, run_id = notice[len("revoked:"):].partition(":")
                ctx.dispatcher.revoke(run_id, None, int(epoch))
            elif notice.startswith("ended:"):
                run_id = notice[len("ended:"):]
                ctx.watchers.heard_end(run_id)
                if ctx.watchers.watched(run_id):
                    nursery.start_soon(ended, [run_id])
            else:  # "resync": notices were lost; recover what they carried from the store
                ctx.watchers.forget()
                ctx.dispatcher.poke()
                ctx.timer.hint(None)
                nursery.start_soon(ended, ctx.watchers.watched_runs())

        return on_notice

    # -- what operators read: /metrics, /health, /ready -----------------------------------
    async def refresh_metrics(self) -> None:
        """Set the gauges that are read on demand: runs by state and the oldest queued run's
        age from the store (every server of a shared store reports the same), workers and
        slots from the Dispatcher's seats. A store that does not answer leaves the store
        gauges at their last values (and ``/ready`` says so)."""
        ctx, metrics = self.ctx, self.sources.metrics
        seats = list(ctx.dispatcher.seats.values())
        metrics.set(WORKERS, len(seats))
        busy = sum(len(seat.active) for seat in seats)
        metrics.replace(SLOTS, {("busy",): busy, ("free",): sum(max(s.free, 0) for s in seats)})
        metrics.set(SESSIONS, ctx.open_sessions)
        try:
            with trio.fail_after(5):
                counts = await ctx.store.run_counts()
        except Exception as exc:
            log.warning("metrics: the store did not answer: %r", exc)
            return
        now = self.sources.clock.now()
        metrics.replace(RUNS_NOW, {(c.workflow, c.version, c.state): c.count for c in counts})
        metrics.replace(OLDEST_QUEUED, {(c.workflow, c.version): max(now - c.oldest, 0.0)
                                        for c in counts if c.state == "queued"})

    async def live(self) -> tuple[bool, str]:
        """``/health``: the process serves (its supervision tree is up)."""
        await trio.lowlevel.checkpoint()
        return True, "serving"

    async def ready(self) -> tuple[bool, str]:
        """``/ready``: not shutting down, and the store answers a read of the runs table (the
        store was opened with its migrations applied, so the table is the current one)."""
        if self.ctx.shutting_down.is_set():
            return False, "shutting down"
        try:
            with trio.fail_after(5):
                await self.ctx.store.run_counts()
        except trio.TooSlowError:
            return False, "the store did not answer within 5 s"
        except Exception as exc:
            return False, f"the store is unavailable: {exc}"
        return True, "the store answers"

    def http_app(self, *, protocol_port: bool = False, token: str | None = None) -> HttpApp:
        """What the server answers over plain HTTP: /metrics, /health, /ready. On the
        protocol's own port (``protocol_port``) any other path gets 426 (this port speaks
        WebSocket), and with a ``token`` /metrics asks for it, as the WebSocket does, since
        workflow names need not be public; /health and /ready never do, so probes need no
        secret. ``--metrics-listen`` serves it without a token: bind it where only your
        Prometheus reaches."""
        inner = routes(metrics_page(self.sources.metrics, sides=("server",),
                                    refresh=self.refresh_metrics), self.live, self.ready)
        if not protocol_port:
            return inner
        expected = f"Bearer {token}".encode()

        async def on_protocol_port(request: HttpRequest) -> HttpResponse:
            if request.path not in ("/metrics", "/health", "/ready"):
                return HttpResponse(426, UPGRADE_REQUIRED.encode(),
                                    headers=(("upgrade", "websocket"),))
            given = (request.header("authorization") or "").encode()
            if (request.path == "/metrics" and token is not None
                    and not hmac.compare_digest(given, expected)):
                return HttpResponse(401, b"/metrics on this port needs 'Authorization: Bearer "
                                         b"<token>' (or serve it with --metrics-listen)\n",
                                    headers=(("www-authenticate", "Bearer"),))
            return await inner(request)

        return on_protocol_port

    def stop(self) -> None:
        """Begin a graceful shutdown (see the class docstring); ``serve`` returns when done."""
        if not self.ctx.shutting_down.is_set():
            log.info("shutting down: %d sessions open", self.ctx.open_sessions)
        self.ctx.shutting_down.set()

    async def serve(
        self, transport: Transport, address: str, *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        bound: list[str] = []

        async def listen(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async def handle(conn: Connection) -> None:
                await Session.serve(self.ctx, conn)

            async with trio.open_nursery() as nursery:
                bound.append(await nursery.start(transport.serve, address, handle))
                task_status.started()

        children = [
            ChildSpec("store-writer", self.ctx.writer.run),
            ChildSpec("dispatcher", self.ctx.dispatcher.run),
            ChildSpec("timer", self.ctx.timer.run),
            ChildSpec("doubts", self.doubts.run),
            ChildSpec("listener", listen),
        ]
        if self.retention is not None:
            retention = Retention(self.ctx.writer, self.sources, self.retention,
                                  interval=min(max(self.retention / 10, 1.0), 600.0))
            children.append(ChildSpec("retention", retention.run))
        watch = getattr(self.store, "watch", None)
        if watch is not None:
            # A store shared by several servers (PostgreSQL) tells every server what the
            # others commit: runs queued, runs ended, waits begun; the poll interval stays as
            # the slow fallback.
            async def watch_store(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                async with trio.open_nursery() as nursery:
                    notices = self._notices(nursery)
                    await watch(notices, task_status=task_status)

            children.append(ChildSpec("store-watch", watch_store))
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run, children)
            task_status.started(bound[-1])
            await self.ctx.shutting_down.wait()
            self.ctx.dispatcher.stop_assigning()
            with trio.move_on_after(self.shutdown_grace) as waited:
                while self.ctx.open_sessions > 0:
                    self.ctx.no_sessions = trio.Event()
                    await self.ctx.no_sessions.wait()
            if waited.cancelled_caught:
                log.warning("shutdown: %d sessions still busy after %.1f s; cutting them off",
                            self.ctx.open_sessions, self.shutdown_grace)
            nursery.cancel_scope.cancel()
        log.info("server stopped")


# -- the `aiki server` process ----------------------------------------------------------------
def parse_http_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of a plain HTTP listener; ConfigError names
    what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-listen wants HOST:PORT (e.g. 0.0.0.0:9464), "
                          f"got {address!r}")
    return host, int(port)


async def serve_metrics(app: HttpApp, address: str, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """``--metrics-listen``: serve ``app`` on ``address``; ``task_status`` gets the port."""
    host, port = parse_http_listen(address)
    try:
        await serve_http(app, host, port, task_status=task_status)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address} for metrics: {exc}") from exc



_WS = WebSocketSettings()  # the transport's defaults


@attrs.frozen
class ServerConfig:
    """Everything ``aiki server`` takes. :meth:`endpoint` checks it."""

    listen: str = "127.0.0.1:9090"
    store: str = "sqlite:///aiki.db"
    token: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    lease_ttl: float = 30.0
    heartbeat_interval: float | None = None
    poll_interval: float | None = None
    hello_timeout: float = 10.0
    shutdown_grace: float = 10.0
    retention: float | None = None
    stranded_after: float = 60.0
    max_frame_bytes: int = _WS.max_frame_bytes
    ping_interval: float = _WS.ping_interval
    ping_timeout: float = _WS.ping_timeout
    metrics_listen: str | None = None  # HOST:PORT for /metrics, /health and /ready

    def metrics_endpoint(self) -> tuple[str, int] | None:
        return None if self.metrics_listen is None else parse_http_listen(self.metrics_listen)

    def endpoint(self) -> Endpoint:
        """Where to listen; raises :class:`ConfigError` for a setting that cannot work,
        including a non-loopback address without a token."""
        endpoint = parse_address(self.listen, secure=self.certfile is not None)
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("wss:// needs both a certificate (--cert) and its key (--key)")
        if endpoint.secure and self.certfile is None:
            raise ConfigError(f"{self.listen!r} is wss://: give a certificate (--cert) and "
                              "key (--key)")
        if not endpoint.is_loopback and self.token is None:
            raise ConfigError(
                f"refusing to listen on {endpoint.host} without a token: anyone who can reach "
                "it could run and read workflows. Give a token (--token-file or AIKI_TOKEN), "
                "or listen on 127.0.0.1"
            )
        if endpoint.path != "/":
            raise ConfigError(f"a listen address has no path, got {self.listen!r}")
        for name in ("lease_ttl", "poll_interval", "hello_timeout", "shutdown_grace",
                     "retention", "stranded_after"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, "
                                  f"got {getattr(self, name)!r}")
        self.metrics_endpoint()
        return endpoint

    def transport_settings(self) -> WebSocketSettings:
        context = None
        if self.certfile is not None and self.keyfile is not None:
            context = server_ssl_context(self.certfile, self.keyfile)
        return WebSocketSettings(
            token=self.token, ssl_context=context, max_frame_bytes=self.max_frame_bytes,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
            handshake_timeout=self.hello_timeout,
        )


async def run_server(
    config: ServerConfig, *, sources: Sources | None = None, handle_signals: bool = True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``aiki server`` until SIGINT / SIGTERM (graceful; a second signal stops at once)
    or cancellation. ``task_status.started`` gets the URL clients connect to."""
    endpoint = config.endpoint()
    settings = config.transport_settings()
    with contextlib.ExitStack() as stack:
        signals = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            # Before anything starts, so a signal during startup is not the default kill.
            signals = stack.enter_context(
                trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
        try:
            store = await open_store(config.store)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            server = Server(
                store, sources or Sources.real(), lease_ttl=config.lease_ttl,
                heartbeat_interval=config.heartbeat_interval, token=config.token,
                poll_interval=config.poll_interval, hello_timeout=config.hello_timeout,
                shutdown_grace=config.shutdown_grace, retention=config.retention,
                stranded_after=config.stranded_after,
            )
            host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(_stop_on_signals, signals, server, nursery.cancel_scope)

                async def serve(*, task_status: trio.TaskStatus[str]) -> None:
                    transport = WebSocketTransport(
                        settings, http=server.http_app(protocol_port=True, token=config.token))
                    await server.serve(transport, f"{host}:{endpoint.port}",
                                       task_status=task_status)
                    nursery.cancel_scope.cancel()  # stopped: end the signal watcher too

                url = await nursery.start(serve)
                if config.metrics_listen is not None:
                    await nursery.start(serve_metrics, server.http_app(),
                                        config.metrics_listen)
                log.info("listening on %s (store %s, lease ttl %.1f s%s)", url,
                         redact_url(config.store),
                         config.lease_ttl, ", token required" if config.token else "")
                task_status.started(url)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await store.aclose()


async def _stop_on_signals(signals: AsyncIterator[int], server: Server,
                           everything: trio.CancelScope) -> None:
    async for signum in signals:
        if not server.ctx.shutting_down.is_set():
            log.info("%s: shutting down gracefully (again to stop at once)",
                     signal.Signals(signum).name)
            server.stop()
        else:
            log.warning("%s again: stopping now", signal.Signals(signum).name)
            everything.cancel()
            return
