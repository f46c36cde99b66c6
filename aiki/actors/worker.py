"""The worker: one Link to the server, a heartbeat, and one Run actor per assigned run.

Owns: the leases it holds (run id → lease and the cancel scope of that run's actor). A lease
the server reports lost cancels its run at once. The Link reconnects by itself after a lost
connection; the worker's hello then re-announces the leases it still holds and it heartbeats
at once, so runs keep going across a reconnect (or are cancelled if their lease is gone).

Stopping, three ways. Cancelled, it stops like a crashed process: it says nothing more, and
its runs go to other workers once their leases expire. ``release_all`` (leaving
``aiki.worker`` normally) stops every run and gives its lease back now. ``drain(grace)``
(SIGTERM) tells the server to send no more runs, lets each task in flight finish and
checkpoint, gives each run back at its next step boundary, and after ``grace`` seconds
releases whatever is left.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import attrs
import trio

from aiki import protocol as p
from aiki.actors.link import Backoff, Link, open_when_reachable
from aiki.actors.outcomes import Flusher
from aiki.actors.run import (
    DEFAULT_RECORD_START_AFTER,
    Abandon,
    Nudges,
    Persist,
    RunState,
    TaskDefinition,
    TaskRunner,
    WorkflowDefinition,
    call_task,
    run_workflow,
)
from aiki.actors.server_time import ServerTime
from aiki.errors import AikiError
from aiki.metrics import RECONNECTS, WORKER_SLOTS_MAX, WORKER_SLOTS_USED
from aiki.observability import HttpApp, metrics_page, routes
from aiki.records import Lease
from aiki.sources import Sources
from aiki.task_styles import DEFAULT_TASK_THREADS, task_runtime
from aiki.transport.base import Transport

log = logging.getLogger("aiki.worker")
# The share of a lease's TTL kept as a safety margin before its local deadline.
LEASE_MARGIN = 0.1


@attrs.define
class _OnItsWay:
    count: int = 0  # assignments of one lease queued for the run loop
    revoked: bool = False


@attrs.define(eq=False)
class Held:
    lease: Lease
    scope: trio.CancelScope
    nudges: Nudges = attrs.field(factory=Nudges)
    # Set when the run is to be given back at its next step boundary: the worker drains,
    # or a client paused the run.
    stop: trio.Event = attrs.field(factory=trio.Event)
    paused: bool = False  # why ``stop`` is set: a client paused the run (else a drain)
    # When the lease was last known renewed (this process's clock): the assignment's
    # arrival, then the sending of each heartbeat whose reply kept it. A lease lasts no
    # longer than the server's lease TTL from then.
    renewed: float = attrs.field(factory=trio.current_time)
    state: RunState | None = None  # the run actor's, once it runs
    # Set once the lease is known committed: from the start, but for a provisional
    # assignment (``Assign.provisional``), whose actor writes nothing (but a task's start
    # naming its push) and starts no task body before.
    confirmed: trio.Event = attrs.field(factory=lambda: _set(trio.Event()))
    push_id: int = 0  # a provisional assignment's (``Assign.push_id``)

    def running(self, state: RunState) -> None:
        """The run actor has its state: a stop from now on reaches its shields too."""
        self.state = state
        # (Stopped already: by the worker, or with it, cancelled from outside before the run
        # was in ``held`` for its stopper to find.)
        if self.scope.cancel_called or trio.current_effective_deadline() == -math.inf:
            state.stop()

    def cancel(self) -> None:
        """Stop the run's actor, its ``run.shield()`` blocks included (Trio's shield holds
        off every cancellation from outside it, its actor's scope's too)."""
        self.scope.cancel()
        if self.state is not None:
            self.state.stop()


# An assignment to start, with its run's ``Held`` if it is provisional (held as it arrived,
# see Worker._take_provisional).
_Taken = tuple[p.Assign, Held | None]


@attrs.define(eq=False)
class Worker:
    transport: Transport
    address: str
    workflows: Sequence[WorkflowDefinition]
    id: str
    sources: Sources
    max_concurrent_runs: int = 10
    inline_retry_max: float = 10.0
    record_start_after: float = DEFAULT_RECORD_START_AFTER
    token: str | None = None
    # Plain-``def`` tasks of this worker's runs that may run at once (each in a thread).
    task_threads: int = DEFAULT_TASK_THREADS
    reconnect: Backoff | None = attrs.field(factory=Backoff)
    request_timeout: float = 30.0
    run_task: TaskRunner = call_task  # how task bodies are called (a test may stand in)
    # The client the worker was started from (``aiki.worker(client, ...)``): the handles of
    # child runs (``child.handle``) go through it.
    client: Any = None
    # Seconds to keep trying while the server cannot be reached at start (0: fail at once).
    connect_timeout: float = 0.0
    held: dict[str, Held] = attrs.field(factory=dict)
    link: Link | None = None
    runs_started: int = 0
    _registry: dict[tuple[str, str], WorkflowDefinition] = attrs.field(factory=dict)
    _assignments: tuple[trio.MemorySendChannel[_Taken], trio.MemoryReceiveChannel[_Taken]] = (
        attrs.field(factory=lambda: trio.open_memory_channel[_Taken](1024))
    )
    # The leases of assignments on their way to their actors (in ``_assignments``): how
    # many of each, and whether a Revoke of it came meanwhile (none starts then).
    _unstarted: dict[tuple[str, int], _OnItsWay] = attrs.field(factory=dict)
    # Set when the worker starts draining: Run actors give their runs back at step boundaries.
    draining: trio.Event = attrs.field(factory=trio.Event)
    _held_changed: trio.Event = attrs.field(factory=trio.Event)
    _beat_now: trio.Event = attrs.field(factory=trio.Event)
    # This worker process, the same across reconnections: the server lets a reconnection
    # take over this worker's id, and refuses another process that claims it while we live.
    incarnation: str = ""
    # Completed task outcomes ride with their run's next write; this sends the strays.
    flusher: Flusher = attrs.field(factory=Flusher)
    # The server's clock, as its replies tell it: the clock of durable deadlines.
    server_time: ServerTime = attrs.field(init=False)
    _hello_sent: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        self.server_time = ServerTime(self.sources.clock)
        if not self.incarnation:
            self.incarnation = self.sources.short_id()
        if self.max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs must be >= 1, got {self.max_concurrent_runs}")
        for wf in self.workflows:
            key = (wf.name, wf.version)
            if key in self._registry:
                raise ValueError(f"workflow {wf.name!r} version {wf.version!r} is given twice")
            self._registry[key] = wf

    def _hello(self, req: int) -> p.Hello:
        self._hello_sent = trio.current_time()  # (the welcome's reading of the server's clock)
        # A draining worker that reconnects offers no slots: the new session must not hand it
        # runs it would only give back.
        slots = 0 if self.draining.is_set() else self.max_concurrent_runs
        return p.Hello(
            req, "worker", self.id,
            tuple(p.WorkflowRef(name, version, tuple(getattr(wf, "events", ())))
                  for (name, version), wf in self._registry.items()),
            slots, self._committed_leases(), self.token,
            incarnation=self.incarnation,
        )

    def _on_push(self, msg: Any) -> None:
        if isinstance(msg, p.Nudge):
            held = self.held.get(msg.run_id)
            if held is not None:
                held.nudges.nudge()
        elif isinstance(msg, p.Revoke):
            # A cancel revoked the lease: its task bodies in flight are cancelled by Trio at
            # their next checkpoint, and nothing more is written under it (the store would
            # refuse it anyway). The run comes back under a new lease, to compensate.
            held = self.held.get(msg.run_id)
            if held is not None and (msg.epoch is None or held.lease.epoch <= msg.epoch):
                del self.held[msg.run_id]
                log.info("worker %s: run %s was cancelled%s; stopping it", self.id,
                         msg.run_id, f" ({msg.reason})" if msg.reason else "")
                held.cancel()
                self._held_changed.set()
            # An assignment of it still on its way to its actor is not started (its Assign
            # and this Revoke came in one read, before the run loop took the Assign).
            for (run_id, epoch), on_its_way in self._unstarted.items():
                if run_id == msg.run_id and (msg.epoch is None or epoch <= msg.epoch):
                    on_its_way.revoked = True
        elif isinstance(msg, p.RunControl):
            held = self.held.get(msg.run_id)
            if held is not None and held.lease.epoch == msg.epoch and msg.action == "pause":
                log.info("worker %s: run %s was paused; giving it back at its next step "
                         "boundary", self.id, msg.run_id)
                held.paused = True
                held.stop.set()
        elif isinstance(msg, p.Confirm):
            held = self.held.get(msg.run_id)
            if held is not None and held.lease.epoch == msg.epoch:
                held.confirmed.set()
        elif isinstance(msg, p.Assign) and msg.provisional:
            self._take_provisional(msg)
        elif isinstance(msg, p.Assign):
            try:
                self._assignments[0].send_nowait((msg, None))
            except trio.WouldBlock:
                log.warning("worker %s: dropped assignment of run %s", self.id, msg.run.id)
                return
            key = (msg.run.id, msg.run.lease_epoch)
            self._unstarted.setdefault(key, _OnItsWay()).count += 1

    def _take_provisional(self, assign: p.Assign) -> None:
        """Hold the run of a provisional ``assign`` as the push arrives (its Confirm or
        Revoke, right behind it, finds it held), and have its actor started."""
        lease = Lease(assign.run.id, assign.run.lease_epoch, self.id)
        held = self.held.get(lease.run_id)
        if held is not None:
            if held.lease.epoch >= lease.epoch:
                return  # a duplicated (or late) assignment
            held.cancel()  # a newer lease replaces the old actor
        mine = Held(lease, trio.CancelScope(), confirmed=trio.Event(), push_id=assign.push_id)
        try:
            self._assignments[0].send_nowait((assign, mine))
        except trio.WouldBlock:
            log.warning("worker %s: dropped assignment of run %s", self.id, assign.run.id)
            return
        self.held[lease.run_id] = mine
        self._count_slots()

    def _committed_leases(self) -> tuple[Lease, ...]:
        """The leases held and known committed: a provisional one is not the worker's to
        renew, announce or give back until the server confirms it."""
        return tuple(h.lease for h in self.held.values() if h.confirmed.is_set())

    def _on_welcome(self, welcome: p.Welcome) -> None:
        self.server_time.heard(welcome.server_time, self._hello_sent, trio.current_time())
        if self.link is not None:  # a reconnection: renew the re-announced leases now
            self.sources.metrics.inc(RECONNECTS, (self.id,))
            self._beat_now.set()
            # A provisional lease's verdict was lost with the connection: let it go (one
            # the commit granted expires).
            for run_id, held in list(self.held.items()):
                if not held.confirmed.is_set():
                    del self.held[run_id]
                    held.cancel()
                    self._count_slots()
                    self._held_changed.set()

    def _count_slots(self) -> None:
        self.sources.metrics.set(WORKER_SLOTS_USED, len(self.held), (self.id,))

    # -- what operators read (``aiki worker --metrics-listen``) ----------------------------
    async def live(self) -> tuple[bool, str]:
        await trio.lowlevel.checkpoint()
        return True, "running"

    async def ready(self) -> tuple[bool, str]:
        """Connected to the server, and not draining."""
        await trio.lowlevel.checkpoint()
        if self.draining.is_set():
            return False, "draining"
        if self.link is None or not self.link.connected:
            return False, f"not connected to {self.address}"
        return True, f"connected to {self.address}"

    def http_app(self) -> HttpApp:
        return routes(metrics_page(self.sources.metrics, sides=("worker",)), self.live,
                      self.ready)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with task_runtime(self.task_threads), AsyncExitStack() as stack:
            link = await open_when_reachable(stack, lambda: Link.open(
                self.transport, self.address, self._hello, self._on_push, self.request_timeout,
                reconnect=self.reconnect, rng=random.Random(f"aiki-link:{self.id}"),
                on_welcome=self._on_welcome,
            ), self.address, self.connect_timeout, rng=random.Random(f"aiki-wait:{self.id}"))
            self.link = link
            self.sources.metrics.set(WORKER_SLOTS_MAX, self.max_concurrent_runs, (self.id,))
            self._count_slots()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, link)
                nursery.start_soon(self._stop_runs_when_cancelled)
                await nursery.start(self.flusher.serve)
                task_status.started()
                async for assign, held in self._assignments[1]:
                    self._start(nursery, link, assign, held)

    def _start(self, nursery: trio.Nursery, link: Link, assign: p.Assign,
               held: Held | None) -> None:
        """Start the actor of ``assign`` (``held``: its run's, if provisional), or its
        giving back if the worker drains."""
        if held is not None:  # provisional: held since it arrived
            if self.held.get(held.lease.run_id) is not held:
                return  # revoked, or replaced, meanwhile
            if self.draining.is_set():  # (given back once committed)
                nursery.start_soon(self._give_back_confirmed, link, held)
            else:
                nursery.start_soon(self._run_one, link, assign, held)
            return
        lease = Lease(assign.run.id, assign.run.lease_epoch, self.id)
        if self._revoked_before_start(lease):
            return
        if self.draining.is_set():
            # Assigned before the server heard of the drain: hand it straight back.
            nursery.start_soon(self._give_back, link, lease)
            return
        held = self.held.get(lease.run_id)
        if held is not None:
            if held.lease.epoch > lease.epoch:
                return  # a late assignment
            if held.lease.epoch == lease.epoch and (held.confirmed.is_set()
                                                    or not held.push_id):
                held.confirmed.set()  # (a provisional one, pushed as any claimed run)
                return  # a duplicated assignment: already running
            # A newer lease replaces the old actor; so does the lease of a provisional push,
            # not yet confirmed, pushed again as any claimed run: its seat had let the push
            # go, and refuses the start its actor may have sent early (nothing else it
            # sends, nor its task bodies, would go before the lease is confirmed).
            held.cancel()
        self.held[lease.run_id] = held = Held(lease, trio.CancelScope())
        self._count_slots()
        nursery.start_soon(self._run_one, link, assign, held)

    def _revoked_before_start(self, lease: Lease) -> bool:
        """One assignment of ``lease`` leaves the way to its actor: whether a Revoke of
        it came while it was on it."""
        key = (lease.run_id, lease.epoch)
        on_its_way = self._unstarted.get(key)
        if on_its_way is None:
            return False
        on_its_way.count -= 1
        if on_its_way.count <= 0:
            del self._unstarted[key]
        return on_its_way.revoked

    async def _give_back(self, link: Link, lease: Lease) -> None:
        try:
            await link.request(partial(_release, lease=lease))
        except (AikiError, TimeoutError) as exc:
            log.info("worker %s: could not give back run %s: %s", self.id, lease.run_id, exc)

    async def _give_back_confirmed(self, link: Link, mine: Held) -> None:
        try:
            with mine.scope:
                await self._committed(link, mine)
                await self._give_back(link, mine.lease)
        except Abandon:
            pass
        finally:
            self._let_go(mine)

    async def _committed(self, link: Link, held: Held) -> None:
        """Return once ``held``'s lease is known committed; raise :class:`Abandon` if the
        server has not said so by the lease's local deadline (its Confirm was lost with the
        connection, or could not be queued): a lease it did grant expires soon after, and
        no task body may start after that deadline anyway."""
        if held.confirmed.is_set():
            return
        with trio.move_on_at(self._lease_deadline(link, held)):
            await held.confirmed.wait()
            return
        raise Abandon(f"run {held.lease.run_id}: its provisional lease of epoch "
                      f"{held.lease.epoch} was neither confirmed nor revoked in time")

    def _after_committed(self, link: Link, held: Held,
                         run_task: TaskRunner) -> tuple[Persist, TaskRunner]:
        """The requests and the task runner of a provisional run's actor: it writes nothing
        and runs no task body before its lease is known committed (:meth:`_committed`).
        But a task's start goes at once, naming the push (``StartStep.push_id``): the
        server holds it until its verdict on that push, so the start's trip overlaps the
        commit and the Confirm's. Accepted, it proves the lease committed; refused (the
        push not confirmed), the actor ends as under any stale lease; unanswered by the
        lease's local deadline, it gives up. Never sent again on a new connection: no
        session but the push's can grant it."""

        async def request(make: Callable[[int], Any]) -> Any:
            if (not held.confirmed.is_set() and held.push_id
                    and isinstance(make(0), p.StartStep)):
                with trio.move_on_at(self._lease_deadline(link, held)):
                    answer = await link.request(partial(_early, make, held.push_id),
                                                retry=False)
                    held.confirmed.set()
                    return answer
                raise Abandon(f"run {held.lease.run_id}: the task start sent early under "
                              f"its provisional lease of epoch {held.lease.epoch} was not "
                              "answered in time")
            await self._committed(link, held)
            return await link.request(make)

        async def run_task_after(task: TaskDefinition, payload: Any) -> Any:
            await self._committed(link, held)
            return await run_task(task, payload)

        return request, run_task_after

    def _let_go(self, mine: Held) -> None:
        held = self.held.get(mine.lease.run_id)
        if held is mine:
            del self.held[mine.lease.run_id]
            self._count_slots()
        self._held_changed.set()

    async def _run_one(self, link: Link, assign: p.Assign, mine: Held) -> None:
        run, scope = assign.run, mine.scope
        self.runs_started += 1
        request: Persist = link.request
        run_task = self.run_task
        if not mine.confirmed.is_set():  # (provisional: its code runs to its first effect)
            request, run_task = self._after_committed(link, mine, run_task)
        try:
            with scope:
                workflow = self._registry.get((run.workflow, run.version))
                if workflow is None:  # the server only assigns registered versions
                    log.error("worker %s: assigned unknown workflow %s %s",
                              self.id, run.workflow, run.version)
                    return
                await run_workflow(workflow, assign, request, self.sources,
                                   inline_retry_max=self.inline_retry_max,
                                   record_start_after=self.record_start_after,
                                   draining=mine.stop, nudges=mine.nudges,
                                   run_task=run_task,
                                   lease_deadline=partial(self._lease_deadline, link, mine),
                                   lease_renewed=partial(_renewed, mine),
                                   flusher=self.flusher, server_time=self.server_time.bounds,
                                   paused=lambda: mine.paused, client=self.client,
                                   on_state=mine.running, stops_shields=False)
        except Abandon:
            pass
        finally:
            # (The state refers back to ``mine`` through its callbacks: let go of it, so the
            # run's objects are freed now, not by a full collection of the cycle collector.)
            mine.state = None
            self._let_go(mine)

    async def _stop_runs_when_cancelled(self) -> None:
        """Beside the run actors: when the worker is cancelled from outside (it stops, or
        crashes), each run's shields are stopped with it. (One task for all runs: each
        stop the worker makes itself goes through :meth:`Held.cancel`.)"""
        try:
            await trio.sleep_forever()
        finally:
            for held in list(self.held.values()):
                held.cancel()

    def _lease_deadline(self, link: Link, held: Held) -> float:
        """When, on this process's clock, the lease may have expired at the server, less a
        margin (LEASE_MARGIN of the TTL: the time from this check to the body's first effect,
        and the clocks' drift): no task body starts after it."""
        ttl = link.welcome.lease_ttl if link.welcome is not None else math.inf
        return held.renewed + ttl * (1.0 - LEASE_MARGIN)

    async def _heartbeat(self, link: Link) -> None:
        while True:
            assert link.welcome is not None
            interval = link.welcome.heartbeat_interval
            with trio.move_on_after(interval):
                await self._beat_now.wait()
            self._beat_now = trio.Event()
            # Sent when idle too: it tells the server this worker is alive and reachable.
            leases = self._committed_leases()
            sent = trio.current_time()
            try:
                ack = await link.request(partial(p.Heartbeat, leases=leases),
                                         timeout=interval * 2)
            except (AikiError, TimeoutError) as exc:
                log.warning("worker %s: heartbeat failed: %s", self.id, exc)
                continue
            self.server_time.heard(ack.server_time, sent, trio.current_time())
            for lease in leases:
                held = self.held.get(lease.run_id)
                if held is not None and held.lease == lease and lease.run_id not in ack.lost:
                    held.renewed = max(held.renewed, sent)
            sent_epochs = {lease.run_id: lease.epoch for lease in leases}
            for run_id in ack.lost:
                held = self.held.get(run_id)
                # (Only the lease the heartbeat carried: the run may be this worker's again
                # by now, under a newer lease assigned while the heartbeat was on its way.)
                if held is not None and held.lease.epoch == sent_epochs.get(run_id):
                    del self.held[run_id]
                    log.info("worker %s: lost the lease of run %s", self.id, run_id)
                    held.cancel()
                    self._count_slots()
                    self._held_changed.set()

    async def drain(self, grace: float) -> None:
        """Stop taking runs; let tasks in flight finish; give every run back within ``grace``.

        Each Run actor gives its run back (``ReleaseRun``) when it reaches its next step
        boundary, so no finished task runs again; a run waiting for a retry is suspended
        until its retry time. Whatever still runs after ``grace`` seconds is stopped and
        released (its task in flight will run again elsewhere).
        """
        self.draining.set()
        for held in self.held.values():
            held.stop.set()
        log.info("worker %s: draining (%d runs held, grace %.1f s)", self.id, len(self.held),
                 grace)
        with trio.move_on_after(grace):
            link = self.link
            if link is not None:
                try:
                    await link.request(p.Drain, timeout=grace)
                except (AikiError, TimeoutError) as exc:
                    log.warning("worker %s: could not tell the server it drains: %s",
                                self.id, exc)
            while self.held:
                self._held_changed = trio.Event()
                await self._held_changed.wait()
        if self.held:
            log.warning("worker %s: %d runs still busy after %.1f s; releasing them",
                        self.id, len(self.held), grace)
        await self.release_all()

    async def release_all(self) -> None:
        """Stop every run and give its lease back (a graceful stop).

        The server hears first that this worker drains, so that it does not hand a released
        run straight back to it; a run assigned meanwhile is given back as it arrives.
        """
        self.draining.set()
        link = self.link
        held = [h for h in self.held.values() if h.confirmed.is_set()]
        for h in self.held.values():
            h.cancel()
        self.held.clear()
        if link is None:
            return
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await link.request(p.Drain, timeout=5)
            except (AikiError, TimeoutError):
                pass
            for h in held:
                try:
                    await link.request(partial(_release, lease=h.lease))
                except (AikiError, TimeoutError):
                    pass


def _set(event: trio.Event) -> trio.Event:
    event.set()
    return event


def _renewed(held: Held, sent: float) -> None:
    held.renewed = max(held.renewed, sent)


def _early(make: Callable[[int], p.StartStep], push_id: int, req: int) -> p.StartStep:
    return attrs.evolve(make(req), push_id=push_id)


def _release(req: int, *, lease: Lease) -> p.ReleaseRun:
    return p.ReleaseRun(req, lease)


__all__ = ["Worker"]
