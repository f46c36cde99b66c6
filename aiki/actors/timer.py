"""Timer: the server's clock for the store's due times. It wakes waiting runs whose time has
come (a sleep, an event wait's timeout, a long retry delay), expires leases that nobody
renewed, ends the cancelled runs whose grace period is over, and fires schedules whose next
occurrence has come (``FireSchedules``: the runs, the record of the occurrence and the next
occurrence in one transaction, so a crash or another server can neither lose nor repeat one).

It sleeps until the earliest due time it knows, and nothing polls on a fixed beat: an idle
server with thousands of waiting runs makes no store query before the next one is due.
Messages are hints: a float is a new due time written by this server (a wait begun, a lease
granted), which only moves the alarm earlier, with no store read; ``None`` says something
changed that it cannot see (another server's commit, a reconnection), and it reads the
store's next due time again. It owns no state that matters: the due times live in the
store, so a restart loses nothing. ``reconcile_interval`` (for a store shared by several
servers) bounds how long it trusts what it knows without a read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import attrs
import trio

from aiki.actors.mailbox import AskTimeout, Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.errors import StoreUnavailable
from aiki.metrics import SCHEDULE_LATENESS
from aiki.records import RunRecord
from aiki.sources import Sources, WallClock
from aiki.store.base import Store
from aiki.store.ops import ExpireLeases, FireSchedules, Op, WakeDue

log = logging.getLogger("aiki.timer")


# How fast the lease clock catches up with the wall clock after a step forward: slower than
# the margin a worker keeps before its local lease deadline (10% of the TTL), so a lease
# never expires here before its holder stops trusting it.
CATCH_UP = 0.05


@attrs.define
class LeaseClock:
    """The wall clock as lease expiry reads it: a step forward (an NTP step, a VM restored)
    is absorbed, then caught up at ``CATCH_UP`` of real time; a step back is followed.

    A worker stops starting task bodies a margin before its lease ends by its own clock
    (``Worker._lease_deadline``); it cannot see this server's clock step forward, and a
    lease expired by the stepped clock let another worker run a task the first one was
    about to run (simulation: the servers' clock stepped +2.5 s while a worker paused after
    its task start's acknowledgement; it woke inside its margin and ran the body after the
    other worker's result was committed). Lease expiry is the one decision here that must
    not come early by real time: sleeps and schedules follow the wall clock as before.

    A step that came before this clock's first reading (while the server was down, or as
    it started) cannot be told from the time that passed: a lease granted or renewed a
    moment before a restart looks as old as the step makes it. So for ``hold`` seconds of
    real time from :meth:`start` (the server's lease TTL) no lease expires: whoever holds a
    lease renewed before the start stops trusting it within the TTL of real time from its
    last renewal, by its own clock, whatever the servers' clocks did; the leases this
    server grants last a TTL from their grant anyway. After a restart, the leases of
    workers that died with the server are given to others up to a TTL later than their
    expiry time says: the price of never expiring one early."""

    lag: float = 0.0  # how far behind the wall clock it reads
    hold: float = 0.0  # seconds of real time after the start in which nothing expires
    _last: tuple[float, float] | None = None  # (wall, Trio time) at the last reading
    _started: float | None = None  # Trio time of the first reading

    def start(self, wall: float) -> None:
        """The first reading (the Timer starts; once): the hold begins."""
        if self._started is None:
            self._started = trio.current_time()
            self._last = (wall, self._started)

    def observe(self, wall: float) -> None:
        """A reading of the wall clock, by whatever part of the server made it
        (:class:`ObservedClock`): a step since the last reading is absorbed. Every reading
        counts: a lease granted on a clock set back, then stepped forward again before
        expiry looked, would expire early by the second step, which the two looks alone
        see as no step at all (seed 180).

        A step seen is taken to have come at this reading, the last moment it could have:
        the time since the previous reading catches up only the lag there was before it.
        Readings can be far apart (the server paused, its process stopped): a step at the
        end of a 35 s pause, credited with the whole pause's catch-up, expired a lease
        1.8 s early by real time, inside the margin its worker still trusted it for
        (seed 6787)."""
        if self._last is None:
            return
        try:
            mono = trio.current_time()
        except RuntimeError:  # read outside the server's Trio thread: not a look it can use
            return
        elapsed = mono - self._last[1]
        stepped = (wall - self._last[0]) - elapsed
        self.lag = max(0.0, max(0.0, self.lag - CATCH_UP * elapsed) + stepped)
        self._last = (wall, mono)

    def now(self, wall: float) -> float:
        """What lease expiry compares with ``lease_expires_at``: ``-inf`` while the start's
        hold lasts (nothing expires)."""
        self.start(wall)
        self.observe(wall)
        return -math.inf if self.holding() > 0.0 else wall - self.lag

    def holding(self) -> float:
        """Seconds of real time left in the start's hold (0: over, or not started)."""
        if self._started is None:
            return 0.0
        return max(0.0, self._started + self.hold - trio.current_time())


@attrs.define
class ObservedClock:
    """The server's wall clock: each reading is shown to its :class:`LeaseClock` too, so
    a step is seen when it happens, not only when lease expiry next looks."""

    inner: WallClock
    leases: LeaseClock

    def now(self) -> float:
        wall = self.inner.now()
        self.leases.observe(wall)
        return wall


@attrs.define(eq=False)
class Timer:
    store: Store
    writer: StoreWriter
    sources: Sources
    on_wake: Callable[[], None]  # runs were queued again: the Dispatcher has work
    # The runs its WakeDue ended (a cancel's grace period over).
    on_ended: Callable[[tuple[RunRecord, ...]], None] = lambda runs: None
    reconcile_interval: float | None = None
    mailbox: Mailbox[float | None] = attrs.field(default=attrs.Factory(
        lambda self: Mailbox[float | None](256, "timer", self.sources.metrics), takes_self=True))
    leases: LeaseClock = attrs.field(factory=LeaseClock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.leases.start(self.sources.clock.now())
        task_status.started()
        next_at: float | None = None
        stale = True  # next_at must be read from the store
        from_store = False  # next_at came from the store, not from a hint
        while True:
            try:
                if stale:
                    next_at = await self.store.next_due()
                    stale, from_store = False, True
                now = self.sources.clock.now()
                if next_at is not None and next_at <= now:
                    if not await self._fire(now, next_at):
                        # (A due time of another server's clock, or a lease the clock's
                        # step forward, or the start's hold, has not let expire yet.)
                        await trio.sleep(max(0.01, min(max(self.leases.lag,
                                                           self.leases.holding()), 1.0)))
                    stale = True
                    continue
            except (StoreUnavailable, AskTimeout) as exc:
                log.warning("timer: store unavailable, retrying: %s", exc)
                await trio.sleep(1.0)
                stale = True
                continue
            wait = math.inf if next_at is None else next_at - now
            if self.reconcile_interval is not None:
                wait = min(wait, self.reconcile_interval)
            with trio.move_on_after(wait) as waited:
                hints = [await self.mailbox.receive()]
                while True:
                    try:
                        hints.append(self.mailbox.receive_nowait())
                    except trio.WouldBlock:
                        break
            if waited.cancelled_caught:
                # The due time (or the reconcile interval). A due time the store gave is
                # fired next round; one only hinted (a lease granted, since renewed or
                # ended) is checked with one read first.
                stale = not from_store or next_at is None or next_at > self.sources.clock.now()
                continue
            for hint in hints:
                if hint is None:
                    stale = True
                elif next_at is None or hint < next_at:
                    next_at, from_store = hint, False

    async def _fire(self, now: float, due: float) -> bool:
        # The three ops at once, so the StoreWriter commits them together (one transaction,
        # not three in a row); each is decided on its own.
        ops: tuple[Op[tuple[str, ...]], ...] = (WakeDue(now), ExpireLeases(self.leases.now(now)),
                                                 FireSchedules(now))
        done: list[tuple[str, ...]] = [(), (), ()]
        failed: list[BaseException] = []

        async def write(i: int) -> None:
            try:
                done[i] = await self.writer.write(ops[i])
            except (StoreUnavailable, AskTimeout) as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(ops)):
                nursery.start_soon(write, i)
        woke, expired, started = done
        # How late the earliest of them was woken or started (``due``: the earliest due time).
        if woke:
            self.sources.metrics.observe(SCHEDULE_LATENESS, max(now - due, 0.0), ("wait",))
        if started:
            self.sources.metrics.observe(SCHEDULE_LATENESS, max(now - due, 0.0), ("schedule",))
        ended: tuple[RunRecord, ...] = getattr(woke, "ended", ())
        if ended:
            self.on_ended(ended)
        if woke or expired or started:
            self.on_wake()
        if failed:
            raise failed[0]
        return bool(woke or expired or started)

    def hint(self, due: float | None = None) -> None:
        """A due time this server wrote (``due``), or None: something changed, re-read."""
        self.mailbox.address.tell_nowait(due)

