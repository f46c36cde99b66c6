"""One seed's world: one to three servers on one store, workers and clients in one
``trio.run`` under faults.

Per seed: a *safety* phase with swarm-drawn fault probabilities, then a *liveness* phase
(every fault off, partitions healed, nodes restarted) in which every acknowledged run must
finish within a bounded virtual time. Every source of randomness is a separate
``random.Random`` derived from the seed and the concern's name, so turning one fault class
off leaves the rest of the seed's world unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import trio
import trio.testing

from aiki import protocol as p
from aiki.actors.link import Link
from aiki.actors.worker import Worker
from aiki.errors import (
    AikiError,
    ConnectionLost,
    ControlRefused,
    PayloadError,
    RunFinished,
    RunNotFound,
    UnknownEvent,
)
from aiki.metrics import Metrics
from aiki.records import TERMINAL_RUN_STATES
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import ops as o
from aiki.store.memory import MemoryStore
from aiki.store.sqlite import SqliteStore
from aiki.transport.base import Handler
from aiki.transport.memory import MemoryTransport
from simulations import workload
from simulations.network import NetworkFaults, Session, SimNetwork, SimTransport
from simulations.pause import PROCESS, Freezer
from simulations.slots import SlotMonitor
from simulations.store import (
    Ledger,
    NoticeChannel,
    NoticeFaults,
    SendLog,
    SimStore,
    StoreFaults,
)

FAULT_CLASSES = ("crash", "pause", "partition", "network", "store", "clock", "notice")
LEASE_TTL = 10.0
# The servers' fallback poll for a shared store (Dispatcher claims, Timer re-reads): what
# recovers a lost notice between two resyncs.
POLL_INTERVAL = 5.0
# How long a waiting run may stay waiting past its due time, counting only the time when a
# server is up, its clock says the time has come, and the store is available: one fallback
# poll (the notice that would have told the server was lost), plus a timer's retries after
# store errors and slow calls.
OVERDUE_BOUND = POLL_INTERVAL + 10.0
# How long a queued run may stay queued while a worker that serves its version has a free
# slot (in its server's Dispatcher's view: not suspect, not draining, its outbox not backed
# up), its server up and the store answering without faults: a claim is made when work may
# have arrived (a poke), not at the next fallback poll. Through another server (its notice
# may be late or lost), one fallback poll more.
CLAIMED_WITHIN = 3.0
# Schedules go on firing this long into the liveness phase, then clients pause them so the
# cluster can come to rest.
SCHEDULES_RUN_ON = 120.0


@attrs.define
class Config:
    seed: int
    faults: tuple[str, ...] = FAULT_CLASSES
    safety: float = 600.0  # virtual seconds with faults on
    liveness: float = 900.0  # virtual seconds allowed to converge afterwards
    workers: int = 3
    servers: int | None = None  # None: one to three, drawn from the seed
    runs: int = 24
    trace: bool = False
    # "memory", or "sqlite": an in-memory SQLite database is the store, the memory model
    # beside it answers every operation too and must agree. None: SQLite on every third
    # seed (those with seed % 3 == 2), so every sweep covers both.
    store: str | None = None

    @property
    def store_kind(self) -> str:
        return self.store or ("sqlite" if self.seed % 3 == 2 else "memory")


@attrs.define
class Outcome:
    seed: int
    trace_hash: str
    virtual_seconds: float
    faults: Counter[str]
    sometimes: Counter[str]
    violations: list[str]
    runs: dict[str, tuple[str, str, str | None]]  # run id -> (state, payload, result)
    trace: list[str]
    store: SimStore
    ledger: Ledger
    runs_planned: int
    # Every server incarnation's metrics sink (a crashed one's too: the ledger survives).
    metrics: list[Metrics] = attrs.field(factory=list)
    # What each worker's connection to a server carried, and each process's pauses
    # ([from, to]): what the promptness checker reads.
    sessions: list[Session] = attrs.field(factory=list)
    pauses: dict[str, list[list[float]]] = attrs.field(factory=dict)


@attrs.define(eq=False)
class NodeClock:
    """A node's wall clock: its own offset and drift over the shared virtual time."""

    offset: float
    drift: float

    def now(self) -> float:
        t = trio.current_time()
        return 1_700_000_000.0 + self.offset + t * (1.0 + self.drift)


@attrs.define(eq=False)
class StopOrder:
    """A graceful stop, once ``given``: drain for ``grace`` seconds (0: hand every run back
    at once), then exit."""

    given: trio.Event = attrs.field(factory=trio.Event)
    grace: float = 0.0


@attrs.define(eq=False)
class World:
    cfg: Config
    ledger: Ledger = attrs.field(factory=Ledger)
    trace: list[str] = attrs.field(factory=list)
    faults_on: bool = True
    stats: Counter[str] = attrs.field(factory=Counter)
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    down_until: dict[str, float] = attrs.field(factory=dict)
    clocks: dict[str, NodeClock] = attrs.field(factory=dict)
    workers: dict[str, Worker] = attrs.field(factory=dict)
    # How to stop each worker's current incarnation gracefully.
    stopping: dict[str, StopOrder] = attrs.field(factory=dict)
    servers: list[Server] = attrs.field(factory=list)
    serving: dict[str, Server] = attrs.field(factory=dict)  # name -> its incarnation now
    server_names: list[str] = attrs.field(factory=list)
    up: set[str] = attrs.field(factory=set)  # servers serving now
    pending: int = 0  # client actions not yet done
    net: SimNetwork = attrs.field(init=False)
    store: SimStore = attrs.field(init=False)
    swarm: dict[str, float] = attrs.field(factory=dict)
    freezer: Freezer = attrs.field(factory=Freezer)
    # Workers to pause (for how long) the moment one of their task starts is acknowledged:
    # between the start record and the task body, where a pause escapes the fencing.
    armed: dict[str, float] = attrs.field(factory=dict)
    # Workers whose outbound links stall (for how long) when they next send a write that
    # ends their lease (a completion, a failure, a wait, a release): what then reaches the
    # server is stale, maybe while the run is leased again (to them or to another worker).
    hold_armed: dict[str, float] = attrs.field(factory=dict)
    # Workers armed as ``armed`` (for how long), whose pause a server's restart with the
    # servers' clock stepped forward (which server, by how much) goes with: see
    # ``injector``'s clock faults.
    restart_armed: dict[str, tuple[float, str, float]] = attrs.field(factory=dict)
    pause_ids: dict[str, int] = attrs.field(factory=dict)
    # A worker in a server's own process (``aiki.embedded`` with ``aiki.worker``): worker
    # name -> server name. Its requests are answered in its own tasks (the memory
    # transport's in-process answers): no network between them; it dies with its server.
    embedded: dict[str, str] = attrs.field(factory=dict)
    incarnations: Counter[str] = attrs.field(factory=Counter)  # of each worker
    worker_of: dict[str, str] = attrs.field(factory=dict)  # worker id -> its node's name
    inside_rng: random.Random = attrs.field(factory=random.Random)  # (seeded below)
    nursery: trio.Nursery | None = None
    _pauses: trio.MemorySendChannel[tuple[str, int, float]] = attrs.field(init=False)
    _pauses_out: trio.MemoryReceiveChannel[tuple[str, int, float]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._pauses, self._pauses_out = trio.open_memory_channel[tuple[str, int, float]](
            math.inf)
        seed, on = self.cfg.seed, set(self.cfg.faults)
        self.inside_rng = random.Random(f"{seed}:inside")
        swarm = random.Random(f"{seed}:swarm")
        # Swarm testing: each class gets its own intensity, or none at all, from the seed.
        self.swarm = {c: (swarm.choice([0.3, 1.0, 3.0]) if c in on else 0.0)
                      for c in FAULT_CLASSES}
        # Each direction (server -> worker or client: down; to a server: up) its own mix.
        directions = random.Random(f"{seed}:swarm-net")
        faults = {}
        for direction in ("down", "up"):
            faults[direction] = NetworkFaults()
            if self.swarm["network"]:
                k = self.swarm["network"] * directions.choice([0.3, 1.0, 1.0, 3.0])
                faults[direction] = NetworkFaults(
                    drop=0.002 * k, duplicate=0.01 * k, reorder=0.02 * k, reset=0.001 * k,
                    delay=0.005 * k)
        self.net = SimNetwork(random.Random(f"{seed}:network"), self.trace, faults["down"],
                              faults["up"])
        self.net.granted = self._granted
        store_faults = StoreFaults()
        if self.swarm["store"]:
            k = self.swarm["store"]
            store_faults = StoreFaults(before_commit=0.005 * k, after_commit=0.005 * k,
                                       driver_bug=0.001 * k, slow=0.01 * k, lag=0.1 * k)
        self.store = SimStore(MemoryStore(), random.Random(f"{seed}:store"), self.ledger,
                              self.trace, store_faults)
        self.store.applying = self._crash_inside_while_written
        self.store.holding = self._holding
        notice_faults = NoticeFaults()
        if self.swarm["notice"]:
            notice_faults = NoticeFaults(delay=0.05 * self.swarm["notice"])
        self.store.notices = NoticeChannel(random.Random(f"{seed}:notices"), self.trace,
                                           notice_faults)
        n = self.cfg.servers or random.Random(f"{seed}:topology").choice([1, 2, 2, 3])
        self.server_names = [f"s{i}" for i in range(1, n + 1)]
        self.net.servers = set(self.server_names)
        self.net.workers = set(self.worker_names)
        self.store.wall = lambda server: self.clocks[server].now()
        clock_rng = random.Random(f"{seed}:clocks")
        for node in [*self.server_names, *self.worker_names, "client"]:
            skewed = bool(self.swarm["clock"])
            self.clocks[node] = NodeClock(clock_rng.uniform(-2, 2) if skewed else 0.0,
                                          clock_rng.uniform(-1e-3, 1e-3) if skewed else 0.0)
        # The servers sharing a store keep one time (one NTP source): each judges the leases
        # and due times the others wrote, so their disagreement would shorten every lease.
        # (Workers and clients keep clocks of their own.) A jump moves them all.
        for name in self.server_names[1:]:
            self.clocks[name] = self.clocks[self.server_names[0]]
        # Half the seeds run the last worker inside the first server's process.
        if self.cfg.workers >= 2 and random.Random(f"{seed}:embedded").random() < 0.5:
            self.embedded[self.worker_names[-1]] = self.server_names[0]

    def _granted(self, run_id: str, epoch: int) -> str | None:
        """The worker the store committed lease ``epoch`` of ``run_id`` to (the ledger)."""
        granted = self.ledger.leases.get((run_id, epoch))
        return None if granted is None else granted[1]

    def _holding(self, worker_id: str | None, run_id: str, epoch: int) -> bool:
        worker = self.workers.get(self.worker_of.get(worker_id or "", ""))
        held = None if worker is None or worker.id != worker_id else worker.held.get(run_id)
        return held is not None and held.lease.epoch == epoch

    @property
    def worker_names(self) -> list[str]:
        return [f"w{i}" for i in range(1, self.cfg.workers + 1)]

    def address(self, home: int) -> str:
        """Where a worker or client attached to server ``home`` connects: that server, or
        failing it the next one that listens."""
        names = self.server_names
        i = home % len(names)
        return ",".join(names[i:] + names[:i])

    def note(self, text: str) -> None:
        self.trace.append(f"{trio.current_time():.6f} {text}")

    def sources(self, node: str, incarnation: int) -> Sources:
        return Sources(self.clocks[node],
                       random.Random(f"{self.cfg.seed}:ids:{node}:{incarnation}"))

    async def wait_up(self, node: str) -> None:
        while self.faults_on and trio.current_time() < self.down_until.get(node, 0.0):
            await trio.sleep(0.5)

    # -- nodes --------------------------------------------------------------------------
    async def server_node(self, name: str) -> None:
        PROCESS.set(name)
        incarnation = 0
        while True:
            await self.wait_up(name)
            incarnation += 1
            self.note(f"{name} up #{incarnation}")
            server = Server(self.store.for_server(name),  # type: ignore[arg-type]
                            self.sources(name, incarnation), lease_ttl=LEASE_TTL,
                            poll_interval=POLL_INTERVAL)
            self.servers.append(server)
            inside = [w for w, home in self.embedded.items() if home == name]
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                self.up.add(name)
                self.serving[name] = server
                try:
                    await self._process(name, server, inside)
                except Exception as exc:  # the supervisor escalated: the process dies
                    self.note(f"{name} died: {type(exc).__name__}")
                    self.stats["server escalation"] += 1
                finally:
                    self.up.discard(name)
                    self.serving.pop(name, None)
                    for worker in inside:  # (they died with it)
                        if worker in self.workers:
                            self.ledger.live_workers.discard(self.workers[worker].id)
            self.net.poison(name)
            await trio.sleep(0.1)

    async def _process(self, name: str, server: Server, inside: list[str]) -> None:
        """Server ``name``'s process: the server, and the workers it runs in-process (on
        the memory transport, checking every message against the codec). It ends when the
        server does."""
        if not inside:
            await server.serve(self.net.transport(name), name)
            return
        memory = MemoryTransport(check_wire=True)
        async with trio.open_nursery() as process:
            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                await server.serve(_Both(self.net.transport(name), memory), name,
                                   task_status=task_status)
                process.cancel_scope.cancel()  # a graceful stop: the process exits

            await process.start(serve)
            for worker in inside:
                process.start_soon(self.worker_node, worker, memory, name)

    async def worker_node(self, name: str, memory: MemoryTransport | None = None,
                          home: str | None = None) -> None:
        """A worker's process, restarted after each exit; or (``memory``) a worker in
        server ``home``'s process, which runs until that process ends: a crash of the
        worker alone cancels its block, as cancelling ``aiki.worker`` does."""
        if memory is None:
            PROCESS.set(name)  # every task of this process (a pause freezes them all)
        r = random.Random(f"{self.cfg.seed}:node:{name}")
        # w1 serves every version (so each servable run has a worker); the others a subset.
        versions = ["1", "2"] if name == "w1" or r.random() < 0.5 else [r.choice(["1", "2"])]
        slots = r.randint(1, 4)
        # Task starts recorded before each attempt (the default), or only once an attempt runs
        # a while (the at-least-once trade, checked for everything but running again).
        record_start_after = r.choice([0.0, 0.0, 0.05, 1.0])
        address = self.address(r.randrange(3)) if home is None else home
        incarnation = self.incarnations.get(name, 0)
        while True:
            await self.wait_up(name)
            incarnation = self.incarnations[name] = incarnation + 1
            worker_id = f"{name}.{incarnation}"
            self.worker_of[worker_id] = name
            worker = Worker(
                self.net.transport(name) if memory is None else memory, address,
                [workload.WORKFLOWS[v] for v in versions],
                worker_id, self.sources(name, incarnation), max_concurrent_runs=slots,
                inline_retry_max=10.0, record_start_after=record_start_after,
            )
            self.workers[name] = worker
            self.ledger.live_workers.add(worker_id)
            if record_start_after > 0:
                self.ledger.deferred_starts.add(worker_id)
            workload.NODE.set(worker_id)
            order = self.stopping[name] = StopOrder()
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._exit_when_link_dies, worker, nursery)
                        nursery.start_soon(self._stop_when_told, worker, order, nursery)
                        await worker.run()
                except Exception as exc:
                    self.note(f"{worker_id} exited: {type(exc).__name__}")
            self.ledger.live_workers.discard(worker_id)
            self.net.poison(name)
            await trio.sleep(r.uniform(0.5, 2.0))  # the process manager restarts it

    async def _stop_when_told(self, worker: Worker, order: StopOrder,
                              nursery: trio.Nursery) -> None:
        # SIGTERM: drain (tasks in flight finish, runs go back at step boundaries), then exit;
        # with no grace, what leaving `aiki.worker` does: stop every run, give it back.
        await order.given.wait()
        if worker.held:
            self.ledger.sometimes["graceful stop with runs held"] += 1
        if order.grace > 0:
            await worker.drain(order.grace)
        else:
            await worker.release_all()
        nursery.cancel_scope.cancel()

    async def _exit_when_link_dies(self, worker: Worker, nursery: trio.Nursery) -> None:
        # Until the Link reconnects by itself, a worker whose connection died exits and its
        # process manager restarts it.
        while True:
            await trio.sleep(1.0)
            link = worker.link
            if link is not None and link.ended is not None:
                nursery.cancel_scope.cancel()
                return

    async def client_node(self, planned: list[workload.PlannedRun],
                          schedules: list[workload.PlannedSchedule]) -> None:
        async with trio.open_nursery() as nursery:
            for item in sorted(planned, key=lambda i: i.at):
                self.pending += 1
                nursery.start_soon(self._client_of, item, nursery)
            for sched in schedules:
                self.pending += 1
                nursery.start_soon(self._scheduler, sched, nursery)

    async def _scheduler(self, sched: workload.PlannedSchedule, nursery: trio.Nursery) -> None:
        """Define ``sched`` (retried until acknowledged: the same definition again returns
        it), then send its triggers."""
        await trio.sleep(sched.at)
        payload = p.encode_value(sched.program)
        await self._ask(sched.server, lambda req: p.DefineSchedule(
            req, sched.id, "sim", payload, "1", sched.cron, "UTC", sched.every,
            sched.overlap, sched.window))
        self.ledger.schedules[sched.id] = sched.overlap
        self.note(f"defined {sched.id}")
        acked = trio.current_time()
        for at, server, trigger_id in sched.triggers:
            self.pending += 1
            nursery.start_soon(self._action, self._trigger, sched, acked + at, server,
                               trigger_id)
        self.pending -= 1

    async def _trigger(self, sched: workload.PlannedSchedule, at: float, server: int,
                       trigger_id: str) -> None:
        await trio.sleep_until(at)
        if self.faults_on:  # (not once clients pause the schedules)
            await self._ask(server, lambda req: p.TriggerSchedule(req, sched.id, trigger_id))

    async def pause_schedules(self) -> None:
        """Late in the liveness phase: clients pause every schedule, so runs stop coming."""
        await trio.sleep(SCHEDULES_RUN_ON)
        for schedule_id in sorted(self.ledger.schedules):
            await self._ask(0, lambda req, sid=schedule_id: p.ChangeSchedule(req, sid, "pause"))
        self.ledger.schedules_paused = True

    async def _client_of(self, item: workload.PlannedRun, nursery: trio.Nursery) -> None:
        """Enqueue ``item``, then start what clients do to the run."""
        await trio.sleep(item.at)
        self.ledger.issued.add(item.run_id)
        payload = p.encode_value(item.program)
        # The workload shares keys between enqueues of other programs: take the key's run.
        reply = await self._ask(item.server, lambda req: p.Enqueue(
            req, "sim", payload, item.version, item.key, item.run_id, "return_existing"))
        self.ledger.acked[item.item] = reply.run_id
        self.note(f"acked {item.item} -> {reply.run_id}")
        if reply.run_id == item.run_id:  # (else a run of another enqueue has the key)
            acked = trio.current_time()
            served = item.version != workload.UNSERVED_VERSION
            actions: list[Any] = [(self._sender, item, acked)]
            actions += [(self._waker, item, acked + at, server) for at, server in item.wakeups]
            actions += [(self._canceller, item, acked + at, server, grace)
                        for at, server, grace in item.cancels]
            if served:
                actions += [(self._racer, item, race) for race in item.races]
            if served and item.watch is not None:
                actions.append((self._watcher, item))
            if served and item.late_watch is not None:
                at, server = item.late_watch
                actions.append((self._late_watcher, item, acked + at, server))
            actions += [(self._reader, item, acked + at, server) for at, server in item.reads]
            for n, control in enumerate(item.controls):
                control_id = f"{item.run_id}-c{n}"  # the same on each resend
                if control.kind == "pause":
                    actions.append((self._pauser, item, acked, control, control_id))
                elif served:
                    actions.append((self._after_end, item, control, control_id))
            for fn, *args in actions:
                self.pending += 1
                nursery.start_soon(self._action, fn, *args)
        self.pending -= 1

    async def _action(self, fn: Any, *args: Any) -> None:
        await fn(*args)
        self.pending -= 1

    async def _ask(self, server: int, make: Any, *, retry: bool = True,
                   timeout: float = 10.0, node: str = "client") -> Any:
        """One request from a client attached to ``server``: retried (a new connection
        each time) until answered, unless ``retry`` is False; a refusal is raised."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with trio.fail_after(timeout + 20):
                    async with Link.open(self.net.transport(node), self.address(server),
                                         lambda req: p.Hello(req, "client", "client"),
                                         request_timeout=10.0) as link:
                        return await link.request(make, timeout, retry=retry)
            except (RunFinished, RunNotFound, UnknownEvent, PayloadError, ControlRefused):
                raise  # an answer
            except (AikiError, TimeoutError, trio.TooSlowError):
                # The store or the connection failed, a StoreWriter crashed, or a duplicated
                # hello's refusal overtook the welcome: again, on a new connection.
                if not retry:
                    raise
            await trio.sleep(min(2.0 ** attempt, 20.0))

    async def _send(self, item: workload.PlannedRun, send: workload.Send) -> None:
        payload = p.encode_value(send.payload)
        log = self.ledger.sends[send.id] = SendLog(item.run_id, send.name, send.key, payload,
                                                   "unknown", trio.current_time(), send.late)
        try:
            reply = await self._ask(send.server, lambda req: p.SendEvent(
                req, item.run_id, send.name, payload, send.key), retry=send.key is not None)
        except RunFinished:
            log.outcome = "RunFinished"
            self.ledger.sometimes["send refused for a finished run"] += 1
            return
        except (AikiError, TimeoutError, trio.TooSlowError):
            return  # a send without a key: not sent again, it may or may not be stored
        log.outcome = ("duplicate" if reply.duplicate else
                       "delivered" if reply.delivered else "buffered")
        if send.late:
            self.ledger.violation(f"send {send.id} to run {item.run_id} was accepted "
                                  f"({log.outcome}) after a client heard the run end")

    async def _sender(self, item: workload.PlannedRun, acked: float) -> None:
        for send in item.sends:  # one after another: their order is the send order
            await trio.sleep_until(acked + send.at)
            await self._send(item, send)

    async def _racer(self, item: workload.PlannedRun, race: workload.Send) -> None:
        # Aim at the wait's timeout: the ledger says when the wait began and its due time.
        k = int(race.position or 0)
        seen = self.ledger.wait_order.setdefault((item.run_id, "race"), [])
        while len(seen) <= k and item.run_id not in self.ledger.ended:
            await trio.sleep(0.5)
        due = self.ledger.wait_due.get((item.run_id, seen[k])) if len(seen) > k else None
        if due is not None:
            await trio.sleep(max(0.0, due + race.delta - self.clocks["client"].now()))
        await self._send(item, race)

    async def _reader(self, item: workload.PlannedRun, at: float, server: int) -> None:
        """What a client asks of a run: its status, then its history (checked against the
        ledger: each a state the run was in while the request was out, each history a
        prefix of the final one that misses nothing committed before it was asked)."""
        await trio.sleep_until(at)
        sent = trio.current_time()
        info = await self._ask(server, lambda req: p.GetRun(req, item.run_id))
        self.ledger.status_reads.append((item.run_id, sent, trio.current_time(),
                                         info.run.state, info.run.result))
        sent = trio.current_time()
        history = await self._ask(server, lambda req: p.GetHistory(req, item.run_id))
        self.ledger.history_reads.append((item.run_id, sent, trio.current_time(),
                                          tuple((e.seq, e.event, e.position, e.attempt)
                                                for e in history.events)))

    async def _waker(self, item: workload.PlannedRun, at: float, server: int) -> None:
        await trio.sleep_until(at)
        reply = await self._ask(server, lambda req: p.Wakeup(req, item.run_id))
        self.ledger.wakeups.append((trio.current_time(), item.run_id, reply.woken))

    async def _canceller(self, item: workload.PlannedRun, at: float, server: int,
                         grace: float) -> None:
        await trio.sleep_until(at)
        asked = trio.current_time()
        reply = await self._ask(server, lambda req: p.CancelRun(req, item.run_id, "sim",
                                                                grace))
        self.ledger.cancels.append((asked, item.run_id, reply.cancelled))
        self.ledger.sometimes["run cancelled" if reply.cancelled
                              else "cancel of a finished run"] += 1

    async def _pauser(self, item: workload.PlannedRun, acked: float,
                      control: workload.Control, control_id: str) -> None:
        """Pause the run at a random moment; resume it ``hold`` seconds later."""
        await trio.sleep_until(acked + control.at)
        try:
            reply = await self._ask(control.server, lambda req: p.PauseRun(
                req, item.run_id, control_id))
        except ControlRefused:
            return  # it ended, or another control paused it (and resumes it)
        self.ledger.sometimes["run paused" + (" while running" if reply.run.lease_owner
                                              else "")] += 1
        await trio.sleep(control.hold)
        try:
            reply = await self._ask(control.server, lambda req: p.ResumeRun(
                req, item.run_id, control_id))
        except ControlRefused:  # another control's resume, sent again, got there first
            self.ledger.sometimes["resume raced by another"] += 1
            return
        if reply.run.state == "waiting":
            self.ledger.sometimes["resumed to wait again"] += 1

    async def _after_end(self, item: workload.PlannedRun, control: workload.Control,
                         control_id: str) -> None:
        """Once the run ended: retry it (if it failed) or fork it."""
        while item.run_id not in self.ledger.ended:
            await trio.sleep(1.0)
        if control.kind == "retry":
            try:
                await self._ask(control.server, lambda req: p.RetryRun(
                    req, item.run_id, control.version, control_id))
            except ControlRefused:
                return  # it completed
            self.ledger.sometimes["failed run retried"] += 1
            return
        self.ledger.issued.add(control.new_id)
        try:
            await self._ask(control.server, lambda req: p.ForkRun(
                req, item.run_id, control.from_step, control.new_id, control.version))
        except ControlRefused:
            self.ledger.sometimes["fork past the end refused"] += 1
            return
        self.ledger.sometimes["run forked"] += 1

    async def _watcher(self, item: workload.PlannedRun) -> None:
        assert item.watch is not None
        self.ledger.watching.add(item.run_id)
        reply = await self._ask(item.watch, lambda req: p.WatchRun(req, item.run_id),
                                timeout=100_000.0, node="watcher")
        self.ledger.heard_end[item.run_id] = (trio.current_time(), reply.run.state,
                                              reply.run.result)
        if item.late is not None:
            await self._send(item, item.late)

    async def _late_watcher(self, item: workload.PlannedRun, at: float, server: int) -> None:
        await trio.sleep_until(at)
        run = self.store.inner.contents().runs.get(item.run_id)
        if run is not None and run.state in TERMINAL_RUN_STATES:
            self.ledger.sometimes["watch begun after its run ended"] += 1
        self.ledger.late_watching.add(item.run_id)
        reply = await self._ask(server, lambda req: p.WatchRun(req, item.run_id),
                                timeout=100_000.0, node="watcher")
        self.ledger.heard_late[item.run_id] = (trio.current_time(), reply.run.state,
                                               reply.run.result)

    async def overdue_monitor(self) -> None:
        """No waiting run stays waiting longer than OVERDUE_BOUND past its due time, counted
        while a server is up whose clock says it is due, and the store is available."""
        overdue: dict[tuple[str, float], float] = {}
        while True:
            await trio.sleep(1.0)
            up = [s for s in self.server_names
                  if s in self.up and not self.freezer.is_paused(s)]
            if not up or trio.current_time() < self.store.faults.unavailable_until:
                continue
            contents = self.store.inner.contents()
            # A schedule's next occurrence is decided within the bound once it is due.
            for sched in contents.schedules.values():
                if sched.paused or not any(self.clocks[s].now() >= sched.next_fire_at
                                           for s in up):
                    continue
                key = (sched.id, sched.next_fire_at)
                overdue[key] = overdue.get(key, 0.0) + 1.0
                if overdue[key] == OVERDUE_BOUND:
                    self.ledger.violation(
                        f"schedule {sched.id}: its occurrence at {sched.next_fire_at:.3f} is "
                        f"still undecided {OVERDUE_BOUND:.0f} s after it came due while "
                        f"servers {up} were up and the store available")
            for run_id, waits in contents.waits.items():
                dues = [w.due_at for w in waits if w.due_at is not None]
                if not dues or contents.runs[run_id].state != "waiting":
                    continue
                due = min(dues)
                if not any(self.clocks[s].now() >= due for s in up):
                    continue
                key = (run_id, waits[0].since)
                overdue[key] = overdue.get(key, 0.0) + 1.0
                if overdue[key] == OVERDUE_BOUND:
                    self.ledger.violation(
                        f"run {run_id} still waits {OVERDUE_BOUND:.0f} s past its due time "
                        f"{due:.3f} ({', '.join(f'{w.kind} at step {w.position}' for w in waits)})"
                        f" while servers {up} were up and the store available")

    async def claim_monitor(self) -> None:
        """No run stays queued CLAIMED_WITHIN seconds (through another server: a fallback
        poll more) while a seat of its server's Dispatcher could take it all along: the
        Dispatcher claims when told work may have arrived, and every commit that queues a
        run must tell it (a lost poke leaves the run to the next poll, or to nothing).
        Counted from when the run was queued last: one claimed and queued again between two
        looks (it waited, and another server woke it) starts its count again (seed 5410)."""
        step = 0.5
        # (run, the seq it was queued at, server, session) -> from when
        since: dict[tuple[str, int | None, str, int], float] = {}
        reported: set[tuple[str, int | None]] = set()  # (run, the seq it was queued at)
        slots = SlotMonitor(self, LEASE_TTL)
        while True:
            await trio.sleep(step)
            slots.look()
            now = trio.current_time()
            if now - self.store.last_fault_at < 2.0 + step or (
                    now < self.store.faults.unavailable_until):
                since.clear()  # (a claim refused or slowed by the store waits for a tick)
                continue
            runs = self.store.queued_runs()
            live: dict[tuple[str, int | None, str, int], float] = {}
            for name, server in self.serving.items():
                if name not in self.up or self.freezer.is_paused(name):
                    continue
                for seat in server.ctx.dispatcher.seats.values():
                    if (seat.free <= 0 or seat.suspect or seat.draining
                            or seat.room() < 2):
                        continue
                    for run in runs:
                        if (run.workflow, run.version) not in seat.workflows:
                            continue
                        queued = self.store.last_seq(run.id, "run.queued")
                        key = (run.id, queued, name, seat.session)
                        live[key] = since.get(key, now)
                        via = None if queued is None else self.ledger.committed.get(queued)
                        bound = CLAIMED_WITHIN + (
                            0.0 if via is not None and via[1] == name else POLL_INTERVAL)
                        if now - live[key] >= bound and (run.id, queued) not in reported:
                            reported.add((run.id, queued))
                            self.ledger.violation(
                                f"run {run.id} stayed queued {now - live[key]:.1f} s while "
                                f"worker {seat.worker_id} on {name} had a free slot for its "
                                f"version all along (server up, store answering)")
            since = live

    # -- faults -------------------------------------------------------------------------
    async def injector(self) -> None:
        r = random.Random(f"{self.cfg.seed}:faults")
        kinds = [k for k in ("crash", "pause", "partition", "store", "clock", "notice")
                 if self.swarm[k]]
        if not kinds:
            return
        rate = sum(self.swarm[k] for k in kinds) / 60.0  # events per virtual second
        while True:
            await trio.sleep(r.expovariate(rate))
            kind = r.choice(kinds)
            nodes = [*self.server_names, *self.worker_names]
            now = trio.current_time()
            if kind == "crash" and r.random() < 0.25:
                node = r.choice(self.worker_names)
                self.stop(node, grace=r.choice([0.0, 2.0, 10.0]),
                          downtime=r.choice([0.0, 1.0, 5.0, 30.0]))
            elif kind == "crash":
                node = r.choice(nodes)
                self.crash(node, downtime=r.choice([0.0, 1.0, 5.0, 30.0]))
            elif kind == "pause":
                # A process pause (GC, SIGSTOP, a VM migration): the whole worker freezes for
                # 0.5 to 4 lease TTLs, its clock going on, then continues where it stood.
                # A server too, a third of the time (not on SQLite seeds: the database lock
                # beside the model would be held through the pause).
                server = r.random() < 0.33 and self.cfg.store_kind == "memory"
                node = r.choice(self.server_names if server else self.worker_names)
                length = LEASE_TTL * r.uniform(0.5, 4.0)
                if not server and r.random() < 0.5:
                    self.armed[node] = length  # at its next task start's acknowledgement
                    self.stats["pause armed"] += 1
                else:
                    self.pause(node, length)
                    await trio.sleep(length)
            elif kind == "partition" and r.random() < 0.15:
                node = r.choice(self.worker_names)
                self.hold_armed[node] = LEASE_TTL * r.uniform(1.5, 4.0)
                self.stats["long hold up armed"] += 1
            elif kind == "partition" and r.random() < 0.1:
                # A node cut off from every other, both ways, for one to three leases.
                node = r.choice(self.worker_names)
                self.net.isolate(node, nodes)
                self.stats["isolate"] += 1
                self.note(f"isolate {node}")
                await trio.sleep(LEASE_TTL * r.uniform(1.2, 3.0))
                self.net.heal()
            elif kind == "partition" and r.random() < 0.2:
                # A long hold: one link between a server and a worker keeps what it is sent,
                # in one direction, for longer than a lease, then delivers it all (a stalled
                # TCP path that recovers). What arrives then is stale: assignments and
                # replies one way, completions, failures and heartbeats the other.
                server, worker = r.choice(self.server_names), r.choice(self.worker_names)
                down = r.random() < 0.5
                link = (server, worker) if down else (worker, server)
                self.stats[f"long hold {'down' if down else 'up'}"] += 1
                self.net.clog(link)
                await trio.sleep(r.uniform(LEASE_TTL * 1.5, LEASE_TTL * 4))
                self.net.unclog(link)
            elif kind == "partition" and r.random() < 0.3:
                # Swizzle-clog: clog links one by one, then unclog them in another order.
                links = [(a, b) for a in nodes for b in nodes if a != b]
                chosen = r.sample(links, r.randint(2, len(links) // 2))
                self.stats["swizzle clog"] += 1
                for link in chosen:
                    self.net.clog(link)
                    await trio.sleep(r.uniform(0.1, 3.0))
                r.shuffle(chosen)
                for link in chosen:
                    await trio.sleep(r.uniform(0.1, 3.0))
                    self.net.unclog(link)
            elif kind == "partition":
                a, b = r.sample(nodes, 2)
                self.net.partition(a, b, one_way=r.random() < 0.5)
                self.stats["partition"] += 1
                await trio.sleep(r.uniform(1.0, 40.0))
                self.net.heal()
            elif kind == "store":
                self.store.faults.unavailable_until = now + r.uniform(0.5, 20.0)
                self.stats["store unavailable"] += 1
                self.note("store unavailable")
            elif kind == "notice":
                # A server's listening connection drops: the notices meanwhile are lost.
                assert self.store.notices is not None
                self.store.notices.cut(r.choice(self.server_names), r.uniform(0.5, 30.0))
            elif kind == "clock" and r.random() < 0.3:
                # A server restarts with the servers' clock stepped forward while it was
                # down (a VM restored from a snapshot, NTP at boot), while a worker sleeps
                # through most of the lease it renewed just before (armed at its next task
                # start's acknowledgement): the restarted server's first reading of its
                # clock comes after the step, and must not expire that lease early by
                # real time (the worker trusts it for 90% of the TTL by its own clock).
                # (It wakes between the lease's expiry by the stepped clock and 90% of the
                # TTL: late enough in that window for another worker to finish the task.)
                jump = r.uniform(3.0, 5.0)
                length = LEASE_TTL - jump + r.uniform(0.6, 0.95) * (jump - 0.1 * LEASE_TTL)
                remote = [w for w in self.worker_names if w not in self.embedded]
                if remote:
                    self.restart_armed[r.choice(remote)] = (
                        length, r.choice(self.server_names), jump)
                    self.stats["restart with a clock step armed"] += 1
            elif kind == "clock":
                node = r.choice(nodes)
                self.jump_clock(node, r.uniform(-5.0, 5.0))

    async def restart_stepped(self, server: str, jump: float) -> None:
        """Crash ``server``, step the servers' clock ``jump`` seconds forward while it is
        down, and let it come back: its first reading of the clock is after the step."""
        await trio.sleep(self.inside_rng.uniform(0.05, 0.3))
        if not self.faults_on:
            return
        self.crash(server, downtime=0.5)
        self.jump_clock(server, jump)
        self.ledger.sometimes["a server restarted after a clock step, a worker asleep in "
                              "its lease"] += 1

    def jump_clock(self, node: str, jump: float) -> None:
        """Move ``node``'s clock by ``jump`` seconds. The servers share one clock, so the
        jump is noted for every node that reads it: the checkers let off a server's early
        judgement after its clock was set back, whichever server's name the jump drew."""
        clock = self.clocks[node]
        clock.offset += jump
        for name, other in self.clocks.items():
            if other is clock:
                self.ledger.clock_jumps[name] += abs(jump)
                if jump < 0:
                    self.ledger.clock_set_back.append((trio.current_time(), name))
        self.stats["clock jump"] += 1
        self.note(f"clock jump {node}")

    def pause(self, node: str, length: float) -> None:
        """Freeze ``node`` now; a task of the world resumes it after ``length`` seconds."""
        if self.freezer.is_paused(node) or self.nursery is None:
            return
        self.pause_ids[node] = pause_id = self.pause_ids.get(node, 0) + 1
        self.freezer.pause(node)
        self.stats["pause server" if node in self.server_names else "pause worker"] += 1
        self.note(f"pause {node} for {length:.3f}")
        self._pauses.send_nowait((node, pause_id, length))

    async def pauser(self) -> None:
        assert self.nursery is not None
        async for node, pause_id, length in self._pauses_out:
            if pause_id < 0:
                self.nursery.start_soon(self._unclog_after, node, length)
            else:
                self.nursery.start_soon(self._resume_after, node, pause_id, length)

    def hold_outbound(self, node: str, length: float) -> None:
        """``node``'s links to every server keep what it sends for ``length`` seconds."""
        links = [(node, server) for server in self.server_names]
        self.stats["long hold up"] += 1
        for link in links:
            self.net.clog(link)
        self._pauses.send_nowait((node, -1, length))

    async def _unclog_after(self, node: str, length: float) -> None:
        await trio.sleep(length)
        for server in self.server_names:
            if (node, server) in self.net.clogged:
                self.net.unclog((node, server))

    async def _resume_after(self, node: str, pause_id: int, length: float) -> None:
        await trio.sleep(length)
        if self.pause_ids.get(node) == pause_id and self.freezer.is_paused(node):
            self.note(f"resume {node}")
            self.freezer.resume(node)

    def crash(self, node: str, downtime: float) -> None:
        scope = self.scopes.get(node)
        if scope is None:
            return
        self.armed.pop(node, None)
        self.restart_armed.pop(node, None)
        if self.freezer.is_paused(node):  # a paused process is killed: it dies as it stands
            self.freezer.resume(node)
        worker = self.workers.get(node)
        if worker is not None and worker.link is not None and worker.link.in_flight:
            self.ledger.sometimes["crash with a write in flight"] += 1
        self.stats["crash"] += 1
        self.note(f"crash {node} down {downtime}")
        self.down_until[node] = trio.current_time() + downtime
        self.net.poison(node)  # poisoned first: no cleanup can still talk
        scope.cancel()

    def _crash_inside_while_written(self, ops: Sequence[Any]) -> None:
        """Sometimes crash a worker in its server's process while a write of one of its runs
        that others must hear of is being applied (the run's end, a wait, a child started):
        the request is being answered in the worker's own task, which the crash cancels.
        The server must finish what it was asked all the same (tell the run's watchers and
        parent, the Timer of a wait's due time, the Dispatcher of a run queued), as it
        would a message it had read. Sometimes the commit's answer is lost too: the write
        committed, the server saw a failure, and its asker is gone (seed 695: the run's
        watcher never heard)."""
        if not self.faults_on or not self.embedded:
            return
        for op in ops:
            what = _CUT_SHORT.get(type(op))
            if what is not None:
                name = self.worker_of.get(op.lease.worker_id)
                if name in self.embedded and self.inside_rng.random() < 0.2:
                    self.ledger.sometimes[f"in-process worker crashed while {what}"] += 1
                    if self.store.faults.after_commit and self.inside_rng.random() < 0.5:
                        # and the commit's answer lost (with the store's faults on)
                        self.ledger.sometimes[f"in-process worker crashed while {what}, "
                                              "its commit's answer lost"] += 1
                        self.store.lose_answer = True
                    self.crash(name, self.inside_rng.uniform(0.5, 5.0))
                    return

    def stop(self, node: str, grace: float, downtime: float) -> None:
        order = self.stopping.get(node)
        if order is None or order.given.is_set():
            return
        self.stats["graceful stop"] += 1
        self.note(f"stop {node} grace {grace} down {downtime}")
        self.down_until[node] = trio.current_time() + downtime
        order.grace = grace
        order.given.set()

    def all_faults_off(self) -> None:
        self.faults_on = False
        self.armed.clear()
        self.hold_armed.clear()
        self.restart_armed.clear()
        self.freezer.resume_all()
        self.net.faults = NetworkFaults()
        self.net.up_faults = NetworkFaults()
        self.net.heal()
        self.store.faults = StoreFaults()
        assert self.store.notices is not None
        self.store.notices.heal()

    # -- the run ------------------------------------------------------------------------
    async def run(self) -> None:
        planned = workload.plan(self.cfg.seed, self.cfg.runs, self.cfg.safety)
        schedules = workload.plan_schedules(self.cfg.seed, self.cfg.safety)
        workload.bind(self.ledger, self.clocks)
        if self.cfg.store_kind == "sqlite":
            self.store.db = await SqliteStore.open(":memory:", offload=False)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.pauser)
            self.net.nursery = nursery
            assert self.store.notices is not None
            self.store.notices.nursery = nursery
            for name in self.server_names:
                nursery.start_soon(self.server_node, name)
            nursery.start_soon(self.overdue_monitor)
            nursery.start_soon(self.claim_monitor)
            for name in self.worker_names:
                if name not in self.embedded:  # (those start with their server)
                    nursery.start_soon(self.worker_node, name)
            nursery.start_soon(self.client_node, planned, schedules)
            with trio.move_on_after(self.cfg.safety):
                await self.injector()
                await trio.sleep_forever()
            self.note("liveness phase")
            self.all_faults_off()
            with trio.move_on_after(self.cfg.liveness):
                self.pending += 1
                nursery.start_soon(self._action, self.pause_schedules)
                await self._converged(planned)
            await trio.sleep(1.0)
            self.freezer.resume_all()
            nursery.cancel_scope.cancel()
        for history in self.store.inner.contents().history.values():
            for e in history:  # (what the in-process workers did, for the sweep's count)
                if (e.event == "task.completed" and e.worker_id is not None
                        and e.worker_id.partition(".")[0] in self.embedded):
                    self.ledger.sometimes["task completed by an in-process worker"] += 1
        if self.store.db is not None:
            await self.store.db.aclose()

    async def _converged(self, planned: list[workload.PlannedRun]) -> None:
        while True:
            await trio.sleep(5.0)
            if len(self.ledger.acked) < len(planned) or self.pending:
                continue
            runs = self.store.inner.contents().runs
            if all(r.state in TERMINAL_RUN_STATES or r.version == workload.UNSERVED_VERSION
                   for r in runs.values()):
                return


@attrs.define
class _Both:
    """A server's listeners in one process: the simulated network's and the memory
    transport's, for the workers in that process."""

    net: SimTransport
    memory: MemoryTransport

    async def connect(self, address: str) -> Any:
        return await self.net.connect(address)

    async def serve(self, address: str, handler: Handler, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.memory.serve, address, handler)
            await self.net.serve(address, handler, task_status=task_status)
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def replies_checked(world: World) -> Iterator[None]:
    """Every request a Link makes, by a worker or a client, gets its reply or raises.

    A reply is a message answering one of the request's own attempts (its ``req``); a
    request that resolves with anything else (``None`` from a connection that dropped, say)
    is a violation, and raised to its caller as a lost connection so the world goes on.
    Here too a worker armed for a pause freezes the moment a task start is acknowledged.
    """
    real = Link.request

    async def request(self: Link, make: Any, timeout: float | None = None, *,
                      retry: bool = True) -> Any:
        sent: list[tuple[int, str]] = []

        def tracked(req: int) -> Any:
            msg = make(req)
            sent.append((req, type(msg).__name__))
            return msg

        node = PROCESS.get()
        pauses = world.freezer.pauses_of(node)
        if node is not None and node in world.hold_armed and type(make(0)).__name__ in (
                "CompleteRun", "FailRun", "WaitRun", "ReleaseRun"):
            world.hold_outbound(node, world.hold_armed.pop(node))
        reply = await real(self, tracked, timeout, retry=retry)
        what = sent[-1][1] if sent else "?"
        if reply is None or getattr(reply, "req", None) not in {req for req, _ in sent}:
            world.ledger.violation(
                f"a {what} request of {node or 'a client'} resolved as {reply!r}, not a "
                f"reply to it (attempts {[req for req, _ in sent]}): a request must get its "
                "reply or raise")
            raise ConnectionLost("the harness refused a request resolved without its reply")
        if what == "StartStep" and node is not None:
            length = world.armed.pop(node, None)
            if length is None and node in world.restart_armed and world.nursery is not None:
                length, server, jump = world.restart_armed.pop(node)
                token = PROCESS.set(None)  # the world's task, not frozen with the worker
                try:
                    world.nursery.start_soon(world.restart_stepped, server, jump)
                finally:
                    PROCESS.reset(token)
            if length is not None:
                world.pause(node, length)
                await trio.lowlevel.checkpoint()  # frozen here, the start acknowledged
            if world.freezer.pauses_of(node) != pauses:
                world.ledger.sometimes["task start after a pause"] += 1
        return reply

    Link.request = request  # type: ignore[method-assign]
    try:
        yield
    finally:
        Link.request = real  # type: ignore[method-assign]


REAL_TIME_LIMIT = 120.0
# The writes of an in-process worker the world may crash it during (see
# ``_crash_inside_while_written``), and what each is called in the situations.
_CUT_SHORT: dict[type, str] = {o.CompleteRun: "its run ended", o.FailRun: "its run ended",
                               o.WaitRun: "its run waited",
                               o.StartChild: "starting a child"}
# History events that are situations a batch must reach: (event, first word of its detail,
# written under a worker's lease).
SITUATIONS = {
    ("sleep.completed", "woken", False): "sleep woken early",
    # An event taken from the buffer when the wait is reached: sent before its wait.
    ("event.received", "sent", True): "event buffered before its wait",
    # A send that queues a waiting run (its slot was given back).
    ("run.queued", "event", False): "event delivered to a waiting run",
    ("event.timed_out", "due", False): "event wait timed out",
    ("event.timed_out", "due", True): "event wait timed out",
}


# What became of schedule occurrences: (outcome, reason, skipped by 'skip').
SCHEDULE_SITUATIONS = {
    ("fired", "scheduled", False): "schedule fired on time",
    ("fired", "catch-up", False): "schedule caught up after downtime",
    ("fired", "buffered", False): "schedule occurrence buffered then fired",
    ("skipped", "scheduled", True): "schedule occurrence skipped by overlap",
    ("skipped", "catch-up", False): "schedule occurrences past the catch-up window",
    ("fired", "trigger", False): "schedule triggered",
}


class RealTimeExceeded(BaseException):
    pass


def _watchdog_fired(signum: int, frame: Any) -> None:
    raise RealTimeExceeded


def _stuck(exc: BaseException) -> bool:
    """Whether the watchdog's exception is what ended the run, however Trio wrapped it: as
    itself, as the cause of a TrioInternalError, or inside the exception groups of the
    nurseries it crossed on its way out."""
    if isinstance(exc, RealTimeExceeded):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_stuck(inner) for inner in exc.exceptions)
    return exc.__cause__ is not None and _stuck(exc.__cause__)


def run_seed(cfg: Config) -> Outcome:
    """Run one seed, deterministically, and return what happened (checked by checkers)."""
    engine_log = logging.getLogger("aiki")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL)  # faults make the engine log a lot; restored below
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio._core._run._r.seed(cfg.seed)
    world = World(cfg)
    clock = trio.testing.MockClock(autojump_threshold=0)
    # The real-time watchdog: virtual time bounds every phase, but a loop that never lets
    # virtual time advance (or never reaches a checkpoint) would spin forever.
    previous = signal.signal(signal.SIGALRM, _watchdog_fired)
    signal.setitimer(signal.ITIMER_REAL, REAL_TIME_LIMIT)
    try:
        with world.freezer.installed(), replies_checked(world):
            trio.run(world.run, clock=clock)
    except BaseException as exc:
        if not _stuck(exc):
            raise
        world.ledger.violation(
            f"seed {cfg.seed} did not finish within {REAL_TIME_LIMIT:.0f} real seconds: "
            f"stuck at virtual t={clock.current_time():.3f} (a loop that never lets virtual "
            "time advance?)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        engine_log.setLevel(level)
    runs = {r.id: (r.state, r.payload, r.result)
            for r in world.store.inner.contents().runs.values()}
    for run_id in sorted(runs):
        world.trace.append(f"end {run_id} {runs[run_id][0]} {runs[run_id][2]}")
    digest = hashlib.sha256("\n".join(world.trace).encode()).hexdigest()
    faults = Counter({k: v for k, v in world.stats.items()})
    for k, n in world.net.stats.items():
        if k not in ("messages", "clog", "partition", "overflow") and n:
            faults[f"net {k}"] += n
    for k, v in world.store.stats.items():
        faults[f"store {k}"] += v
    restarts = sum(s.supervisor.restarts for s in world.servers)
    if restarts:
        world.ledger.sometimes["supervisor restart"] += restarts
    if world.net.stats["duplicate"]:
        world.ledger.sometimes["duplicate delivery"] += world.net.stats["duplicate"]
    assert world.store.notices is not None
    for k, v in world.store.notices.stats.items():
        faults[k] += v
    world.ledger.sometimes["deadline scope expired"] += sum(
        1 for d in world.ledger.deadlines if d[4])
    for steps in world.store.inner.contents().steps.values():
        addresses = Counter((s.name, s.input_hash) for s in steps
                            if s.kind == "task" and s.idempotency_key is None)
        if any(n > 1 for n in addresses.values()):
            world.ledger.sometimes["duplicate content address in one run"] += 1
    for firings in world.store.inner.contents().firings.values():
        for f in firings:
            situation = SCHEDULE_SITUATIONS.get((f.outcome, f.reason, f.detail is not None and
                                                 "(overlap 'skip')" in f.detail))
            if situation is not None:
                world.ledger.sometimes[situation] += f.count
            if f.detail is not None and "is cancelled (overlap 'cancel_previous')" in f.detail:
                world.ledger.sometimes["schedule occurrence cancelled its previous run"] += 1
    for history in world.store.inner.contents().history.values():
        paused = False
        for e in history:
            situation = SITUATIONS.get((e.event, (e.detail or "").split(" ")[0],
                                        e.worker_id is not None))
            if situation is not None:
                world.ledger.sometimes[situation] += 1
            if e.event == "join.ended" and e.detail:
                world.ledger.sometimes[f"parent woken by a child {e.detail.split()[-1]}"] += 1
            elif e.event == "run.waiting" and (e.detail or "").startswith("its function"):
                world.ledger.sometimes["run waited for its children"] += 1
            elif e.event == "cancel.requested" and ", through run " in (e.detail or ""):
                world.ledger.sometimes["cancel reached a descendant"] += 1
            elif e.event == "run.queued" and "the deadline of the scope" in (e.detail or ""):
                world.ledger.sometimes["run woken at its deadline"] += 1
            elif (e.detail or "").startswith("DeadlineExceeded: its deadline scope"):
                world.ledger.sometimes["step abandoned at a deadline"] += 1
            if e.event == "run.paused":
                paused = True
                if "keeps its waits" in (e.detail or ""):
                    world.ledger.sometimes["run paused while waiting"] += 1
            elif (e.detail or "").startswith("resumed by"):
                paused = False
            elif paused and e.event in ("task.completed", "task.failed", "task.retrying"):
                world.ledger.sometimes["task in flight recorded while paused"] += 1
    world.ledger.sometimes.update(world.net.sometimes)
    return Outcome(cfg.seed, digest, clock.current_time(), faults, world.ledger.sometimes,
                   [*world.ledger.violations, *world.net.violations], runs,
                   world.trace if cfg.trace else [],
                   world.store, world.ledger, cfg.runs,
                   [server.sources.metrics for server in world.servers],
                   world.net.sessions, world.freezer.spans)


__all__ = ["Config", "Outcome", "run_seed", "Any"]
