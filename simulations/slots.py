"""The slot monitor: a Dispatcher's seat and its worker agree on which runs the worker holds.

A seat counts a worker's slots by the runs it pushed (and the runs its hello and heartbeats
name); the worker counts its own by the runs it holds. They may disagree for a message's
flight, and for longer where the protocol lets a side find out late:

- the worker holds a run its seat let go: the seat tells it (a Revoke), or it hears at its
  next heartbeat's answer that the lease is lost (a lease its server expired). Longer than
  that, the worker runs more runs than its seat counts, and may be given more than its
  slots; or it keeps a run no lease covers (an early push whose commit failed, not revoked).
- the seat counts a run its worker does not hold: the worker ended or dropped it, or never
  got it. The seat forgets a run a heartbeat does not name once a lease has passed since it
  last knew the run held (it pushed it, or a renewal or task start under its lease
  committed). Longer than that, a slot leaks: runs wait while the worker idles, and the
  claim monitor (which looks at seats with free slots only) does not see it.

Each disagreement is timed from when it began or from the last fault that could excuse it,
whichever came later: any fault of the network on a connection between the worker and
that server (until the message arrived; a lost one, or one out of its order or duplicated,
which its receiver may ignore as stale, until a request waiting for its reply times out,
and for such a push also from when it is read: a paused worker reads it late),
the link between them cut off or stalled, a pause or clock jump of either, and
any fault of the store (until a slowed call is over: a commit refused or slowed holds
heartbeats back and leaves a seat's view of a write unknown). A
worker's extra run is not counted while its seat is suspect: a seat that let a run go as
its lease expired gets no new run until the worker's heartbeat, whose answer tells it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import trio

from simulations.network import pair_of

if TYPE_CHECKING:
    from simulations.world import World


def worker_only_bound(lease_ttl: float) -> float:
    """A Revoke arrives within a message's flight; a lease the worker lost otherwise is
    named in its next heartbeat's answer, and the servers ask for one every third of the
    lease TTL: a heartbeat's interval, then a margin."""
    return lease_ttl / 3 + 2.0


def seat_only_bound(lease_ttl: float) -> float:
    """A seat forgets a run its worker's heartbeat does not name once a lease has passed
    since it last knew the run held: a lease, then a heartbeat's interval, then a margin.
    (A renewal that commits after its worker dropped the run dates it later: one resent
    after a lost connection, or held up by a store slower than a heartbeat's timeout,
    each excused by its fault.)"""
    return lease_ttl + lease_ttl / 3 + 2.0


@attrs.define
class SlotMonitor:
    """Looked at on a tick of the world's claim monitor (a task of its own would move the
    seeds' schedules, and every seed a known-bad test names)."""

    world: World
    lease_ttl: float
    # (worker id, run, which side holds it) -> since when the other does not
    since: dict[tuple[str, str, str], float] = attrs.field(factory=dict)
    reported: set[tuple[str, str, str]] = attrs.field(factory=set)
    jumps: dict[str, float] = attrs.field(factory=dict)
    # A node, or a pair of nodes (sorted) -> when a fault of its own was last seen: paused,
    # its clock jumped; the link between the two cut off or clogged.
    disturbed: dict[str | tuple[str, str], float] = attrs.field(factory=dict)

    def look(self) -> None:
        world, now = self.world, trio.current_time()
        for node in [*world.server_names, *world.worker_names]:
            if (world.freezer.is_paused(node)
                    or world.ledger.clock_jumps[node] != self.jumps.get(node, 0.0)):
                self.disturbed[node] = now
        for a, b in [*world.net.clogged, *world.net.blocked]:
            self.disturbed[pair_of(a, b)] = now
        self.jumps = dict(world.ledger.clock_jumps)
        store = world.store
        store_quiet_since = max(store.last_fault_at, min(store.slow_until, now),
                                min(store.faults.unavailable_until, now))
        live: dict[tuple[str, str, str], float] = {}
        for name, worker in world.workers.items():
            if worker.id not in world.ledger.live_workers or worker.link is None:
                continue
            server_name = world.embedded.get(name) or getattr(
                worker.link._conn, "peer", None)
            if (server_name is None or server_name not in world.up
                    or world.freezer.is_paused(server_name)):
                continue
            server = world.serving[server_name]
            seats = [s for s in server.ctx.dispatcher.seats.values()
                     if s.worker_id == worker.id]
            if len(seats) != 1:
                continue
            seat = seats[0]
            pair = pair_of(name, server_name)
            quiet_since = max(
                store_quiet_since,
                *(self.disturbed.get(key, -math.inf) for key in (name, server_name, pair)),
                world.net.touched.get(pair, -math.inf),
                world.net.lost.get(pair, -math.inf) + worker.request_timeout)
            held = set(worker.held)
            # (A seat that let a run go as its lease expired is suspect: it gets no new run
            # until its worker's heartbeat, whose answer tells the worker the lease is lost.)
            extra = set() if seat.suspect else held - seat.active
            for run_id, side in [*((r, "worker") for r in extra),
                                 *((r, "seat") for r in seat.active - held)]:
                key = (worker.id, run_id, side)
                live[key] = self.since.get(key, now)
                bound = (worker_only_bound if side == "worker"
                         else seat_only_bound)(self.lease_ttl)
                lasted = now - max(live[key], quiet_since)
                if lasted >= bound and key not in self.reported:
                    self.reported.add(key)
                    world.ledger.violation(_describe(worker.id, run_id, side, server_name,
                                                     lasted))
        self.since = live


def _describe(worker_id: str, run_id: str, side: str, server: str | None,
              lasted: float) -> str:
    if side == "worker":
        return (f"worker {worker_id} held run {run_id} {lasted:.1f} s after its seat on "
                f"{server} let it go, with no fault to excuse it (its slot counted free)")
    return (f"the seat of worker {worker_id} on {server} counted run {run_id} "
            f"{lasted:.1f} s after the worker stopped holding it, with no fault to excuse "
            "it (a slot leaked)")
