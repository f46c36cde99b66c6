"""The simulated network: a Transport whose links delay, drop, duplicate, reorder and reset
messages, and that can be partitioned (both ways or one way) and clogged.

Each direction has faults of its own: *up* (worker or client to server) and *down* (server
to worker or client), so a stale write from a worker is as likely as a stale assignment.

Every message goes through the real wire codec. Delivery happens in tasks of the network's
own nursery after a latency drawn from the network's random stream, so the whole schedule
follows the seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from aiki import protocol
from aiki.errors import ConnectionLost
from aiki.transport.base import Handler
from simulations.pause import PROCESS

# Nodes whose messages are never dropped on a live connection (as over TCP): a client
# watching a run sends one request and waits as long as it takes, and cannot tell a lost
# request or push from a run that has not ended. Their connections still reset.
LOSSLESS = frozenset({"watcher"})


# Pushes a worker takes in the context of those before them (their encoding's start).
IGNORED_OUT_OF_ORDER = tuple(f'{{"type":"{t}"' for t in ("assign", "confirm", "revoke"))


def pair_of(a: str, b: str) -> tuple[str, str]:
    """Two nodes, in one order whichever way a message went between them."""
    return (a, b) if a <= b else (b, a)


@attrs.define
class NetworkFaults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # chance a message gets extra delay (and so overtakes/is overtaken)
    reset: float = 0.0  # chance a message resets its connection instead of arriving
    # Chance a message is held up (0.1 to 5 s), and those behind it on its connection with
    # it (a retransmission: the order is kept).
    delay: float = 0.0
    latency: float = 0.005


@attrs.define(eq=False)
class SimConnection:
    net: SimNetwork
    node: str
    peer: str
    inbox: trio.MemoryReceiveChannel[str]
    _inbox_send: trio.MemorySendChannel[str]
    other: SimConnection | None = None
    closed: bool = False
    ready_at: float = 0.0  # in-order delivery: nothing on this direction arrives before it
    # Its messages on their way in order, oldest first: each delivery takes the oldest, so
    # two due at one instant arrive as they were sent (their timers' tasks wake in any order).
    in_order: deque[tuple[SimConnection, str]] = attrs.field(factory=deque)
    session: Session | None = None  # a worker's connection to a server: what it carried
    # Pushes coming to this end out of their order, or twice (see ``IGNORED_OUT_OF_ORDER``):
    # read, each marks the pair's connection as having lost a message, from the reading on.
    stale_prone: Counter[str] = attrs.field(factory=Counter)

    async def send(self, msg: Any) -> None:
        text = protocol.encode(msg)
        if self.closed or self.other is None:
            raise ConnectionLost(f"connection {self.node}->{self.peer} is closed")
        await trio.lowlevel.checkpoint()
        self._sent(msg)
        self.net.transmit(self, self.other, text)

    def try_send(self, msg: Any) -> bool:
        text = protocol.encode(msg)
        if self.closed or self.other is None:
            raise ConnectionLost(f"connection {self.node}->{self.peer} is closed")
        self._sent(msg)
        self.net.transmit(self, self.other, text)
        return True  # (a simulated link never makes its sender wait)

    def _sent(self, msg: Any) -> None:
        """Note what the promptness checker reads (sent, whatever the network does to it)."""
        session = self.session
        if session is None:
            return
        now = trio.current_time()
        if self.node == session.worker:
            self.net.worker_says(self.node, msg)
            if isinstance(msg, protocol.StartStep) and msg.push_id:
                lease = msg.lease
                session.early_asked[msg.req] = session.early_sent[msg.req] = (
                    lease.run_id, lease.epoch, msg.push_id)
        else:
            self._judged(session, msg)
        if isinstance(msg, protocol.Hello):
            session.worker_id = msg.node_id
        elif getattr(msg, "lease", None) is not None:
            session.asked[msg.req] = msg.lease.run_id
        elif isinstance(msg, protocol.Refused) and msg.req in session.asked and (
                msg.error_type == "StaleLease"):  # (a write under the lease refused)
            session.revokes.append((now, session.asked[msg.req], None))
        elif isinstance(msg, protocol.Welcome):
            session.welcomed_at = now
        elif isinstance(msg, protocol.Revoke):
            session.revokes.append((now, msg.run_id, msg.epoch))
        elif isinstance(msg, protocol.Heartbeat):  # what the worker holds, as it says
            session.held.append((now, frozenset(
                (lease.run_id, lease.epoch) for lease in msg.leases)))
        elif isinstance(msg, protocol.HeartbeatAck):  # (its renewals refused tell it too)
            session.revokes += [(now, run_id, None) for run_id in msg.lost]
        elif isinstance(msg, protocol.Assign):  # (a newer lease replaces the older's actor)
            session.revokes.append((now, msg.run.id, msg.run.lease_epoch - 1))

    def _judged(self, session: Session, msg: Any) -> None:
        """A server's provisional pushes, its verdict on each, the first it sends of a
        Confirm (the lease committed) and a Revoke (not) of the push's lease, and its
        answers to task starts sent early: one it accepts must name a push it confirmed.
        A Confirm, and an Assign not provisional, must name a lease the store committed
        to this worker (the ledger's ``leases``)."""
        if isinstance(msg, protocol.Assign):
            if msg.provisional:
                session.latest_push[(msg.run.id, msg.run.lease_epoch)] = msg.push_id
            else:
                self._committed(session, msg.run.id, msg.run.lease_epoch, "pushed")
        elif isinstance(msg, (protocol.Confirm, protocol.Revoke)):
            if isinstance(msg, protocol.Confirm):
                self._committed(session, msg.run_id, msg.epoch, "confirmed")
            for (run_id, epoch), push_id in session.latest_push.items():
                # (A Revoke of no epoch, a cancel's: every lease of the run.)
                if run_id == msg.run_id and msg.epoch in (epoch, None):
                    session.verdicts.setdefault(push_id, isinstance(msg, protocol.Confirm))
        elif getattr(msg, "req", None) in session.early_asked:
            run_id, epoch, push_id = session.early_asked[msg.req]
            refused = isinstance(msg, protocol.Refused)
            self.net.sometimes["task start sent early, "
                               + ("refused" if refused else "accepted")] += 1
            verdict = session.verdicts.get(push_id)
            if not refused and not verdict:
                said = {True: "confirmed", False: "revoked first", None: "not judged"}
                self.net.violations.append(
                    f"run {run_id}: server {session.server} accepted a task start worker "
                    f"{session.worker} sent early under push {push_id} of lease epoch "
                    f"{epoch} at t={trio.current_time():.3f}; that push was {said[verdict]} "
                    "on this connection")

    def _committed(self, session: Session, run_id: str, epoch: int, what: str) -> None:
        """A server says a lease was committed to its worker: the ledger must say so too
        (a Confirm of a claim that did not commit that lease would otherwise be caught,
        if at all, only by what its worker then wrote)."""
        if self.net.granted is None:
            return
        granted = self.net.granted(run_id, epoch)
        if granted != session.worker_id:
            self.net.violations.append(
                f"run {run_id}: server {session.server} {what} lease epoch {epoch} to "
                f"worker {session.worker_id} at t={trio.current_time():.3f}; the store "
                + ("never committed that lease" if granted is None
                   else f"committed it to {granted}"))

    async def receive(self) -> Any:
        if self.closed:
            raise ConnectionLost(f"connection {self.node}->{self.peer} is closed")
        try:
            text = await self.inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection {self.node}->{self.peer} was reset") from exc
        if self.stale_prone[text] > 0:
            # (A push ignored as stale has its effect, a provisional run that waits for its
            # lost Confirm, from the moment it is read: its receiver may have been paused.)
            self.stale_prone[text] -= 1
            self.net.lost[pair_of(self.node, self.peer)] = trio.current_time()
        msg = protocol.decode(text)
        session = self.session
        if session is not None and self.node == session.worker:
            early = session.early_sent.pop(getattr(msg, "req", None), None)
            if early is not None and not isinstance(msg, protocol.Refused):
                # (An early start accepted: the lease is committed, as a Confirm says.)
                self.net.confirmed.setdefault(self.node, set()).add(early[:2])
            self.net.worker_hears(self.node, msg)
        return msg

    def close_now(self) -> None:
        """Both directions end at once (a reset, or the node died)."""
        for end in (self, self.other):
            if end is not None and not end.closed:
                end.closed = True
                end._inbox_send.close()
        if self.session is not None:
            self.session.closed()

    async def aclose(self) -> None:
        other = self.other
        self.closed = True
        if self.session is not None:
            self.session.closed()
        self._inbox_send.close()
        if other is not None and not other.closed:
            # The peer learns of the close after a network latency, like a FIN.
            self.net.later(self.net.faults.latency, other.close_now)
        await trio.lowlevel.checkpoint()

    @property
    def peer_name(self) -> str:
        return self.peer


@attrs.define(eq=False)
class Session:
    """What one worker's connection to a server carried, as the promptness checker reads
    it: which worker incarnation said hello, when the server welcomed it, what the server
    told it of leases it lost (when, run, epoch if known: a Revoke, a heartbeat's refused
    renewal, a write under the lease refused as stale, an Assign of a newer lease), the
    leases its heartbeats renewed, and when the connection ended."""

    server: str
    worker: str
    worker_id: str | None = None
    welcomed_at: float | None = None
    closed_at: float | None = None
    revokes: list[tuple[float, str, int | None]] = attrs.field(factory=list)
    asked: dict[int, str] = attrs.field(factory=dict)  # a write's req -> its lease's run
    # A task start the worker sent early: its req -> (run, epoch, push id), for its
    # answers (twice, if duplicated: ``early_asked``) and until its answer is read
    # (``early_sent``). The server's last provisional push of each (run, epoch), and its
    # first verdict on each push (True: confirmed).
    early_asked: dict[int, tuple[str, int, int]] = attrs.field(factory=dict)
    early_sent: dict[int, tuple[str, int, int]] = attrs.field(factory=dict)
    latest_push: dict[tuple[str, int], int] = attrs.field(factory=dict)
    verdicts: dict[int, bool] = attrs.field(factory=dict)
    # The worker's heartbeats on it: when, and the leases (run, epoch) each renewed.
    held: list[tuple[float, frozenset[tuple[str, int]]]] = attrs.field(factory=list)

    def closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()


@attrs.define(eq=False)
class SimNetwork:
    rng: random.Random
    trace: list[str]
    faults: NetworkFaults = attrs.field(factory=NetworkFaults)  # down: from a server
    up_faults: NetworkFaults = attrs.field(factory=NetworkFaults)  # up: to a server
    servers: set[str] = attrs.field(factory=set)
    nursery: trio.Nursery | None = None
    blocked: set[tuple[str, str]] = attrs.field(factory=set)  # (from, to) directions cut
    # Clogged directions hold their messages (in order) until unclogged: swizzle-clog.
    clogged: dict[tuple[str, str], list[tuple[SimConnection, SimConnection, str]]] = (
        attrs.field(factory=dict))
    listeners: dict[str, tuple[str, trio.MemorySendChannel[SimConnection]]] = attrs.field(
        factory=dict)
    connections: list[SimConnection] = attrs.field(factory=list)
    stats: Counter[str] = attrs.field(factory=Counter)
    sessions: list[Session] = attrs.field(factory=list)  # every worker's, in order
    workers: set[str] = attrs.field(factory=set)
    # The leases each worker node was pushed provisionally (``Assign.provisional``), and
    # those it heard were committed (a Confirm, or the lease pushed as any claimed run).
    provisional: dict[str, set[tuple[str, int]]] = attrs.field(factory=dict)
    confirmed: dict[str, set[tuple[str, int]]] = attrs.field(factory=dict)
    violations: list[str] = attrs.field(factory=list)  # the protocol's, seen on the wire
    # (run id, epoch) -> the worker the store committed that lease to, None if it never
    # did: the ledger's, set by the world (unset: pushes are not checked against it).
    granted: Callable[[str, int], str | None] | None = None
    sometimes: Counter[str] = attrs.field(factory=Counter)
    # A pair of nodes (sorted) -> until when a fault of the network touched what one of its
    # connections carried (a message held, duplicated, delayed, reordered), and when one
    # was last lost (dropped, cut off, overflowing, arriving at a closed connection; a
    # connection reset), or a push came out of its order or twice: what the world's slot
    # monitor waits out before it compares a worker's view with its server's (a lost reply
    # leaves its request waiting for its timeout).
    touched: dict[tuple[str, str], float] = attrs.field(factory=dict)
    lost: dict[tuple[str, str], float] = attrs.field(factory=dict)

    def _touch(self, src: SimConnection, dst: SimConnection, until: float) -> None:
        pair = pair_of(src.node, dst.node)
        self.touched[pair] = max(self.touched.get(pair, -math.inf), until)

    def _lose(self, src: SimConnection, dst: SimConnection) -> None:
        self.lost[pair_of(src.node, dst.node)] = trio.current_time()

    def worker_hears(self, worker: str, msg: Any) -> None:
        early = self.provisional.setdefault(worker, set())
        confirmed = self.confirmed.setdefault(worker, set())
        if isinstance(msg, protocol.Assign):
            (early if msg.provisional else confirmed).add((msg.run.id, msg.run.lease_epoch))
        elif isinstance(msg, protocol.Confirm):
            lease = (msg.run_id, msg.epoch)
            if lease in early and lease not in confirmed:
                self.sometimes["run pushed before its commit, then confirmed"] += 1
            confirmed.add(lease)
        elif isinstance(msg, protocol.Revoke) and msg.epoch is not None and (
                (msg.run_id, msg.epoch) in early - confirmed):
            self.sometimes["run pushed before its commit, then revoked"] += 1

    def worker_says(self, worker: str, msg: Any) -> None:
        """A worker writes, renews or announces nothing under a lease pushed to it
        provisionally before it hears that the lease was committed (a Confirm, the lease
        pushed as any claimed run, or a task start sent early accepted), but a task start
        naming the push: one not committed may be granted to it later under the same
        epoch, and its earlier actor's writes would be taken as the new one's (seed 10741
        of an early push without this)."""
        early = self.provisional.get(worker)
        if not early:
            return
        lease = getattr(msg, "lease", None)
        leases = [lease] if lease is not None else [
            *getattr(msg, "leases", ()), *getattr(msg, "held", ())]
        if isinstance(msg, protocol.StartStep) and msg.push_id:
            return  # (sent early: its server holds it for its verdict, see _judged)
        confirmed = self.confirmed.get(worker, set())
        for lease in leases:
            key = (lease.run_id, lease.epoch)
            if key in early and key not in confirmed:
                self.violations.append(
                    f"run {lease.run_id}: worker {worker} sent {type(msg).__name__} under "
                    f"lease epoch {lease.epoch} at t={trio.current_time():.3f}, pushed to it "
                    "provisionally, before it heard the lease was committed")

    def transport(self, node: str) -> SimTransport:
        return SimTransport(self, node)

    # -- faults --------------------------------------------------------------------------
    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        self.blocked.add((a, b))
        if not one_way:
            self.blocked.add((b, a))
        self.stats["partition"] += 1
        self.trace.append(f"{trio.current_time():.6f} partition {a} {b} {one_way}")

    def heal(self) -> None:
        self.blocked.clear()
        for link in list(self.clogged):
            self.unclog(link)

    def clog(self, link: tuple[str, str]) -> None:
        self.clogged.setdefault(link, [])
        self.stats["clog"] += 1
        self.trace.append(f"{trio.current_time():.6f} clog {link[0]}->{link[1]}")

    def unclog(self, link: tuple[str, str]) -> None:
        held = self.clogged.pop(link, [])
        self.trace.append(f"{trio.current_time():.6f} unclog {link[0]}->{link[1]} {len(held)}")
        now = trio.current_time()
        for src, dst, text in held:
            delay = max(self.faults.latency, src.ready_at - now)
            src.ready_at = now + delay
            self._touch(src, dst, now + delay)
            self._in_order(src, dst, text, delay)

    def isolate(self, node: str, nodes: list[str]) -> None:
        for other in nodes:
            if other != node:
                self.partition(node, other)

    def poison(self, node: str) -> None:
        """A node died: every connection it had is reset at once."""
        for conn in self.connections:
            if conn.node == node and not conn.closed:
                conn.close_now()
        self.connections = [c for c in self.connections if not c.closed]

    def later(self, delay: float, fn: Any) -> None:
        assert self.nursery is not None

        async def run() -> None:
            PROCESS.set(None)  # the wire, not the sending process: a pause does not hold it
            await trio.sleep(delay)
            fn()

        self.nursery.start_soon(run)

    def transmit(self, src: SimConnection, dst: SimConnection, text: str) -> None:
        up = dst.node in self.servers
        f = self.up_faults if up else self.faults
        direction = "up" if up else "down"
        r = self.rng
        self.stats["messages"] += 1
        now = trio.current_time()
        if (src.node, dst.node) in self.blocked:
            self.stats["partitioned"] += 1
            self._lose(src, dst)
            return
        held = self.clogged.get((src.node, dst.node))
        if held is not None:
            held.append((src, dst, text))
            self.stats[f"held {direction}"] += 1
            self._touch(src, dst, now)
            return
        if r.random() < f.drop and src.node not in LOSSLESS and dst.node not in LOSSLESS:
            self.stats["drop"] += 1
            self.stats[f"drop {direction}"] += 1
            self._lose(src, dst)
            return
        if r.random() < f.reset:
            self.stats["reset"] += 1
            self._lose(src, dst)
            self.trace.append(f"{trio.current_time():.6f} reset {src.node}->{dst.node}")
            self.later(f.latency, src.close_now)
            return
        copies = 2 if r.random() < f.duplicate else 1
        if copies == 2:
            self.stats["duplicate"] += 1
            self.stats[f"duplicate {direction}"] += 1
        for _ in range(copies):
            delay, faulty = f.latency, copies == 2
            if r.random() < f.delay:
                delay += r.uniform(0.1, 5.0)
                self.stats["delay"] += 1
                self.stats[f"delay {direction}"] += 1
                faulty = True
            reordered = r.random() < f.reorder
            if reordered:  # overtakes, or is overtaken: outside the order
                delay += r.uniform(0, 20 * f.latency)
                self.stats["reorder"] += 1
                self.stats[f"reorder {direction}"] += 1
                faulty = True
            else:
                delay = max(delay, src.ready_at - now)  # not before those sent earlier
                src.ready_at = now + delay
            if faulty:
                self._touch(src, dst, now + delay)
            if (reordered or copies == 2) and text.startswith(IGNORED_OUT_OF_ORDER):
                # (A push a worker takes in the context of the ones before: out of its
                # order, or again, it may be ignored as stale, as good as lost: a Confirm
                # before its Assign, an Assign after its Revoke.)
                self._lose(src, dst)
                dst.stale_prone[text] += 1
            if reordered:
                self.later(delay, lambda: self._arrive(src, dst, text))
            else:
                self._in_order(src, dst, text, delay)

    def _in_order(self, src: SimConnection, dst: SimConnection, text: str,
                  delay: float) -> None:
        # (Not ``_arrive(src, dst, text)`` at its time: of two timers due at one instant,
        # either task may run first, and the connection would reorder what it carries.)
        src.in_order.append((dst, text))

        def oldest() -> None:
            to, what = src.in_order.popleft()
            self._arrive(src, to, what)

        self.later(delay, oldest)

    def _arrive(self, src: SimConnection, dst: SimConnection, text: str) -> None:
        if dst.closed or (src.node, dst.node) in self.blocked:
            self._lose(src, dst)
            return
        try:
            dst._inbox_send.send_nowait(text)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.stats["overflow"] += 1
            self._lose(src, dst)


@attrs.define(eq=False)
class SimTransport:
    net: SimNetwork
    node: str

    async def connect(self, address: str) -> SimConnection:
        """``address``: one server's, or several ("s2,s3,s1"): the first that listens, as
        a client configured with several server addresses (or a load balancer) picks."""
        net = self.net
        await trio.sleep(net.faults.latency)
        listening = [a for a in address.split(",") if a in net.listeners]
        if not listening:
            raise ConnectionLost(f"{self.node}: nothing listens on {address!r}")
        address = listening[0]
        listener = net.listeners[address]
        server_node, accept = listener
        if (self.node, server_node) in net.blocked or (server_node, self.node) in net.blocked:
            await trio.sleep(5.0)  # a connect timeout
            raise ConnectionLost(f"{self.node}: connecting to {address!r} timed out")
        a_send, a_recv = trio.open_memory_channel[str](math.inf)
        b_send, b_recv = trio.open_memory_channel[str](math.inf)
        client = SimConnection(net, self.node, server_node, a_recv, a_send)
        server = SimConnection(net, server_node, self.node, b_recv, b_send)
        client.other, server.other = server, client
        if self.node in net.workers:
            client.session = server.session = Session(server_node, self.node)
            net.sessions.append(client.session)
        net.connections += [client, server]
        try:
            accept.send_nowait(server)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionLost(f"{address!r} stopped listening") from exc
        return client

    async def serve(self, address: str, handler: Handler, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        accept_send, accept_recv = trio.open_memory_channel[SimConnection](math.inf)
        self.net.listeners[address] = (self.node, accept_send)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for conn in accept_recv:
                    nursery.start_soon(_handle, handler, conn)
        finally:
            if self.net.listeners.get(address, (None,))[0] == self.node:
                del self.net.listeners[address]
            accept_send.close()


async def _handle(handler: Handler, conn: SimConnection) -> None:
    try:
        await handler(conn)
    finally:
        conn.close_now()
