"""One seed's world: a server, workers and clients in one ``trio.run`` under faults.

Per seed: a *safety* phase with swarm-drawn fault probabilities, then a *liveness* phase
(every fault off, partitions healed, nodes restarted) in which every acknowledged run must
finish within a bounded virtual time. Every source of randomness is a separate
``random.Random`` derived from the seed and the concern's name, so turning one fault class
off leaves the rest of the seed's world unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import random
import signal
from collections import Counter
from typing import Any

import attrs
import trio
import trio.testing

from aiki import protocol as p
from aiki.actors.link import Link
from aiki.actors.worker import Worker
from aiki.errors import AikiError, ConnectionLost
from aiki.server import Server
from aiki.sources import Sources
from aiki.store.memory import MemoryStore
from simulations import workload
from simulations.network import NetworkFaults, SimNetwork
from simulations.store import Ledger, SimStore, StoreFaults

FAULT_CLASSES = ("crash", "pause", "partition", "network", "store", "clock")
LEASE_TTL = 10.0


@attrs.define
class Config:
    seed: int
    faults: tuple[str, ...] = FAULT_CLASSES
    safety: float = 600.0  # virtual seconds with faults on
    liveness: float = 900.0  # virtual seconds allowed to converge afterwards
    workers: int = 3
    runs: int = 24
    trace: bool = False


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
    net: SimNetwork = attrs.field(init=False)
    store: SimStore = attrs.field(init=False)
    swarm: dict[str, float] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        seed, on = self.cfg.seed, set(self.cfg.faults)
        swarm = random.Random(f"{seed}:swarm")
        # Swarm testing: each class gets its own intensity, or none at all, from the seed.
        self.swarm = {c: (swarm.choice([0.3, 1.0, 3.0]) if c in on else 0.0)
                      for c in FAULT_CLASSES}
        net_faults = NetworkFaults()
        if self.swarm["network"]:
            k = self.swarm["network"]
            net_faults = NetworkFaults(drop=0.002 * k, duplicate=0.01 * k, reorder=0.02 * k,
                                       reset=0.001 * k)
        self.net = SimNetwork(random.Random(f"{seed}:network"), self.trace, net_faults)
        store_faults = StoreFaults()
        if self.swarm["store"]:
            k = self.swarm["store"]
            store_faults = StoreFaults(before_commit=0.005 * k, after_commit=0.005 * k,
                                       driver_bug=0.001 * k, slow=0.01 * k)
        self.store = SimStore(MemoryStore(), random.Random(f"{seed}:store"), self.ledger,
                              self.trace, store_faults)
        clock_rng = random.Random(f"{seed}:clocks")
        for node in ["server", *self.worker_names, "client"]:
            skewed = bool(self.swarm["clock"])
            self.clocks[node] = NodeClock(clock_rng.uniform(-2, 2) if skewed else 0.0,
                                          clock_rng.uniform(-1e-3, 1e-3) if skewed else 0.0)

    @property
    def worker_names(self) -> list[str]:
        return [f"w{i}" for i in range(1, self.cfg.workers + 1)]

    def note(self, text: str) -> None:
        self.trace.append(f"{trio.current_time():.6f} {text}")

    def sources(self, node: str, incarnation: int) -> Sources:
        return Sources(self.clocks[node],
                       random.Random(f"{self.cfg.seed}:ids:{node}:{incarnation}"))

    async def wait_up(self, node: str) -> None:
        while self.faults_on and trio.current_time() < self.down_until.get(node, 0.0):
            await trio.sleep(0.5)

    # -- nodes --------------------------------------------------------------------------
    async def server_node(self) -> None:
        incarnation = 0
        while True:
            await self.wait_up("server")
            incarnation += 1
            self.note(f"server up #{incarnation}")
            server = Server(self.store, self.sources("server", incarnation),  # type: ignore[arg-type]
                            lease_ttl=LEASE_TTL, poll_interval=1.0)
            self.servers.append(server)
            with trio.CancelScope() as scope:
                self.scopes["server"] = scope
                try:
                    await server.serve(self.net.transport("server"), "server")
                except Exception as exc:  # the supervisor escalated: the process dies
                    self.note(f"server died: {type(exc).__name__}")
                    self.stats["server escalation"] += 1
            self.net.poison("server")
            await trio.sleep(0.1)

    async def worker_node(self, name: str) -> None:
        r = random.Random(f"{self.cfg.seed}:node:{name}")
        # w1 serves every version (so each servable run has a worker); the others a subset.
        versions = ["1", "2"] if name == "w1" or r.random() < 0.5 else [r.choice(["1", "2"])]
        slots = r.randint(1, 4)
        # Task starts recorded before each attempt (the default), or only once an attempt runs
        # a while (the at-least-once trade, checked for everything but running again).
        record_start_after = r.choice([0.0, 0.0, 0.05, 1.0])
        incarnation = 0
        while True:
            await self.wait_up(name)
            incarnation += 1
            worker_id = f"{name}.{incarnation}"
            worker = Worker(
                self.net.transport(name), "server", [workload.WORKFLOWS[v] for v in versions],
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

    async def client_node(self, planned: list[workload.PlannedRun]) -> None:
        async with trio.open_nursery() as nursery:
            for item in sorted(planned, key=lambda i: i.at):
                nursery.start_soon(self._enqueue, item)

    async def _enqueue(self, item: workload.PlannedRun) -> None:
        await trio.sleep(item.at)
        self.ledger.issued.add(item.run_id)
        payload = p.encode_value(item.program)
        attempt = 0
        while True:
            attempt += 1
            try:
                with trio.fail_after(30):
                    async with Link.open(self.net.transport("client"), "server",
                                         lambda req: p.Hello(req, "client", item.item),
                                         request_timeout=10) as link:
                        reply = await link.request(lambda req: p.Enqueue(
                            req, "sim", payload, item.version, item.key, item.run_id))
                self.ledger.acked[item.item] = reply.run_id
                self.note(f"acked {item.item} -> {reply.run_id}")
                return
            except (AikiError, ConnectionLost, TimeoutError, trio.TooSlowError):
                await trio.sleep(min(2.0 ** attempt, 20.0))

    # -- faults -------------------------------------------------------------------------
    async def injector(self) -> None:
        r = random.Random(f"{self.cfg.seed}:faults")
        kinds = [k for k in ("crash", "pause", "partition", "store", "clock")
                 if self.swarm[k]]
        if not kinds:
            return
        rate = sum(self.swarm[k] for k in kinds) / 60.0  # events per virtual second
        while True:
            await trio.sleep(r.expovariate(rate))
            kind = r.choice(kinds)
            nodes = ["server", *self.worker_names]
            now = trio.current_time()
            if kind == "crash" and r.random() < 0.25:
                node = r.choice(self.worker_names)
                self.stop(node, grace=r.choice([0.0, 2.0, 10.0]),
                          downtime=r.choice([0.0, 1.0, 5.0, 30.0]))
            elif kind == "crash":
                node = r.choice(nodes)
                self.crash(node, downtime=r.choice([0.0, 1.0, 5.0, 30.0]))
            elif kind == "pause":
                node = r.choice(self.worker_names)
                self.net.isolate(node, nodes)
                self.stats["pause"] += 1
                self.note(f"pause {node}")
                await trio.sleep(LEASE_TTL * r.uniform(1.2, 3.0))
                self.net.heal()
            elif kind == "partition" and r.random() < 0.15:
                # A long hold: one server -> worker link keeps what it is sent for longer than
                # a lease, then delivers it all (a stalled TCP path that recovers). What
                # arrives then, assignments included, is stale.
                link = ("server", r.choice(self.worker_names))
                self.stats["long hold"] += 1
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
            elif kind == "clock":
                node = r.choice(nodes)
                self.clocks[node].offset += r.uniform(-5.0, 5.0)
                self.stats["clock jump"] += 1
                self.note(f"clock jump {node}")

    def crash(self, node: str, downtime: float) -> None:
        scope = self.scopes.get(node)
        if scope is None:
            return
        worker = self.workers.get(node)
        if worker is not None and worker.link is not None and worker.link.in_flight:
            self.ledger.sometimes["crash with a write in flight"] += 1
        self.stats["crash"] += 1
        self.note(f"crash {node} down {downtime}")
        self.down_until[node] = trio.current_time() + downtime
        self.net.poison(node)  # poisoned first: no cleanup can still talk
        scope.cancel()

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
        self.net.faults = NetworkFaults()
        self.net.heal()
        self.store.faults = StoreFaults()

    # -- the run ------------------------------------------------------------------------
    async def run(self) -> None:
        planned = workload.plan(self.cfg.seed, self.cfg.runs, self.cfg.safety)
        workload.bind(self.ledger)
        async with trio.open_nursery() as nursery:
            self.net.nursery = nursery
            nursery.start_soon(self.server_node)
            for name in self.worker_names:
                nursery.start_soon(self.worker_node, name)
            nursery.start_soon(self.client_node, planned)
            with trio.move_on_after(self.cfg.safety):
                await self.injector()
                await trio.sleep_forever()
            self.note("liveness phase")
            self.all_faults_off()
            with trio.move_on_after(self.cfg.liveness):
                await self._converged(planned)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    async def _converged(self, planned: list[workload.PlannedRun]) -> None:
        while True:
            await trio.sleep(5.0)
            if len(self.ledger.acked) < len(planned):
                continue
            runs = self.store.inner.contents().runs
            if all(r.state in ("completed", "failed") or r.version == workload.UNSERVED_VERSION
                   for r in runs.values()):
                return


REAL_TIME_LIMIT = 120.0


class RealTimeExceeded(BaseException):
    pass


def _watchdog_fired(signum: int, frame: Any) -> None:
    raise RealTimeExceeded


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
        trio.run(world.run, clock=clock)
    except (RealTimeExceeded, trio.TrioInternalError) as exc:
        if not isinstance(exc, RealTimeExceeded) and not isinstance(
                exc.__cause__, RealTimeExceeded):
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
    for k in ("drop", "duplicate", "reorder", "reset", "partitioned"):
        if world.net.stats[k]:
            faults[f"net {k}"] += world.net.stats[k]
    for k, v in world.store.stats.items():
        faults[f"store {k}"] += v
    restarts = sum(s.supervisor.restarts for s in world.servers)
    if restarts:
        world.ledger.sometimes["supervisor restart"] += restarts
    if world.net.stats["duplicate"]:
        world.ledger.sometimes["duplicate delivery"] += world.net.stats["duplicate"]
    return Outcome(cfg.seed, digest, clock.current_time(), faults, world.ledger.sometimes,
                   list(world.ledger.violations), runs, world.trace if cfg.trace else [],
                   world.store, world.ledger, cfg.runs)


__all__ = ["Config", "Outcome", "run_seed", "Any"]
