"""Dispatcher: hands queued runs to workers with free slots, and expires lost leases.

Messages: :class:`Joined`, :class:`Left`, :class:`Ended` (a worker's run stopped holding a
slot), :class:`Alive` (a worker heartbeated), :class:`Draining` (a worker shuts down: no new
runs for it), :class:`Poke` (there may be new work). A worker that let a lease expire gets no
new run until it heartbeats again, so a worker cut off from the server does not swallow the
runs it cannot renew. It owns the seats of connected workers, which
are hints rebuilt from the sessions; the store is the truth (who holds which lease), so a
crash of the Dispatcher loses no run: after a restart sessions re-join on their next message
and leases that nobody renews expire.

Nobody waits on the Dispatcher: senders use ``tell_nowait`` and a dropped Poke is harmless
(the poll interval catches up). It pushes ``Assign`` messages with the seat's non-blocking
``push``, and claims no more runs for a seat than half the room in its connection's outbox
(the rest is for replies). An ``Assign`` that still finds the outbox full, or a seat that
started draining while the claim committed, gets the run released to the queue at once
rather than left to its lease.

A seat is claimed for only while there may be work for it: after a Poke, an expiry or a
poll, or while its last claim came back full. A claim that came back short found its queue
empty, so a slot freed after it claims nothing until something new arrives; between polls
an idle server writes only to expire leases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from aiki.actors.mailbox import AskTimeout, Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.errors import AikiError, StoreUnavailable
from aiki.protocol import Assign, WorkerInfo, WorkflowRef
from aiki.records import Lease
from aiki.sources import Sources
from aiki.store.ops import Claim, ExpireLeases, ReleaseRun

log = logging.getLogger("aiki.dispatcher")


@attrs.define(eq=False)
class Seat:
    """A connected worker as the Dispatcher sees it."""

    session: int
    worker_id: str
    workflows: tuple[tuple[str, str], ...]
    slots: int
    push: Callable[[Assign], bool]
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

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.active)

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
    session: int
    run_ids: tuple[str, ...]


@attrs.frozen
class Alive:
    """The worker of this session heartbeated (at wall time ``at``)."""

    session: int
    at: float | None = None


@attrs.frozen
class Draining:
    """The worker of this session is shutting down: no more runs for it."""

    session: int


@attrs.frozen
class Poke:
    pass


@attrs.define(eq=False)
class Dispatcher:
    writer: StoreWriter
    sources: Sources
    lease_ttl: float
    poll_interval: float = 1.0
    mailbox: Mailbox[Any] = attrs.field(factory=lambda: Mailbox[Any](1024, "dispatcher"))
    seats: dict[int, Seat] = attrs.field(factory=dict)
    versions: dict[str, set[str]] = attrs.field(factory=dict)
    assigned: int = 0
    stopped: bool = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_expiry = next_poll = trio.current_time()
        while True:
            # Wake for a message, the next poll or the next expiry sweep, whichever is first.
            with trio.move_on_at(min(next_poll, next_expiry)):
                self._handle(await self.mailbox.receive())
            while True:
                try:
                    self._handle(self.mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            if trio.current_time() >= next_poll:  # the fallback for a poke that never came
                next_poll = trio.current_time() + self.poll_interval
                self._work_may_have_arrived()
            try:
                if trio.current_time() >= next_expiry:
                    next_expiry = trio.current_time() + max(self.lease_ttl / 4, 0.01)
                    expired = await self.writer.write(ExpireLeases(self.sources.clock.now()))
                    if expired:
                        self._work_may_have_arrived()
                    for seat in self.seats.values():
                        if seat.active.intersection(expired):
                            seat.suspect = True
                            seat.active.difference_update(expired)
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
        elif isinstance(msg, Left):
            self.seats.pop(msg.session, None)
        elif isinstance(msg, Alive):
            seat = self.seats.get(msg.session)
            if seat is not None and msg.at is not None:
                seat.last_heartbeat = msg.at
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
                seat.active.difference_update(msg.run_ids)

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
            claimed = await self.writer.write(
                Claim(seat.worker_id, seat.workflows, wanted, self.sources.clock.now(),
                      self.lease_ttl)
            )
            seat.may_have_work = len(claimed) >= wanted
            undelivered = []
            for c in claimed:
                if not seat.draining and seat.push(Assign(c.run, c.steps)):
                    seat.active.add(c.run.id)
                    self.assigned += 1
                else:
                    undelivered.append(c.run)
            if undelivered:
                seat.may_have_work = True  # they are queued again
            for run in undelivered:
                assert run.lease_owner is not None
                log.info("dispatcher: cannot deliver run %s to worker %r (%s); back to the "
                         "queue", run.id, seat.worker_id,
                         "it drains" if seat.draining else "its connection is backed up")
                try:
                    await self.writer.write(ReleaseRun(
                        Lease(run.id, run.lease_epoch, run.lease_owner),
                        self.sources.clock.now(),
                        reason=f"the server could not deliver it to worker {seat.worker_id!r}",
                    ))
                except (AikiError, AskTimeout) as exc:  # then its lease expires instead
                    log.warning("dispatcher: could not give run %s back: %s", run.id, exc)

    # -- for sessions --------------------------------------------------------------------
    def tell(self, msg: Joined | Left | Ended | Alive | Draining | Poke) -> None:
        self.mailbox.address.tell_nowait(msg)

    def stop_assigning(self) -> None:
        """The server shuts down: claim no more runs (those claimed would go nowhere)."""
        self.stopped = True

    def workers(self) -> tuple[WorkerInfo, ...]:
        """The connected workers as the Dispatcher sees them now (a snapshot)."""
        return tuple(seat.info() for seat in sorted(self.seats.values(),
                                                     key=lambda s: s.worker_id))

    def note_workflows(self, workflows: tuple[tuple[str, str], ...]) -> None:
        """Versions a worker registered: known at once, for enqueues by name that follow."""
        for name, version in workflows:
            self.versions.setdefault(name, set()).add(version)

    def poke(self) -> None:
        self.mailbox.address.tell_nowait(Poke())

    def latest_version(self, workflow: str) -> str | None:
        """The newest version of ``workflow`` any worker registered since the server started."""
        known = self.versions.get(workflow)
        return max(known, key=_version_key) if known else None

    def known_workflows(self) -> list[str]:
        return sorted(self.versions)


def _version_key(version: str) -> tuple[tuple[int, Any], ...]:
    parts = []
    for piece in version.replace("-", ".").split("."):
        parts.append((0, int(piece)) if piece.isdigit() else (1, piece))
    return tuple(parts)
