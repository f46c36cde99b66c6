"""Session: the server's side of one connection, from a worker or a client.

It reads the connection, authenticates the first message (``Hello``), and serves requests,
each in its own task (bounded by ``max_in_flight``) so one slow write does not hold up the
others. It owns its outbox and the seat it registered with the Dispatcher, both dropped when
the connection ends; everything durable goes through the StoreWriter, so a crashed session
loses no state (the worker reconnects and re-announces its leases).

A malformed or unknown message is answered with ``Refused`` and logged; the connection stays
up until ``max_protocol_errors`` of them, then it is closed with a reason.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from aiki import protocol as p
from aiki.actors.dispatcher import Alive, Dispatcher, Ended, Joined, Left, Seat
from aiki.actors.mailbox import Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.actors.timer import Timer
from aiki.actors.watchers import RunWatchers
from aiki.errors import AikiError, ConnectionLost, ProtocolError, RunNotFound, UnknownWorkflow
from aiki.sources import Sources
from aiki.store import ops
from aiki.store.base import Store
from aiki.store.records import TERMINAL_RUN_STATES, Lease, RunRecord
from aiki.transport.base import Connection

log = logging.getLogger("aiki.session")


@attrs.define(eq=False)
class ServerContext:
    """What every session shares: the server's actors and settings."""

    store: Store
    writer: StoreWriter
    dispatcher: Dispatcher
    timer: Timer
    watchers: RunWatchers
    sources: Sources
    server_id: str
    lease_ttl: float
    heartbeat_interval: float
    token: str | None = None
    hello_timeout: float = 10.0
    max_in_flight: int = 64
    max_protocol_errors: int = 16
    sessions: int = 0


class Closing(Exception):
    """Internal: end this session with a reason."""


@attrs.define(eq=False)
class Session:
    ctx: ServerContext
    conn: Connection
    id: int
    hello: p.Hello | None = None
    outbox: Mailbox[Any] = attrs.field(factory=lambda: Mailbox[Any](1024, "session-outbox"))
    protocol_errors: int = 0
    unwatch: list[Any] = attrs.field(factory=list)

    @classmethod
    async def serve(cls, ctx: ServerContext, conn: Connection) -> None:
        ctx.sessions += 1
        session = cls(ctx, conn, ctx.sessions)
        try:
            await session._serve()
        except ConnectionLost:
            pass
        except Closing as reason:
            log.warning("closing session %d (%s): %s", session.id, conn.peer, reason)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await conn.send(p.Goodbye(str(reason)))
        finally:
            for unwatch in session.unwatch:
                unwatch()
            if session.hello is not None and session.hello.role == "worker":
                ctx.dispatcher.tell(Left(session.id))

    async def _serve(self) -> None:
        with trio.move_on_after(self.ctx.hello_timeout) as scope:
            first = await self._receive()
        if scope.cancelled_caught:
            raise Closing(f"no hello within {self.ctx.hello_timeout} s")
        if not isinstance(first, p.Hello):
            raise Closing(f"the first message must be 'hello', got {_tag(first)!r}")
        if self.ctx.token is not None and first.token != self.ctx.token:
            raise Closing("authentication failed: wrong or missing token")
        if first.protocol != p.PROTOCOL_VERSION:
            raise Closing(f"protocol version {first.protocol} is not supported "
                          f"(this server speaks {p.PROTOCOL_VERSION})")
        self.hello = first
        await self.conn.send(p.Welcome(first.req, self.ctx.server_id, self.ctx.lease_ttl,
                                       self.ctx.heartbeat_interval))
        ended: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_closed, self._send_outbox, nursery, ended)
            if first.role == "worker":
                self.ctx.dispatcher.tell(Joined(Seat(
                    self.id, first.node_id,
                    tuple((w.name, w.version) for w in first.workflows),
                    first.slots, self._push, {lease.run_id for lease in first.held},
                )))
                self.ctx.dispatcher.poke()
            await self._until_closed(self._read_requests, nursery, ended)
        if ended:
            raise ended[0]

    async def _until_closed(self, loop: Any, nursery: trio.Nursery,
                            ended: list[BaseException]) -> None:
        """Run ``loop``; when the connection ends (or must be closed), end the session."""
        try:
            await loop(nursery)
        except (ConnectionLost, Closing) as exc:
            ended.append(exc)
            nursery.cancel_scope.cancel()

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        limiter = trio.CapacityLimiter(self.ctx.max_in_flight)
        while True:
            msg = await self._receive()
            if msg is None:
                continue
            await limiter.acquire_on_behalf_of(msg)
            nursery.start_soon(self._serve_one, msg, limiter)

    async def _receive(self) -> Any:
        try:
            return await self.conn.receive()
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning("session %d (%s): %s", self.id, self.conn.peer, exc)
            if self.protocol_errors >= self.ctx.max_protocol_errors:
                raise Closing(f"too many malformed messages; last: {exc}") from exc
            await self.conn.send(p.Refused(-1, "ProtocolError", str(exc)))
            return None

    async def _send_outbox(self, nursery: trio.Nursery) -> None:
        async for msg in self.outbox:
            await self.conn.send(msg)

    def _push(self, msg: Any) -> bool:
        return self.outbox.address.tell_nowait(msg)

    async def _serve_one(self, msg: Any, limiter: trio.CapacityLimiter) -> None:
        try:
            reply = await self._answer(msg)
        except AikiError as exc:
            reply = p.Refused(getattr(msg, "req", -1), type(exc).__name__, str(exc))
        finally:
            limiter.release_on_behalf_of(msg)
        if reply is not None:
            await self.outbox.address.tell(reply)

    async def _answer(self, msg: Any) -> Any:
        ctx = self.ctx
        now = ctx.sources.clock.now()
        if isinstance(msg, p.Enqueue):
            version = msg.version or ctx.dispatcher.latest_version(msg.workflow)
            if version is None:
                known = ", ".join(ctx.dispatcher.known_workflows()) or "none"
                raise UnknownWorkflow(
                    f"no worker has registered workflow {msg.workflow!r} (registered: {known}); "
                    "give a version to enqueue it anyway"
                )
            out = await ctx.writer.write(ops.Enqueue(
                msg.run_id or ctx.sources.new_id(), msg.workflow, version, msg.payload,
                msg.idempotency_key, now,
            ))
            if out.created:
                ctx.dispatcher.poke()
            return p.Enqueued(msg.req, out.run_id, version, out.created)
        if isinstance(msg, p.GetRun):
            run = await self._run(msg.run_id)
            return p.RunInfo(msg.req, run, await ctx.store.get_steps(run.id))
        if isinstance(msg, p.GetHistory):
            run = await self._run(msg.run_id)
            return p.History(msg.req, await ctx.store.get_history(run.id))
        if isinstance(msg, p.WatchRun):
            return await self._watch(msg)
        if isinstance(msg, p.Hello):
            raise ProtocolError("'hello' was already received on this connection")
        return await self._answer_worker(msg, now)

    async def _answer_worker(self, msg: Any, now: float) -> Any:
        ctx = self.ctx
        if self.hello is None or self.hello.role != "worker":
            raise ProtocolError(f"{_tag(msg)!r} is only accepted from a worker")
        if isinstance(msg, p.Heartbeat):
            self._check_owner(*msg.leases)
            lost: tuple[str, ...] = ()
            if msg.leases:
                lost = await ctx.writer.write(ops.Renew(msg.leases, now, ctx.lease_ttl))
            if lost:
                ctx.dispatcher.tell(Ended(self.id, lost))
            ctx.dispatcher.tell(Alive(self.id))
            return p.HeartbeatAck(msg.req, lost)
        if isinstance(msg, (p.StartStep, p.SaveStep)):
            self._check_owner(msg.lease)
            op_cls = ops.StartStep if isinstance(msg, p.StartStep) else ops.SaveStep
            await ctx.writer.write(op_cls(msg.lease, msg.step, now))
            return p.Ok(msg.req)
        op: ops.Op[None]
        if isinstance(msg, p.CompleteRun):
            op = ops.CompleteRun(msg.lease, msg.result, now)
        elif isinstance(msg, p.FailRun):
            op = ops.FailRun(msg.lease, msg.error_type, msg.error_message, now)
        elif isinstance(msg, p.SuspendRun):
            op = ops.SuspendRun(msg.lease, msg.wake_at, msg.reason, now)
        elif isinstance(msg, p.ReleaseRun):
            op = ops.ReleaseRun(msg.lease, now)
        else:
            raise ProtocolError(f"unexpected message {_tag(msg)!r} from a worker")
        self._check_owner(msg.lease)
        try:
            await ctx.writer.write(op)
        finally:
            ctx.dispatcher.tell(Ended(self.id, (msg.lease.run_id,)))
        if isinstance(msg, (p.CompleteRun, p.FailRun)):
            run = await ctx.store.get_run(msg.lease.run_id)
            if run is not None:
                ctx.watchers.ended(run)
        elif isinstance(msg, p.SuspendRun):
            ctx.timer.hint(msg.wake_at)
        else:
            ctx.dispatcher.poke()
        return p.Ok(msg.req)

    def _check_owner(self, *leases: Lease) -> None:
        assert self.hello is not None
        for lease in leases:
            if lease.worker_id != self.hello.node_id:
                raise ProtocolError(
                    f"worker {self.hello.node_id!r} cannot write under the lease of "
                    f"worker {lease.worker_id!r}"
                )

    async def _run(self, run_id: str) -> RunRecord:
        run = await self.ctx.store.get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        return run

    async def _watch(self, msg: p.WatchRun) -> Any:
        sent = False

        def notify(run: RunRecord) -> None:
            nonlocal sent
            if not sent:
                sent = True
                self._push(p.RunEnded(msg.req, run))

        unwatch = self.ctx.watchers.watch(msg.run_id, notify)
        self.unwatch.append(unwatch)
        try:
            run = await self._run(msg.run_id)
        except RunNotFound:
            unwatch()
            raise
        if run.state in TERMINAL_RUN_STATES:
            unwatch()
            notify(run)
        return None


def _tag(msg: Any) -> str:
    return str(getattr(type(msg), "TAG", type(msg).__name__))
