"""Dispatcher: hands queued runs to workers with free slots (the Timer expires lost leases).

Messages: :class:`Joined`, :class:`Left`, :class:`Ended` (a worker's run stopped holding a
slot), :class:`Alive` (a worker heartbeated), :class:`Draining` (a worker shuts down: no new
runs for it), :class:`Poke` (there may be new work). A worker that let a lease expire gets no
new run until it heartbeats again, so a worker cut off from the server does not swallow the
runs it cannot renew. It owns the seats of connected workers, which
are hints rebuilt from the sessions; the store is the truth (who holds which lease), so a
crash of the Dispatcher loses no run: after a restart sessions re-join on their next message
and leases that nobody renews expire.

Nobody waits on the Dispatcher: senders use ``tell_nowait``. It does not poll: it claims when
told there may be work (an enqueue, a run given back or woken, a lease expired, another
server's notification); a store shared with other servers may add a slow fallback poll.
It pushes ``Assign`` messages with the seat's non-blocking
``push``, and claims no more runs for a seat than half the room in its connection's outbox
(the rest is for replies). An ``Assign`` that still finds the outbox full, or a seat that
started draining while the claim committed, gets the run released to the queue at once
rather than left to its lease.

A seat is claimed for only while there may be work for it: after a Poke, an expiry or a
poll, or while its last claim came back full. A claim that came back short found its queue
empty, so a slot freed after it claims nothing until something new arrives: an idle server
does not touch the store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from aiki import tracing
from aiki.actors.mailbox import AskTimeout, Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.errors import AikiError, StoreUnavailable
from aiki.logs import run_fields
from aiki.metrics import PUSHED_BEFORE_COMMIT
from aiki.protocol import Assign, Confirm, Revoke, WorkerInfo, WorkflowRef
from aiki.records import ClaimedRun, Lease, RunRecord
from aiki.sources import Sources
from aiki.store import machine as m
from aiki.store.ops import Claim, Enqueue, ReleaseRun

log = logging.getLogger("aiki.dispatcher")


@attrs.define(eq=False)
class Verdict:
    """Whether the lease of a provisional push (``Dispatcher.assign_early``) was committed,
    as the seat's session judges the task starts its worker sends under that push before it
    hears (``StartStep.push_id``). ``granted`` only if the claim committed that very lease
    and its ``Confirm`` was pushed; undecided until the claim's write returns."""

    run_id: str
    epoch: int
    at: float  # when it was pushed (this process's clock)
    decided: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False


@attrs.define(eq=False)
class Seat:
    """A connected worker as the Dispatcher sees it."""

    session: int
    worker_id: str
    workflows: tuple[tuple[str, str], ...]
    slots: int
    push: Callable[[Any], bool]  # Assign, or a Nudge about a run it holds
    active: set[str] = attrs.field(factory=set)
    # How many more messages its connection's outbox takes now.
    room: Callable[[], int] = attrs.field(default=lambda: 1 << 30)
    # Let a lease expire: it gets no new runs until it proves alive with a heartbeat.
    suspect: bool = False
    connected_at: float = 0.0
    last_heartbeat: float | None = None
    # Shutting down (SIGTERM): it gets no new runs, and gives back the ones it has.
    draining: bool = False
    # Queued runs for it may exist: set by pokes, expiries and polls; cleared by a claim that
    # came back short (its queue was empty then).
    may_have_work: bool = True
    # run id -> when last known held: pushed, listed by the hello, or a commit here under
    # its lease (a renewal, a task start)
    held_at: dict[str, float] = attrs.field(factory=dict)
    epochs: dict[str, int] = attrs.field(factory=dict)  # run id -> the lease epoch pushed
    # Slots promised to claims committing with an enqueue (see Dispatcher.reserve).
    reserved: int = 0
    # Each provisional push's id -> its verdict, oldest first: kept a while after it is
    # decided, for the task starts sent early under it still on their way.
    verdicts: dict[int, Verdict] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        # The runs its worker holds as it joins (a reconnection's hello) count as assigned
        # now: a heartbeat built before the hello, which does not list one, does not make
        # the seat forget it (see Dispatcher._forget_unheld).
        if self.active:
            now = trio.current_time()
            for run_id in self.active:
                self.held_at.setdefault(run_id, now)

    def holds(self, run_id: str, epoch: int | None) -> bool:
        """Whether this seat's worker holds ``run_id`` under lease ``epoch`` (or an older
        one; None: under any)."""
        return run_id in self.active and (
            epoch is None or self.epochs.get(run_id, -1) <= epoch)

    def pushed_early(self, push_id: int, run_id: str, epoch: int, keep: float) -> None:
        """A provisional push (``push_id``) of ``run_id`` under ``epoch``: its verdict is
        pending. The verdicts of pushes older than ``keep`` seconds are forgotten (a start
        sent early that finds none is refused: its worker gave up on that lease by then)."""
        now = trio.current_time()
        verdicts = self.verdicts
        while verdicts:
            oldest = next(iter(verdicts))
            if verdicts[oldest].at > now - keep:
                break
            del verdicts[oldest]
        verdicts[push_id] = Verdict(run_id, epoch, now)

    def judge(self, run_id: str, epoch: int, granted: bool) -> None:
        """The verdict on the provisional push of ``run_id`` under ``epoch`` (at most one
        is undecided: a seat is pushed early only with no run active and the writer idle,
        so each claim's verdict comes before the next push)."""
        for verdict in reversed(self.verdicts.values()):
            if (verdict.run_id, verdict.epoch) == (run_id, epoch):
                if not verdict.decided.is_set():
                    verdict.granted = granted
                    verdict.decided.set()
                return

    def let_go(self, run_id: str) -> None:
        """Its worker no longer holds ``run_id``: the slot is free."""
        self.active.discard(run_id)
        self.held_at.pop(run_id, None)
        self.epochs.pop(run_id, None)

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.active) - self.reserved

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.worker_id, tuple(WorkflowRef(n, v) for n, v in self.workflows), self.slots,
            len(self.active), self.connected_at, self.last_heartbeat, self.draining,
        )


@attrs.frozen
class Joined:
    seat: Seat


@attrs.frozen
class Left:
    session: int


@attrs.frozen
class Ended:
    """The session's worker let these leases go (run id, epoch): its run ended, waits, was
    given back, or a renewal was refused. A seat that holds a newer lease of the run (claimed
    again meanwhile, maybe by this very worker) keeps it."""

    session: int
    leases: tuple[tuple[str, int], ...]


@attrs.frozen
class Alive:
    """The worker of this session heartbeated (at wall time ``at``), renewing the leases of
    the runs ``held`` (None: not known)."""

    session: int
    at: float | None = None
    held: tuple[str, ...] | None = None


@attrs.frozen
class Draining:
    """The worker of this session is shutting down: no more runs for it."""

    session: int


@attrs.frozen
class Revoked:
    """These runs' leases were revoked (a cancel): whoever held them has the slots free.
    With the epoch revoked (None: any), a seat that holds a newer lease keeps it."""

    leases: tuple[tuple[str, int | None], ...]


@attrs.frozen
class Poke:
    pass


@attrs.define(eq=False)
class Dispatcher:
    writer: StoreWriter
    sources: Sources
    lease_ttl: float
    # A fallback claim round every this many seconds, for a store shared with other servers
    # whose notifications may be lost; None: claim only when told there may be work.
    poll_interval: float | None = None
    # Told the expiry of each lease it grants (the Timer's alarm).
    on_leased: Callable[[float], None] = lambda expires_at: None
    mailbox: Mailbox[Any] = attrs.field(default=attrs.Factory(
        lambda self: Mailbox[Any](1024, "dispatcher", self.sources.metrics), takes_self=True))
    seats: dict[int, Seat] = attrs.field(factory=dict)
    versions: dict[str, set[str]] = attrs.field(factory=dict)
    events: dict[tuple[str, str], set[str]] = attrs.field(factory=dict)
    stopped: bool = False
    # Runs claimed with an enqueue that their seat could not take: given back by the loop.
    undelivered: list[tuple[Seat, RunRecord]] = attrs.field(factory=list)
    # Stranded runs: queued for a version no connected worker has registered. A run counts
    # once it has waited ``stranded_after`` seconds with the version unserved (and the
    # server up that long); the server warns once per version, until a worker has it again.
    stranded_after: float = 60.0
    # Push an enqueue's run to the idle worker its claim reserves before the commit (see
    # assign_early): for a store whose commits run beside the Trio thread. (SQLite's idle
    # batches run inline, when nothing else is runnable: measured, the push cost them that
    # and gained nothing on the dispatch.)
    push_before_commit: bool = False
    early_pushes: int = 0  # the last provisional push's id (``Assign.push_id``)
    started_at: float | None = None
    unserved_since: dict[tuple[str, str], float] = attrs.field(factory=dict)
    warn_at: dict[tuple[str, str], float] = attrs.field(factory=dict)
    warned: set[tuple[str, str]] = attrs.field(factory=set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self.started_at = self.sources.clock.now()
        next_poll = trio.current_time()
        while True:
            # Wake for a message, the next fallback poll if there is one, or the next
            # stranding warning that may be due.
            wake = math.inf if self.poll_interval is None else next_poll
            if self.warn_at:
                wake = min(wake, trio.current_time()
                           + min(self.warn_at.values()) - self.sources.clock.now())
            with trio.move_on_at(wake):
                self._handle(await self.mailbox.receive())
            self._warn_stranded()
            while True:
                try:
                    self._handle(self.mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            if self.poll_interval is not None and trio.current_time() >= next_poll:
                next_poll = trio.current_time() + self.poll_interval
                self._work_may_have_arrived()
            try:
                await self._assign()
            except (StoreUnavailable, AskTimeout) as exc:
                # The store is the truth and it is away: try again on the next tick, rather
                # than crash (and, past the restart intensity, take the server down).
                log.warning("dispatcher: store unavailable, retrying: %s", exc)

    def _work_may_have_arrived(self) -> None:
        for seat in self.seats.values():
            seat.may_have_work = True

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, Poke):
            self._work_may_have_arrived()
        elif isinstance(msg, Joined):
            for old in [s for s in self.seats.values() if s.worker_id == msg.seat.worker_id]:
                # The same worker again: a reconnection whose old connection the server has
                # not seen die yet (or two processes given one --id). The newest one wins.
                log.info("dispatcher: worker %r reconnected; dropping its older session %d",
                         old.worker_id, old.session)
                del self.seats[old.session]
            self.seats[msg.seat.session] = msg.seat  # its versions: noted by the session
            for version in msg.seat.workflows:
                self.warned.discard(version)
                self.warn_at.pop(version, None)
                self.unserved_since.pop(version, None)
        elif isinstance(msg, Left):
            seat = self.seats.pop(msg.session, None)
            now = self.sources.clock.now()
            for version in seat.workflows if seat is not None else ():
                if not self._served(version):
                    self.unserved_since.setdefault(version, now)
        elif isinstance(msg, Alive):
            seat = self.seats.get(msg.session)
            if seat is not None and msg.at is not None:
                seat.last_heartbeat = msg.at
            if seat is not None and msg.held is not None:
                self._forget_unheld(seat, set(msg.held))
            if seat is not None and seat.suspect:
                seat.suspect = False
                self.poke()
        elif isinstance(msg, Draining):
            seat = self.seats.get(msg.session)
            if seat is not None:
                seat.draining = True
        elif isinstance(msg, Ended):
            seat = self.seats.get(msg.session)
            if seat is not None:
                for run_id, let_go in msg.leases:
                    if seat.holds(run_id, let_go):
                        seat.let_go(run_id)
        elif isinstance(msg, Revoked):
            for seat in self.seats.values():
                for run_id, epoch in msg.leases:
                    if seat.holds(run_id, epoch):
                        seat.let_go(run_id)
            self._work_may_have_arrived()

    def _forget_unheld(self, seat: Seat, held: set[str]) -> None:
        """A run last known held over a lease ago (pushed, or renewed or started in a
        commit here) that its worker's heartbeat does not renew is not the worker's any
        more: its lease expired, maybe by another server's Timer (whose expiry never reaches
        this Dispatcher), or the assignment was lost. Its slot is free again."""
        now = trio.current_time()
        gone = {run_id for run_id in seat.active - held
                if now - seat.held_at.get(run_id, -math.inf) > self.lease_ttl}
        if gone:
            for run_id in gone:
                seat.let_go(run_id)
            seat.may_have_work = True

    async def _assign(self) -> None:
        if self.stopped:
            return
        for seat in list(self.seats.values()):
            if seat.free <= 0 or not seat.workflows or seat.suspect or not seat.may_have_work:
                continue
            # Half the room: the rest is for replies that may queue while the claim commits.
            wanted = min(seat.free, seat.room() // 2)
            if wanted <= 0:
                continue  # its connection is backed up: again on the next message or poll
            while wanted > 0:
                free = seat.free
                claimed = await self.writer.write(
                    Claim(seat.worker_id, seat.workflows, wanted, self.sources.clock.now(),
                          self.lease_ttl)
                )
                seat.may_have_work = len(claimed) >= wanted
                undelivered = self._place(seat, claimed)
                for run in undelivered:
                    await self._give_back(seat, run)
                if undelivered or self.stopped or seat.suspect or not seat.may_have_work:
                    break
                # A full claim that took back runs the seat still counted as held (another
                # server's Timer expired their leases) filled fewer slots than it claimed:
                # claim those again now, not at the next message or poll (seed 4461).
                wanted = min(seat.free, wanted - (free - seat.free), seat.room() // 2)
        while self.undelivered:
            await self._give_back(*self.undelivered.pop())

    def _place(self, seat: Seat, claimed: Sequence[ClaimedRun]) -> list[RunRecord]:
        """Push the runs claimed for ``seat`` to its worker; those it cannot take now."""
        if claimed:
            self.on_leased(claimed[0].run.lease_expires_at or 0.0)
        undelivered = []
        for c in claimed:
            if c.run.trace_context is not None:
                _claim_span(c.run)
            if not seat.draining and seat.push(Assign(c.run, c.steps)):
                seat.active.add(c.run.id)
                seat.held_at[c.run.id] = trio.current_time()
                seat.epochs[c.run.id] = c.run.lease_epoch
            else:
                undelivered.append(c.run)
        if undelivered:
            seat.may_have_work = True  # they are queued again
        return undelivered

    async def _give_back(self, seat: Seat, run: RunRecord) -> None:
        assert run.lease_owner is not None
        log.info("dispatcher: cannot deliver run %s to worker %r (%s); back to the "
                 "queue", run.id, seat.worker_id,
                 "it drains" if seat.draining else "its connection is backed up",
                 extra=run_fields(run.id, run.workflow, run.version, run.attempts,
                                  run.lease_owner))
        try:
            await self.writer.write(ReleaseRun(
                Lease(run.id, run.lease_epoch, run.lease_owner),
                self.sources.clock.now(),
                reason=f"the server could not deliver it to worker {seat.worker_id!r}",
            ))
        except (AikiError, AskTimeout) as exc:  # then its lease expires instead
            log.warning("dispatcher: could not give run %s back: %s", run.id, exc,
                        extra=run_fields(run.id, run.workflow, run.version,
                                         run.attempts, run.lease_owner))

    # -- claims that commit with an enqueue ------------------------------------------------
    def reserve(self, version: tuple[str, str], now: float) -> tuple[Seat, Claim] | None:
        """A slot of a worker that has ``version`` and is free now, held for a claim of one
        run that commits in the same transaction as an enqueue (one commit, not two, from
        enqueue to lease); the claim to write. Give it back with :meth:`claimed`.

        Only for a worker with nothing to do, while the StoreWriter is idle: then the
        enqueue is a batch of its own, and its claim saves the run a commit before it
        starts. Under load, the writer batches the enqueues of many clients and this loop's
        next claim takes their runs in one statement, not one claim each (measured: a claim
        with every enqueue lost at 100 concurrent on PostgreSQL, 0.57x against 1.36x DBOS;
        with an idle writer alone still 0.95x)."""
        if self.stopped or not self.writer.idle:
            return None
        for seat in self.seats.values():
            if (version in seat.workflows and not seat.active and not seat.reserved
                    and seat.free > 0 and not seat.suspect and seat.room() // 2 > 0):
                seat.reserved += 1
                return seat, Claim(seat.worker_id, (version,), 1, now, self.lease_ttl)
        return None

    def assign_early(self, seat: Seat, enqueue: Enqueue, claim: Claim) -> RunRecord | None:
        """Push the run of ``enqueue`` to the reserved ``seat``'s worker as ``claim`` will
        lease it, provisionally, before the two commit; the run pushed, or None (a keyed
        enqueue may name another run; a draining seat; a full outbox).

        The worker builds the run's actor and runs its workflow code up to the first write
        or task body while the commit is on its way, then waits for :meth:`claimed`'s
        verdict: ``Confirm`` if the claim committed this very lease, else ``Revoke``. Its
        actor writes nothing before the verdict but a task's start that names this push
        (``StartStep.push_id``), which the seat's session holds until the same verdict
        (``Seat.verdicts``) and refuses unless granted. So a lease that was not committed
        (or whose commit's fate is unknown) and is granted again later, under the same
        epoch to the same worker, has no earlier writer under it (seed 10741 of the sweep,
        with an early push whose actor wrote at once)."""
        if (not self.push_before_commit or enqueue.idempotency_key is not None
                or seat.draining):
            return None
        queued, _ = m.enqueue(enqueue)
        run = m.claim(queued, claim.worker_id, claim.now, claim.lease_ttl).run
        assert run is not None
        self.early_pushes += 1
        if not seat.push(Assign(run, (), provisional=True, push_id=self.early_pushes)):
            return None
        seat.pushed_early(self.early_pushes, run.id, run.lease_epoch, 2 * self.lease_ttl)
        seat.reserved -= 1  # (the slot is the run's now)
        seat.active.add(run.id)
        seat.held_at[run.id] = trio.current_time()
        seat.epochs[run.id] = run.lease_epoch
        return run

    def claimed(self, seat: Seat, claimed: Sequence[ClaimedRun],
                early: RunRecord | None = None) -> None:
        """What the reserved claim got (nothing, if it was not committed): pushed to the
        seat's worker now; a run it cannot take is given back by the loop. ``early``: the
        run :meth:`assign_early` pushed provisionally: confirmed if the claim committed
        that lease; else revoked (the claim leased an older queued run instead, or its
        commit failed or its fate is unknown: a lease it granted all the same expires, and
        the run is claimed again)."""
        if early is None:
            seat.reserved -= 1
        else:
            held = seat.holds(early.id, early.lease_epoch)
            granted = [c for c in claimed if not c.steps and _as_run(c.run) == _as_run(early)]
            confirmed = False
            if granted and held:
                claimed = [c for c in claimed if c not in granted]
                self.on_leased(granted[0].run.lease_expires_at or 0.0)
                if early.trace_context is not None:
                    _claim_span(granted[0].run)
                # (A Confirm that cannot be queued: its worker's actor gives up waiting, a
                # start it sent early is refused, and the lease expires.)
                confirmed = seat.push(Confirm(early.id, early.lease_epoch))
                self.sources.metrics.inc(PUSHED_BEFORE_COMMIT, ("confirmed",))
            elif held:
                seat.push(Revoke(early.id, "its lease was not committed", early.lease_epoch))
                seat.let_go(early.id)
                self.sources.metrics.inc(PUSHED_BEFORE_COMMIT, ("revoked",))
            # (Granted to a seat that let the run go meanwhile: pushed as any claimed run,
            # a start the provisional actor sent early refused, and its worker replaces
            # that actor with the Assign's.)
            seat.judge(early.id, early.lease_epoch, confirmed)
        undelivered = self._place(seat, claimed)
        if undelivered:
            self.undelivered += [(seat, run) for run in undelivered]
            self.poke()

    # -- for sessions --------------------------------------------------------------------
    def tell(self, msg: Joined | Left | Ended | Alive | Draining | Revoked | Poke) -> None:
        self.mailbox.address.tell_nowait(msg)

    def _served(self, version: tuple[str, str]) -> bool:
        return any(version in seat.workflows for seat in self.seats.values())

    def serves(self, workflow: str, version: str) -> bool:
        """Whether a connected worker has registered ``workflow`` ``version``."""
        return self._served((workflow, version))

    def queued_for(self, version: tuple[str, str], now: float) -> None:
        """A run of ``version`` was enqueued: if no worker has it, warn once it waited."""
        if not self._served(version) and version not in self.warned:
            self.unserved_since.setdefault(version, now)
            self.warn_at.setdefault(version, now + self.stranded_after)
            self.poke()  # (the loop learns of the new warning time)

    def _warn_stranded(self) -> None:
        now = self.sources.clock.now()
        for version, at in list(self.warn_at.items()):
            if self._served(version):
                del self.warn_at[version]
            elif at <= now:
                del self.warn_at[version]
                self.warned.add(version)
                log.warning(
                    "runs of workflow %r version %s have waited %.0f s in the queue and no "
                    "connected worker has registered that version: they are stranded until "
                    "a worker with it connects (aiki runs list --stranded)", version[0],
                    version[1], now - self.unserved_since.get(version, now))

    def stranded(self, version: tuple[str, str], queued_since: float, now: float) -> bool:
        """Whether a run of ``version`` queued since ``queued_since`` is stranded now."""
        if self._served(version):
            return False
        since = max(queued_since, self.started_at or now, self.unserved_since.get(version, 0))
        return now - since >= self.stranded_after

    def revoke(self, run_id: str, reason: str | None, epoch: int | None = None) -> None:
        """A cancel revoked ``run_id``'s lease of ``epoch`` (None: whatever lease holds
        it, for a run that ended): tell its worker now (not at its next heartbeat) and free
        its slot. A worker here that holds a newer lease of the run (claimed after the
        cancel, to compensate) is left alone; so is its slot. With ``epoch`` known, only if
        a worker here holds the run."""
        held = False
        for seat in self.seats.values():
            if seat.holds(run_id, epoch):
                held = seat.push(Revoke(run_id, reason, epoch)) or held
        if held or epoch is None:
            self.tell(Revoked(((run_id, epoch),)))

    def expired(self, run_ids: tuple[str, ...]) -> None:
        """This server's commit put these runs back in the queue, their leases expired:
        the seats that held them have the slots free, and are suspect until their workers
        prove alive. Called at the commit (see ``StoreWriter.on_expired``), so before any
        later claim of the runs is placed: told afterwards, as a message, it would take a
        run from the seat that had just been given it under a new lease (that worker would
        then hear no Revoke of it, and its slot would count as free)."""
        self._work_may_have_arrived()
        for seat in self.seats.values():
            if seat.active.intersection(run_ids):
                seat.suspect = True
                for run_id in run_ids:
                    seat.let_go(run_id)

    def held(self, leases: Sequence[Lease]) -> None:
        """This server's commit accepted task starts or renewals under these leases: their
        workers hold those runs. A seat that had let one go learns it again, so a revoke of
        that lease is told, and a slot renewed is not given again. (Seed 80 of the late
        watches' workload: a worker paused for half a minute sent, on waking, a heartbeat
        built before it read the assignment that came meanwhile; the seat forgot the run,
        the worker started its task, and a cancel's revoke committed a second later found
        no seat holding it. Found by review: a heartbeat answered late, its commit slowed,
        or after a newer one, made the seat forget a run the worker went on renewing;
        nothing but a task start counted it again.)"""
        now = trio.current_time()
        seats = {seat.worker_id: seat for seat in self.seats.values()}  # (one per worker)
        for lease in leases:
            seat = seats.get(lease.worker_id)
            if seat is None:
                continue
            run_id = lease.run_id
            seat.active.add(run_id)
            seat.epochs[run_id] = max(seat.epochs.get(run_id, lease.epoch), lease.epoch)
            seat.held_at[run_id] = now

    def ended(self, leases: Sequence[Lease]) -> None:
        """This server's commit ended runs under these leases, by their holders' own writes
        (a completion, a failure): their seats have the slots free now, not once the
        session that asked for the end tells (after the commit, in a task of its own): a
        client told of its run's end at the commit may enqueue its next run at once, and
        an idle worker's free slot is claimed in the enqueue's own commit (see
        :meth:`reserve`). A run ended any other way (a cancel's grace period over, a parent
        settled by its last child) keeps its seat until its worker lets go or is told."""
        for lease in leases:
            for seat in self.seats.values():
                if (seat.worker_id == lease.worker_id
                        and seat.epochs.get(lease.run_id) == lease.epoch):
                    seat.let_go(lease.run_id)

    def push_to_holder(self, run_id: str, msg: Any) -> bool:
        """Push ``msg`` to the worker that holds ``run_id`` here, if one does (a hint)."""
        for seat in self.seats.values():
            if run_id in seat.active:
                return seat.push(msg)
        return False

    def declares(self, workflow: str, version: str, event: str) -> bool | None:
        """Whether that workflow version declares ``event``; None if no worker told us."""
        known = self.events.get((workflow, version))
        return None if known is None else event in known

    def stop_assigning(self) -> None:
        """The server shuts down: claim no more runs (those claimed would go nowhere)."""
        self.stopped = True

    def workers(self) -> tuple[WorkerInfo, ...]:
        """The connected workers as the Dispatcher sees them now (a snapshot)."""
        return tuple(seat.info() for seat in sorted(self.seats.values(),
                                                     key=lambda s: s.worker_id))

    def note_workflows(self, workflows: tuple[WorkflowRef, ...]) -> None:
        """Versions a worker registered (and the events each declares): known at once, for
        enqueues by name and sends that follow."""
        for ref in workflows:
            self.versions.setdefault(ref.name, set()).add(ref.version)
            self.events[(ref.name, ref.version)] = set(ref.events)

    def poke(self) -> None:
        self.mailbox.address.tell_nowait(Poke())

    def latest_version(self, workflow: str) -> str | None:
        """The newest version of ``workflow`` any worker registered since the server started."""
        known = self.versions.get(workflow)
        return max(known, key=version_key) if known else None

    def known_workflows(self) -> list[str]:
        return sorted(self.versions)


def _as_run(run: RunRecord) -> tuple[Any, ...]:
    """What a worker runs a run by: the lease, and the workflow's input."""
    return (run.id, run.lease_epoch, run.lease_owner, run.attempts, run.workflow,
            run.version, run.payload, run.trace_context)


def _claim_span(run: RunRecord) -> None:
    """The claim, in the run's trace (a moment: the time queued is the dispatch latency)."""
    with tracing.span(f"aiki.claim {run.workflow}", tracing.run_attributes(
            run.id, run.workflow, run.version, run.attempts, run.lease_owner),
            parent=run.trace_context):
        pass


def version_key(version: str) -> tuple[tuple[int, Any], ...]:
    parts = []
    for piece in version.replace("-", ".").split("."):
        parts.append((0, int(piece)) if piece.isdigit() else (1, piece))
    return tuple(parts)
