"""Session: the server's side of one connection, from a worker or a client.

It reads the connection, authenticates the first message (``Hello``), and serves requests,
each in its own task (bounded by ``max_in_flight``) so one slow write does not hold up the
others. A peer in the same process (the memory transport) has its requests answered in its
own task instead, within the same bound: no message, no task spawned here. It owns its
outbox and the seat it registered with the Dispatcher, both dropped when the connection ends;
everything durable goes through the StoreWriter, so a crashed session loses no state (the
worker reconnects and re-announces its leases).

A malformed or unknown message is answered with ``Refused`` and logged; the connection stays
up until ``max_protocol_errors`` of them, then it is closed with a reason. A refusal that a
reconnection cannot fix (wrong token, no hello first, an unknown protocol version) closes
with a ``Goodbye`` naming the error type, so the peer does not retry it.

When the server shuts down (``ServerContext.shutting_down``), the session stops reading,
answers the requests it has, sends what is queued, says goodbye, and closes its connection
before it counts itself ended (``open_sessions``); a cancellation instead stops it at once.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from aiki import protocol as p
from aiki import schedules as sch
from aiki import tracing
from aiki.actors.dispatcher import Alive, Dispatcher, Draining, Ended, Joined, Left, Seat
from aiki.actors.mailbox import AskTimeout, Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.actors.timer import Timer
from aiki.actors.watchers import RunWatchers
from aiki.errors import (
    AikiError,
    ConnectionLost,
    PayloadError,
    ProtocolError,
    RunNotFound,
    RunPaused,
    ScheduleInvalid,
    ScheduleNotFound,
    StaleLease,
    StepConflict,
    StoreUnavailable,
    UnknownEvent,
    UnknownWorkflow,
)
from aiki.records import (
    TERMINAL_RUN_STATES,
    ClaimedRun,
    Lease,
    RunRecord,
    RunState,
    ScheduleRecord,
    StepRecord,
)
from aiki.sources import Sources
from aiki.store import ops
from aiki.store.base import Store
from aiki.store.machine import ON_CONFLICT
from aiki.transport.base import Connection
from aiki.transport.memory import MemoryConnection

log = logging.getLogger("aiki.session")
RUN_STATES: tuple[str, ...] = typing.get_args(RunState)


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
    # Graceful shutdown: set, every session stops reading, finishes the requests it has,
    # says goodbye and ends; ``open_sessions`` counts down to zero (``no_sessions``).
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    open_sessions: int = 0
    no_sessions: trio.Event = attrs.field(factory=trio.Event)
    # Worker id -> the one session that holds it (see Session._take_worker_id).
    worker_ids: dict[str, Session] = attrs.field(factory=dict)


class Closing(Exception):
    """Internal: end this session with a reason. ``error_type`` names the refusal that a
    reconnection cannot fix (the peer should not retry), or is None."""

    def __init__(self, reason: str, error_type: str | None = None) -> None:
        super().__init__(reason)
        self.error_type = error_type


SHUTTING_DOWN = "the server is shutting down"
SCHEDULE_MESSAGES = (p.DefineSchedule, p.GetSchedule, p.ChangeSchedule, p.TriggerSchedule,
                     p.BackfillSchedule, p.ListSchedules)
MAX_RUN_ID = 128
MAX_LIST_LIMIT = 1000
MAX_GRACE = 10 * 365.25 * 86400.0
MAX_REASON = 4096
MAX_CHILD_ID = 1024
# A worker's requests whose whole answer is one write handed to the StoreWriter: once
# handed over it commits whatever becomes of the asker, and nothing follows it here. Asked
# over an in-process connection, they are answered without a shield against the asker's
# cancellation (see MemoryConnection.answer_directly): a task's start and its outcomes.
# (Not a run's end, a wait or a release: the seat is told after the write. A start sent
# early waits for its push's verdict first: cancelled then, nothing was handed over.)
_LEFT_AT_THE_WRITER: frozenset[type] = frozenset({p.StartStep, p.SaveStep})


@attrs.define(eq=False)
class Session:
    ctx: ServerContext
    conn: Connection
    id: int
    hello: p.Hello | None = None
    outbox: Mailbox[Any] = attrs.field(default=attrs.Factory(
        lambda self: Mailbox[Any](1024, "session-outbox", self.ctx.sources.metrics),
        takes_self=True))
    protocol_errors: int = 0
    unwatch: dict[int, Callable[[], None]] = attrs.field(factory=dict)
    seat: Seat | None = None  # a worker's, shared with the Dispatcher
    # When this peer last said anything (trio.current_time()): a worker heartbeats every
    # heartbeat_interval, so one silent for a lease ttl is gone, whatever its socket says.
    last_heard: float = attrs.field(factory=trio.current_time)
    # Set, with why, when a newer session takes this one's worker id: it ends at once.
    superseded: trio.Event = attrs.field(factory=trio.Event)
    superseded_why: Closing | None = None
    _watching: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _drain_told: bool = False  # the Dispatcher was told this worker drains
    _serving: int = 0  # requests being answered (at most ctx.max_in_flight)
    _ended: bool = False  # torn down: watches and answers after this would leak
    _room: trio.Event = attrs.field(factory=trio.Event)  # set when one is answered

    @property
    def _routine(self) -> int:
        """The level of this session's comings and goings: DEBUG for a client that said
        hello (every CLI call is one), INFO for a worker or a peer that never said hello."""
        client = self.hello is not None and self.hello.role != "worker"
        return logging.DEBUG if client else logging.INFO

    @classmethod
    async def serve(cls, ctx: ServerContext, conn: Connection) -> None:
        ctx.sessions += 1
        ctx.open_sessions += 1
        session = cls(ctx, conn, ctx.sessions)
        try:
            await session._serve()
        except ConnectionLost as exc:
            # A worker's session is news; a client's (every CLI call) is routine.
            log.log(session._routine, "session %d (%s) ended: %s", session.id, conn.peer, exc)
        except Closing as reason:
            if reason.error_type is None:
                log.log(session._routine, "closing session %d (%s): %s", session.id,
                        conn.peer, reason)
            else:
                log.warning("closing session %d (%s): %s", session.id, conn.peer, reason)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await conn.send(p.Goodbye(str(reason), reason.error_type))
                except ConnectionLost:
                    pass
        finally:
            session._ended = True  # (an answer still running in a peer's task sees it)
            for unwatch in session.unwatch.values():
                unwatch()
            if session.hello is not None and session.hello.role == "worker":
                ctx.dispatcher.tell(Left(session.id))
                if ctx.worker_ids.get(session.hello.node_id) is session:
                    del ctx.worker_ids[session.hello.node_id]
            # Close (flushing the goodbye) before counting this session as ended: a server
            # shutting down stops everything once no session is left.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await conn.aclose()
            ctx.open_sessions -= 1
            if ctx.open_sessions == 0:
                ctx.no_sessions.set()

    async def _serve(self) -> None:
        ctx = self.ctx
        with trio.move_on_after(ctx.hello_timeout) as scope:
            first = await self._receive()
        if scope.cancelled_caught:
            raise Closing(f"no hello within {ctx.hello_timeout} s")
        if not isinstance(first, p.Hello):
            raise Closing(f"the first message must be 'hello', got {_tag(first)!r}",
                          "ProtocolError")
        if ctx.token is not None and first.token != ctx.token:
            raise Closing("authentication failed: wrong or missing token", "AuthenticationFailed")
        if first.protocol != p.PROTOCOL_VERSION:
            raise Closing(f"protocol version {first.protocol} is not supported "
                          f"(this server speaks {p.PROTOCOL_VERSION})", "ProtocolError")
        if ctx.shutting_down.is_set():
            raise Closing(SHUTTING_DOWN)
        if first.role == "worker":
            self._take_worker_id(first)
        self.hello = first
        if first.role == "worker":
            # Before the welcome: once a worker is running, enqueues by name find its versions.
            ctx.dispatcher.note_workflows(first.workflows)
        await self.conn.send(p.Welcome(first.req, ctx.server_id, ctx.lease_ttl,
                                       ctx.heartbeat_interval, ctx.sources.clock.now()))
        ended: list[BaseException] = []
        async with trio.open_nursery() as session:
            session.start_soon(self._until_closed, session, ended, self._send_outbox)
            session.start_soon(self._until_closed, session, ended, self._until_superseded)
            if first.role == "worker":
                self.seat = Seat(
                    self.id, first.node_id,
                    tuple((w.name, w.version) for w in first.workflows),
                    first.slots, self._push, {lease.run_id for lease in first.held},
                    room=self.outbox.address.room, connected_at=ctx.sources.clock.now(),
                    epochs={lease.run_id: lease.epoch for lease in first.held},
                )
                ctx.dispatcher.tell(Joined(self.seat))
                ctx.dispatcher.poke()
            async with trio.open_nursery() as requests:
                with trio.CancelScope() as reading:
                    session.start_soon(self._stop_reading_at_shutdown, reading)
                    with self._answering_directly():
                        await self._until_closed(session, ended, self._read_requests,
                                                 requests)
            # Only a shutdown gets here with the connection up: the requests in flight are
            # answered (those answered in their peer's task too); send what is queued, then
            # say goodbye.
            while self._serving:
                await self._one_answered()
            self.outbox.close()
            self._watching.cancel()
        if ended:
            raise ended[0]
        raise Closing(SHUTTING_DOWN)

    def _take_worker_id(self, hello: p.Hello) -> None:
        """Make this session the one that holds ``hello.node_id``, or refuse it.

        The id is free, or its holder is this same worker process reconnecting (the same
        incarnation: its old connection is dead though the server has not seen it close), or
        its holder fell silent for longer than a lease: this session takes it, and the old
        one is closed (told why, in case its process lives). Otherwise another live process
        holds the id: refused with ``WorkerIdInUse`` naming it, so neither is orphaned.
        """
        ctx = self.ctx
        holder = ctx.worker_ids.get(hello.node_id)
        if holder is not None and holder.hello is not None:
            silent = trio.current_time() - holder.last_heard
            same = (hello.incarnation is not None
                    and hello.incarnation == holder.hello.incarnation)
            if not same and silent <= ctx.lease_ttl:
                raise Closing(
                    f"worker id {hello.node_id!r} is in use by a live worker (session "
                    f"{holder.id} from {holder.conn.peer}, last heard {silent:.1f} s ago); "
                    "give each worker its own --id", "WorkerIdInUse")
            if same:
                log.info("worker %r reconnected (session %d); closing its older session %d",
                         hello.node_id, self.id, holder.id)
                holder.supersede(Closing(f"worker {hello.node_id!r} reconnected on "
                                         f"session {self.id}"))
            else:
                log.warning("worker id %r: session %d from %s takes it over from session %d "
                            "(%s), silent for %.1f s", hello.node_id, self.id, self.conn.peer,
                            holder.id, holder.conn.peer, silent)
                holder.supersede(Closing(
                    f"worker id {hello.node_id!r} was taken over by session {self.id} from "
                    f"{self.conn.peer}: this worker was silent for {silent:.1f} s, longer "
                    f"than the lease ttl ({ctx.lease_ttl:g} s)", "WorkerIdInUse"))
        ctx.worker_ids[hello.node_id] = self

    def supersede(self, why: Closing) -> None:
        """End this session with ``why`` (a newer session took its worker id)."""
        if self.superseded_why is None:
            self.superseded_why = why
        self.superseded.set()

    async def _until_superseded(self) -> None:
        with self._watching:  # cancelled when a shutdown has sent what was queued
            await self.superseded.wait()
            assert self.superseded_why is not None
            raise self.superseded_why

    async def _stop_reading_at_shutdown(self, reading: trio.CancelScope) -> None:
        await self.ctx.shutting_down.wait()
        reading.cancel()

    async def _until_closed(self, session: trio.Nursery, ended: list[BaseException],
                            loop: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``loop``; when the connection ends (or must be closed), end the session."""
        try:
            await loop(*args)
        except (ConnectionLost, Closing) as exc:
            ended.append(exc)
            session.cancel_scope.cancel()

    async def _read_requests(self, requests: trio.Nursery) -> None:
        # At most ``max_in_flight`` requests are served at once; the reader waits for room
        # (a count and an event: a CapacityLimiter's acquire yields to the scheduler on
        # every request, a task switch per request for a bound that is rarely reached).
        while True:
            msg = await self._receive()
            if msg is None:
                continue
            while self._serving >= self.ctx.max_in_flight:
                await self._one_answered()
            self._serving += 1
            requests.start_soon(self._serve_one, msg)

    async def _one_answered(self) -> None:
        """Wait until a request being answered is answered (every waiter wakes)."""
        if self._room.is_set():
            self._room = trio.Event()
        await self._room.wait()

    async def _receive(self) -> Any:
        try:
            msg = await self.conn.receive()
            self.last_heard = trio.current_time()
            return msg
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning("session %d (%s): %s", self.id, self.conn.peer, exc)
            if self.protocol_errors >= self.ctx.max_protocol_errors:
                raise Closing(f"too many malformed messages; last: {exc}",
                              "ProtocolError") from exc
            await self.conn.send(p.Refused(-1, "ProtocolError", str(exc)))
            return None

    async def _send_outbox(self) -> None:
        async for msg in self.outbox:
            try:
                await self.conn.send(msg)
            except ProtocolError as exc:  # e.g. a reply over the transport's frame limit
                log.error("session %d (%s): cannot send %s: %s", self.id, self.conn.peer,
                          _tag(msg), exc)
                req = getattr(msg, "req", None)
                if req is not None and not isinstance(msg, p.Refused):
                    await self.conn.send(p.Refused(req, "ProtocolError",
                                                   f"the reply could not be sent: {exc}"))

    def _send_at_once(self, msg: Any) -> bool:
        """Send ``msg`` past the outbox (a task switch and a queue the fewer) when nothing is
        queued there or on its way out (its task waits for the next message: not sending,
        not woken with one, not ended with the session) and the connection takes it without
        a wait. Else False, and the outbox's way says what goes wrong (a reply over the
        frame limit, a closed connection)."""
        if not self.outbox.reader_waiting():
            return False
        try:
            return self.conn.try_send(msg)
        except (ProtocolError, ConnectionLost):
            return False

    def _push(self, msg: Any) -> bool:
        return self._send_at_once(msg) or self.outbox.address.tell_nowait(msg)

    async def _reply(self, reply: Any) -> None:
        if not self._send_at_once(reply):
            await self.outbox.address.tell(reply)

    @contextmanager
    def _answering_directly(self) -> Iterator[None]:
        """While the session reads its requests, a peer in this process may have them
        answered in its own task instead (see ``MemoryConnection.direct``): no message
        through the connection, no task spawned here, no reply back through it."""
        conn = self.conn
        if not isinstance(conn, MemoryConnection):
            yield
            return
        conn.answer_directly(self._answer_directly, _LEFT_AT_THE_WRITER)
        try:
            yield
        finally:
            conn.answer_directly(None)

    async def _answer_directly(self, msg: Any) -> Any:
        """A request answered in the peer's task: as ``_serve_one`` would, but the reply is
        returned. ``_serving`` counts it (a shutdown waits for it, as for the others), and
        it waits for room as a request read from the connection does."""
        self.last_heard = trio.current_time()
        while self._serving >= self.ctx.max_in_flight:
            await self._one_answered()
        if self._ended:
            raise ConnectionLost(f"session {self.id} has ended")
        self._serving += 1
        return await self._reply_to(msg)

    async def _serve_one(self, msg: Any) -> None:
        reply = await self._reply_to(msg)
        if reply is not None:
            await self._reply(reply)

    async def _reply_to(self, msg: Any) -> Any:
        try:
            reply = await self._answer(msg)
        except AikiError as exc:
            if isinstance(exc, (StaleLease, StepConflict)):  # fencing at work: worth a line
                lease = getattr(msg, "lease", None)
                about = {} if lease is None else {"run_id": lease.run_id,
                                                  "worker_id": lease.worker_id}
                log.info("session %d (%s): refused %s: %s", self.id, self.conn.peer,
                         _tag(msg), exc, extra=about)
            reply = p.Refused(getattr(msg, "req", -1), type(exc).__name__, str(exc))
        except Exception as exc:  # a bug or a store driver error: this request only
            log.exception("session %d (%s): %s failed", self.id, self.conn.peer, _tag(msg))
            reply = p.Refused(getattr(msg, "req", -1), "InternalError",
                              f"the server failed to answer {_tag(msg)!r}: {exc!r}")
        finally:
            self._serving -= 1
            self._room.set()
        return reply

    async def _answer(self, msg: Any) -> Any:
        ctx = self.ctx
        now = ctx.sources.clock.now()
        if isinstance(msg, p.Enqueue):
            if msg.run_id is not None and not 0 < len(msg.run_id) <= MAX_RUN_ID:
                raise ProtocolError(f"a run id must have 1 to {MAX_RUN_ID} characters, "
                                    f"got {len(msg.run_id)}")
            version = msg.version or ctx.dispatcher.latest_version(msg.workflow)
            if version is None:
                known = ", ".join(ctx.dispatcher.known_workflows()) or "none"
                raise UnknownWorkflow(
                    f"no worker has registered workflow {msg.workflow!r} (registered: {known}); "
                    "give a version to enqueue it anyway"
                )
            if msg.on_conflict not in ON_CONFLICT:
                raise ProtocolError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, "
                                    f"got {msg.on_conflict!r}")
            run_id = msg.run_id or ctx.sources.new_id()
            with tracing.span(f"aiki.enqueue {msg.workflow}", tracing.run_attributes(
                    run_id, msg.workflow, version, 0, None), parent=msg.trace_context,
                    kind="SERVER") as span:
                out, claimed = await self._enqueue(ops.Enqueue(
                    run_id, msg.workflow, version, msg.payload, msg.idempotency_key, now,
                    msg.on_conflict,
                    trace_context=tracing.stored_context(span, msg.trace_context),
                ))
            if out.created and run_id not in claimed:
                ctx.dispatcher.poke()
                ctx.dispatcher.queued_for((msg.workflow, version), now)
            return p.Enqueued(msg.req, out.run_id, version, out.created)
        if isinstance(msg, p.GetRun):
            run = await self._run(msg.run_id)
            waits = (await ctx.store.get_waits(run.id) if run.state in ("waiting", "paused")
                     else ())
            steps = await ctx.store.get_steps(run.id)
            children = (await ctx.store.get_children(run.id)
                        if any(s.kind == "child" for s in steps) else ())
            return p.RunInfo(msg.req, run, steps, waits, children)
        if isinstance(msg, p.SendEvent):
            return await self._send_event(msg, now)
        if isinstance(msg, p.RetryRun):
            assert self.hello is not None
            run = (await ctx.writer.write(ops.RetryRun(
                msg.run_id, msg.version, self.hello.node_id, now, msg.control_id))).run
            ctx.dispatcher.poke()
            return p.Retried(msg.req, run)
        if isinstance(msg, (p.PauseRun, p.ResumeRun, p.ForkRun)):
            return await self._control(msg, now)
        if isinstance(msg, p.PurgeRuns):
            if not 1 <= msg.limit <= MAX_LIST_LIMIT:
                raise ProtocolError(f"limit must be 1 to {MAX_LIST_LIMIT}, got {msg.limit}")
            purged = await ctx.writer.write(ops.PurgeRuns(msg.before, msg.limit))
            return p.Purged(msg.req, len(purged))
        if isinstance(msg, p.Wakeup):
            woken = await ctx.writer.write(ops.Wakeup(msg.run_id, now))
            if woken:
                self._woke(msg.run_id)
            return p.WokenUp(msg.req, woken)
        if isinstance(msg, p.CancelRun):
            return await self._cancel(msg, now)
        if isinstance(msg, p.GetHistory):
            run = await self._run(msg.run_id)
            return p.History(msg.req, await ctx.store.get_history(run.id))
        if isinstance(msg, p.WatchRun):
            return await self._watch(msg)
        if isinstance(msg, p.ListRuns):
            if msg.state is not None and msg.state not in RUN_STATES:
                raise ProtocolError(f"unknown run state {msg.state!r}; the states are "
                                    f"{', '.join(RUN_STATES)}")
            if not 1 <= msg.limit <= MAX_LIST_LIMIT:
                raise ProtocolError(f"limit must be 1 to {MAX_LIST_LIMIT}, got {msg.limit}")
            if msg.stranded:
                stranded = await self._stranded_runs(msg.workflow)
                return p.RunList(msg.req, stranded[: msg.limit])
            runs = await ctx.store.list_runs(workflow=msg.workflow, state=msg.state,
                                             limit=msg.limit)
            return p.RunList(msg.req, runs)
        if isinstance(msg, p.ListWorkers):
            if not msg.stranded:  # (polled by scripts waiting for workers: no store read)
                return p.WorkerList(msg.req, ctx.dispatcher.workers())
            by_version: dict[tuple[str, str], list[RunRecord]] = {}
            for run in await self._stranded_runs(None):
                by_version.setdefault((run.workflow, run.version), []).append(run)
            versions = tuple(
                p.StrandedVersion(w, v, len(runs), min(r.updated_at for r in runs))
                for (w, v), runs in sorted(by_version.items()))
            return p.WorkerList(msg.req, ctx.dispatcher.workers(), versions)
        if isinstance(msg, SCHEDULE_MESSAGES):
            return await self._answer_schedule(msg, now)
        if isinstance(msg, p.Hello):
            raise ProtocolError("'hello' was already received on this connection")
        return await self._answer_worker(msg, now)

    async def _answer_schedule(self, msg: Any, now: float) -> Any:
        ctx = self.ctx
        if isinstance(msg, p.DefineSchedule):
            record, warning = self._schedule_of(msg, now)
            defined = await ctx.writer.write(ops.DefineSchedule(record, msg.update, now))
            if defined.created or defined.updated:
                ctx.timer.hint(defined.schedule.next_fire_at)
            if warning is not None:
                log.warning("schedule %r: %s", record.id, warning)
            return p.ScheduleDefined(msg.req, defined.schedule, defined.created,
                                     defined.updated, warning)
        if isinstance(msg, p.ListSchedules):
            return p.ScheduleList(msg.req, await ctx.store.list_schedules())
        if isinstance(msg, p.GetSchedule):
            if not 0 <= msg.firings <= MAX_LIST_LIMIT or not 0 <= msg.upcoming <= 100:
                raise ProtocolError(f"firings must be 0 to {MAX_LIST_LIMIT} and upcoming 0 to "
                                    f"100, got {msg.firings} and {msg.upcoming}")
            s = await self._schedule(msg.id)
            times: list[float] = []
            t = s.next_fire_at if not s.paused else sch.next_after(s.cron, s.timezone,
                                                                     s.every, now)
            while len(times) < msg.upcoming:
                times.append(t)
                t = sch.next_after(s.cron, s.timezone, s.every, t)
            firings = await ctx.store.get_firings(s.id, msg.firings)
            runs = []
            for firing in firings:
                if firing.run_id is not None:
                    run = await ctx.store.get_run(firing.run_id)
                    if run is not None:
                        runs.append(run)
            return p.ScheduleInfo(msg.req, s, tuple(times), firings, tuple(runs))
        if isinstance(msg, p.ChangeSchedule):
            if msg.action == "delete":
                existed = await ctx.writer.write(ops.DeleteSchedule(sch.check_id(msg.id)))
                return p.ScheduleChanged(msg.req, None, existed)
            if msg.action not in ("pause", "resume"):
                raise ProtocolError(f"a schedule's action is pause, resume or delete, got "
                                    f"{msg.action!r}")
            changed = await ctx.writer.write(ops.PauseSchedule(msg.id, msg.action == "pause",
                                                               now))
            if not changed.paused:
                ctx.timer.hint(changed.next_fire_at)
            return p.ScheduleChanged(msg.req, changed)
        if isinstance(msg, p.TriggerSchedule):
            if not 0 < len(msg.trigger_id) <= MAX_RUN_ID:
                raise ProtocolError(f"a trigger id must have 1 to {MAX_RUN_ID} characters")
            firing = await ctx.writer.write(ops.TriggerSchedule(msg.id, msg.trigger_id, now))
            if firing.outcome == "fired":
                ctx.dispatcher.poke()
            return p.ScheduleFired(msg.req, (firing,))
        assert isinstance(msg, p.BackfillSchedule)
        firings = await ctx.writer.write(ops.BackfillSchedule(msg.id, msg.start, msg.end, now))
        if any(f.outcome == "fired" for f in firings):
            ctx.dispatcher.poke()
        return p.ScheduleFired(msg.req, firings)

    def _schedule_of(self, msg: p.DefineSchedule, now: float) -> tuple[ScheduleRecord,
                                                                          str | None]:
        """The schedule ``msg`` defines, checked (ScheduleInvalid names what is wrong, and
        nothing is stored), and a warning if no connected worker has its version."""
        ctx = self.ctx
        sch.check_id(msg.id)
        if not msg.workflow:
            raise ScheduleInvalid("a schedule needs a workflow name; nothing was stored")
        if (msg.cron is None) == (msg.every is None):
            raise ScheduleInvalid(f"schedule {msg.id!r}: give either cron= or every= (one of "
                                  "them); nothing was stored")
        tz = sch.check_timezone(msg.timezone).key
        cron = None if msg.cron is None else sch.check_cron(msg.cron, tz)
        every = None if msg.every is None else sch.check_interval(msg.every)
        overlap = sch.check_overlap(msg.overlap)
        window = sch.check_catchup(msg.catchup_window)
        try:
            p.decode_value(msg.payload)
        except PayloadError as exc:
            raise PayloadError(f"schedule {msg.id!r}: {exc}; nothing was stored") from None
        version = msg.version or ctx.dispatcher.latest_version(msg.workflow)
        if version is None:
            known = ", ".join(ctx.dispatcher.known_workflows()) or "none"
            raise UnknownWorkflow(
                f"no worker has registered workflow {msg.workflow!r} (registered: {known}); "
                "give a version to schedule it anyway; nothing was stored")
        warning = None
        if not ctx.dispatcher.serves(msg.workflow, version):
            warning = (f"no connected worker has registered workflow {msg.workflow!r} "
                       f"version {version}: its runs will wait in the queue until one does")
        next_at = sch.next_after(cron, tz, every, now)
        return ScheduleRecord(msg.id, msg.workflow, version, msg.payload, cron, tz, every,
                              overlap, window, False, next_at, None, None, now,
                              now), warning

    async def _schedule(self, schedule_id: str) -> ScheduleRecord:
        s = await self.ctx.store.get_schedule(schedule_id)
        if s is None:
            raise ScheduleNotFound(f"no schedule with id {schedule_id!r}")
        return s

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
                ctx.dispatcher.tell(Ended(self.id, tuple(
                    (lease.run_id, lease.epoch) for lease in msg.leases
                    if lease.run_id in lost)))
            ctx.dispatcher.tell(Alive(self.id, now, tuple(lease.run_id for lease in msg.leases)))
            return p.HeartbeatAck(msg.req, lost, ctx.sources.clock.now())
        if isinstance(msg, p.Drain):
            log.info("session %d (%s): worker %r drains", self.id, self.conn.peer,
                     self.hello.node_id)
            self._draining()
            return p.Ok(msg.req)
        if isinstance(msg, (p.StartStep, p.SaveStep)):
            self._check_owner(msg.lease)
            if isinstance(msg, p.StartStep) and msg.push_id:
                await self._granted(msg.lease, msg.push_id)
                now = ctx.sources.clock.now()  # (the lease it renews runs from its write)
            # A start renews the lease: the worker checks, before the task body, that the
            # lease still holds from when it sent the start (see RunState._may_start).
            step_op: ops.Op[bool] = (ops.StartStep(msg.lease, msg.step, now, ctx.lease_ttl)
                                     if isinstance(msg, p.StartStep)
                                     else ops.SaveStep(msg.lease, msg.step, now))
            await ctx.writer.write(step_op, *_saved(msg.lease, msg.saved, now))
            return p.Ok(msg.req)
        if isinstance(msg, (p.CompleteRun, p.FailRun)):
            finish: ops.Op[RunRecord] = (
                ops.CompleteRun(msg.lease, msg.result, now) if isinstance(msg, p.CompleteRun)
                else ops.FailRun(msg.lease, msg.error_type, msg.error_message, now,
                                 _bounded(msg.traceback)))
            self._check_owner(msg.lease)
            saved = _saved(msg.lease, msg.saved, now) if isinstance(msg, p.CompleteRun) else ()
            try:
                await ctx.writer.write(finish, *saved)
            except AikiError as exc:
                # The reply of a commit lost (or the retry of one, refused as stale): the run
                # may have ended all the same, and no notice of this server's own commit
                # comes back to tell its watchers.
                await self._tell_watchers(msg.lease.run_id)
                self._let_go(msg.lease, exc)
                raise
            self._let_go(msg.lease)
            # (What its end did beyond it, its watchers and parent told, its children's
            # workers if it failed, is acted on at the commit: see ``Server.committed``.)
            return p.Ok(msg.req)
        if isinstance(msg, p.AwaitStep):
            self._check_owner(msg.lease)
            step = await ctx.writer.write(ops.AwaitStep(msg.lease, msg.step, now))
            return p.StepResult(msg.req, step)
        if isinstance(msg, p.AbandonSteps):
            self._check_owner(msg.lease)
            await ctx.writer.write(ops.AbandonSteps(msg.lease, msg.positions, msg.scope, now,
                                                     msg.starts, msg.after))
            return p.Ok(msg.req)
        if isinstance(msg, p.StartChild):
            self._check_owner(msg.lease)
            if not 0 < len(msg.child_id) <= MAX_CHILD_ID:
                raise ProtocolError(f"a child run id must have 1 to {MAX_CHILD_ID} "
                                    f"characters, got {len(msg.child_id)}")
            step = await ctx.writer.write(ops.StartChild(
                msg.lease, msg.step, msg.child_id, msg.workflow, msg.version, msg.payload,
                msg.detached, now))
            ctx.dispatcher.poke()  # the child is queued
            return p.StepResult(msg.req, step)
        op: ops.Op[None]
        if isinstance(msg, p.WaitRun):
            op = ops.WaitRun(msg.lease, msg.conditions, msg.reason, now)
        elif isinstance(msg, p.ReleaseRun):
            # A worker gives runs back only while it drains (or because they were paused),
            # and its Drain may be late or lost: without this, the run would be pushed
            # straight back to it.
            if not msg.paused:
                self._draining()
            op = ops.ReleaseRun(msg.lease, now, "given back paused" if msg.paused
                                else "released by its worker")
        else:
            raise ProtocolError(f"unexpected message {_tag(msg)!r} from a worker")
        self._check_owner(msg.lease)
        try:
            await ctx.writer.write(op)
        except AikiError as exc:
            self._let_go(msg.lease, exc)
            raise
        self._let_go(msg.lease)
        if isinstance(msg, p.WaitRun):
            dues = [c.due_at for c in msg.conditions if c.due_at is not None]
            if dues:
                ctx.timer.hint(min(dues))
        ctx.dispatcher.poke()  # a run given back, or one whose wait held already, is queued
        return p.Ok(msg.req)

    async def _granted(self, lease: Lease, push_id: int) -> None:
        """A task's start its worker sent early, under the lease of the provisional push
        ``push_id``: wait for this seat's verdict on that push (``Dispatcher.claimed``), at
        most a lease's ttl. Refused as stale unless the claim committed that very lease and
        its Confirm was pushed: a lease not committed may be pushed again and granted under
        the same epoch, and this start, from the first push's actor, must not count as the
        new holder's (refused for good, however late it comes)."""
        seat = self.seat
        verdict = None if seat is None else seat.verdicts.get(push_id)
        if verdict is not None and (verdict.run_id, verdict.epoch) != (lease.run_id,
                                                                       lease.epoch):
            verdict = None
        if verdict is not None and not verdict.decided.is_set():
            with trio.move_on_after(self.ctx.lease_ttl):
                await verdict.decided.wait()
        if verdict is None or not verdict.granted:
            why = ("has no verdict here" if verdict is None
                   else "was not confirmed" if verdict.decided.is_set()
                   else "was not judged in time")
            raise StaleLease(f"run {lease.run_id}: its lease of epoch {lease.epoch}, pushed "
                             f"to worker {lease.worker_id!r} before its commit (push "
                             f"{push_id}), {why}")

    def _let_go(self, lease: Lease, failed: AikiError | None = None) -> None:
        """The worker's write that ends its hold of ``lease`` (an end, a wait, a release)
        committed, or was refused: its seat has the slot free. Not when the store did not
        answer (``failed`` unavailable, or the write timed out): the worker still holds the
        lease and sends the write again, and until then a cancel must reach it through this
        seat (else it hears of it only at its next heartbeat) and its slot is not free.
        Nor when it was refused because a client paused the run: the worker holds the lease
        until it gives the run back paused, in a write of its own (seed 6536: a cancel
        committed between the two sent the worker no Revoke)."""
        if not isinstance(failed, (StoreUnavailable, AskTimeout, RunPaused)):
            self.ctx.dispatcher.tell(Ended(self.id, ((lease.run_id, lease.epoch),)))

    async def _enqueue(self, op: ops.Enqueue) -> tuple[ops.EnqueueOutcome, set[str]]:
        """Write ``op``; with a claim for the slot of an idle worker of its version in the
        same transaction when the Dispatcher reserves one (the run is leased in one commit,
        not two: see ``Dispatcher.reserve``). The outcome, and the ids of the runs that
        claim leased (pushed to the worker)."""
        dispatcher = self.ctx.dispatcher
        reserved = dispatcher.reserve((op.workflow, op.version), op.now)
        if reserved is None:
            return await self.ctx.writer.write(op), set()
        seat, claim = reserved
        got: Sequence[ClaimedRun] = ()
        early = dispatcher.assign_early(seat, op, claim)  # (before the commit)
        try:
            out, claimed = await self.ctx.writer.write_all(op, claim)
            if not isinstance(claimed, AikiError):
                got = claimed
        finally:  # (a write that failed or was cancelled: its claim is not known to have
            # committed; a lease it may have granted expires)
            dispatcher.claimed(seat, got, early)
        if isinstance(out, AikiError):
            raise out
        return out, {c.run.id for c in got}

    async def _control(self, msg: p.PauseRun | p.ResumeRun | p.ForkRun, now: float) -> Any:
        """Pause, resume or fork, in the name of this peer (the history says who)."""
        ctx = self.ctx
        assert self.hello is not None
        who = self.hello.node_id
        if isinstance(msg, p.PauseRun):
            run = (await ctx.writer.write(
                ops.PauseRun(msg.run_id, who, now, msg.control_id))).run
            if run.lease_owner is not None:  # its worker hears now, not at its next step
                ctx.dispatcher.push_to_holder(run.id, p.RunControl(run.id, run.lease_epoch))
            return p.Controlled(msg.req, run)
        if isinstance(msg, p.ResumeRun):
            run = (await ctx.writer.write(
                ops.ResumeRun(msg.run_id, who, now, msg.control_id))).run
            # (Its last child ended while it was paused: it ends now, and its watchers and
            # parent hear it from the commit, see ``Server.committed``.)
            if run.state == "queued":
                ctx.dispatcher.poke()
            elif run.state == "waiting":  # (running: its worker held it and runs on)
                dues = [w.due_at for w in await ctx.store.get_waits(run.id)
                        if w.due_at is not None]
                if dues:
                    ctx.timer.hint(min(dues))
            return p.Controlled(msg.req, run)
        if not 0 < len(msg.new_run_id) <= MAX_RUN_ID:
            raise ProtocolError(f"a run id must have 1 to {MAX_RUN_ID} characters, "
                                f"got {len(msg.new_run_id)}")
        run = (await ctx.writer.write(ops.ForkRun(msg.run_id, msg.new_run_id, msg.from_step,
                                                  msg.version, who, now))).run
        ctx.dispatcher.poke()
        ctx.dispatcher.queued_for((run.workflow, run.version), now)
        return p.Controlled(msg.req, run)

    def _draining(self) -> None:
        """This worker drains. At once, not when the Dispatcher reads its mailbox: once the
        worker has its answer, no run is pushed to it (a claim in flight goes back)."""
        if self.seat is not None:
            self.seat.draining = True
        if not self._drain_told:
            self._drain_told = True
            self.ctx.dispatcher.tell(Draining(self.id))

    async def _send_event(self, msg: p.SendEvent, now: float) -> Any:
        ctx = self.ctx
        run = await self._run(msg.run_id)
        if ctx.dispatcher.declares(run.workflow, run.version, msg.event) is False:
            raise UnknownEvent(
                f"workflow {run.workflow!r} version {run.version} does not declare event "
                f"{msg.event!r} (run {run.id}); nothing was stored")
        sent = await ctx.writer.write(ops.SendEvent(msg.run_id, msg.event, msg.payload,
                                                    msg.idempotency_key, now))
        if sent.delivered:
            self._woke(msg.run_id)
        return p.EventSent(msg.req, sent.delivered, sent.duplicate)

    async def _cancel(self, msg: p.CancelRun, now: float) -> p.CancelAnswer:
        ctx = self.ctx
        if not (math.isfinite(msg.grace) and 0 <= msg.grace <= MAX_GRACE):
            raise ProtocolError(f"a cancel's grace must be 0 to {MAX_GRACE:g} seconds, "
                                f"got {msg.grace}")
        if msg.reason is not None and len(msg.reason) > MAX_REASON:
            raise ProtocolError(f"a cancel's reason must have at most {MAX_REASON} "
                                f"characters, got {len(msg.reason)}")
        assert self.hello is not None
        try:
            out = await ctx.writer.write(ops.CancelRun(msg.run_id, msg.reason, msg.grace,
                                                       self.hello.node_id, now))
        except AikiError:
            # A commit whose reply was lost (its retry then finds the run ended, and
            # answers False): the watchers of what it ended must hear all the same.
            await self._tell_tree_of(msg.run_id)
            raise
        if not out.cancelled:
            await self._tell_tree_of(msg.run_id)
        # (The leases it revoked, the runs it queued again to compensate, what it ended and
        # its deadline are acted on at the commit: see ``Server.committed``.)
        return p.CancelAnswer(msg.req, out.cancelled)

    async def _tell_tree_of(self, run_id: str) -> None:
        try:
            run = await self.ctx.store.get_run(run_id)
        except AikiError:
            return
        if run is not None:
            await self._tell_tree(run)

    async def _tell_tree(self, run: RunRecord) -> None:
        """After a cancel: the watchers of every run of ``run``'s tree that ended hear it,
        and so do its parents (reads: best effort)."""
        ctx = self.ctx
        try:
            todo = [run]
            while todo:
                r = todo.pop()
                if r.state in TERMINAL_RUN_STATES:
                    ctx.watchers.ended(r)
                todo.extend(await ctx.store.get_children(r.id))
        except AikiError:
            return
        await self._tell_parents(run)

    async def _tell_parents(self, run: RunRecord) -> None:
        """``run`` ended: its parent's wait for it ended (the parent is queued, or its worker
        told to look again); a parent that then ended too is told up the tree (reads: best
        effort)."""
        ctx = self.ctx
        while run.parent_id is not None:
            ctx.dispatcher.poke()
            ctx.dispatcher.push_to_holder(run.parent_id, p.Nudge(run.parent_id))
            try:
                parent = await ctx.store.get_run(run.parent_id)
            except AikiError:
                return
            if parent is None or parent.state not in TERMINAL_RUN_STATES:
                return
            ctx.watchers.ended(parent)
            run = parent

    async def _tell_watchers(self, run_id: str) -> None:
        """If ``run_id`` has ended, its watchers here hear it, and so do those of the
        ancestors that ended with it (reads: best effort). Its end may have settled its
        parent (whose function had returned and waited for it), and no notice of this
        server's own commit comes back to tell that parent's watchers (seed 31)."""
        try:
            run = await self.ctx.store.get_run(run_id)
        except AikiError:
            return
        if run is not None and run.state in TERMINAL_RUN_STATES:
            self.ctx.watchers.ended(run)
            await self._tell_parents(run)

    def _woke(self, run_id: str) -> None:
        """A wait of ``run_id`` ended: a waiting run is queued (poke the Dispatcher); a held
        one's worker is told to look again."""
        self.ctx.dispatcher.poke()
        self.ctx.dispatcher.push_to_holder(run_id, p.Nudge(run_id))

    async def _stranded_runs(self, workflow: str | None) -> tuple[RunRecord, ...]:
        """Queued runs (the newest 1000) that no connected worker can take, queued longer
        than the stranding threshold."""
        ctx = self.ctx
        queued = await ctx.store.list_runs(workflow=workflow, state="queued",
                                           limit=MAX_LIST_LIMIT)
        return tuple(r for r in queued
                     if ctx.dispatcher.stranded((r.workflow, r.version), r.updated_at,
                                                ctx.sources.clock.now()))

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
                self.unwatch.pop(msg.req, lambda: None)()
                self._push(p.RunEnded(msg.req, run))

        if self._ended:  # (an answer in a peer's task: nothing would unwatch it)
            raise ConnectionLost(f"session {self.id} has ended")
        unwatch = self.ctx.watchers.watch(msg.run_id, notify)
        self.unwatch.pop(msg.req, lambda: None)()  # the same req again replaces the watch
        self.unwatch[msg.req] = unwatch
        if self.ctx.watchers.vouch(msg.run_id):
            return None  # (queued here lately, no end heard: the watcher will hear it)
        try:
            run = await self._run(msg.run_id)
        except BaseException:  # not found, or the session ending meanwhile
            self.unwatch.pop(msg.req, lambda: None)()
            raise
        if run.state in TERMINAL_RUN_STATES:
            notify(run)
        return None


MAX_TRACEBACK = 16 * 1024


def _bounded(traceback: str | None) -> str | None:
    """A traceback cut to its last 16 KiB (where it failed), marked as cut."""
    if traceback is None or len(traceback) <= MAX_TRACEBACK:
        return traceback
    return "... (cut)\n" + traceback[-MAX_TRACEBACK:]


def _tag(msg: Any) -> str:
    return str(getattr(type(msg), "TAG", type(msg).__name__))


def _saved(lease: Lease, steps: tuple[StepRecord, ...], now: float) -> tuple[ops.SaveStep, ...]:
    """The completed task outcomes a worker's write carries, to commit before it."""
    return tuple(ops.SaveStep(lease, step, now) for step in steps)
