"""The Dispatcher under a backed-up worker connection: it claims no more than the connection
takes, and a run it cannot deliver goes back to the queue at once, not after its lease."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from aiki.actors.dispatcher import Dispatcher, Joined, Seat
from aiki.actors.store_writer import StoreWriter
from aiki.actors.timer import Timer
from aiki.errors import StoreUnavailable
from aiki.metrics import PUSHED_BEFORE_COMMIT
from aiki.protocol import Assign, Confirm
from aiki.records import Lease
from aiki.sources import Sources
from aiki.store import MemoryStore, execute
from aiki.store import ops as o

WF = ("wf", "1")


def recording_seat(session: int, worker: str) -> tuple[Seat, list[Any]]:
    """A one-slot seat of ``worker`` for WF, and the list of what is pushed to it."""
    pushed: list[Any] = []

    def push(msg: Any) -> bool:
        pushed.append(msg)
        return True

    return Seat(session, worker, (WF,), slots=1, push=push), pushed


@asynccontextmanager
async def dispatching(store: MemoryStore, queued: int) -> AsyncIterator[Dispatcher]:
    """``queued`` runs r0, r1, ... waiting, and a Dispatcher (with its StoreWriter, and the
    Timer that expires its leases) running on ``store``, polling only once an hour."""
    for i in range(queued):
        await execute(store, o.Enqueue(f"r{i}", "wf", "1", "null", None, 1.0))
    writer = StoreWriter(store)
    sources = Sources.seeded(1)
    dispatcher = Dispatcher(writer, sources, lease_ttl=30.0, poll_interval=3600)
    timer = Timer(store, writer, sources, dispatcher.poke)
    writer.on_expired = dispatcher.expired
    dispatcher.on_leased = timer.hint
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(timer.run)
        await nursery.start(dispatcher.run)
        yield dispatcher
        nursery.cancel_scope.cancel()


async def test_claims_follow_the_outbox_room_and_an_undeliverable_run_is_requeued(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    delivered: list[str] = []
    room = {"n": 6}
    accept = {"n": 2}

    def push(assign: Assign) -> bool:
        if accept["n"] == 0:
            return False  # filled up with replies since the claim
        accept["n"] -= 1
        delivered.append(assign.run.id)
        return True

    seat = Seat(1, "w1", (WF,), slots=8, push=push, room=lambda: room["n"])
    async with dispatching(store, 10) as dispatcher:
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        # Room for 6: it claimed 3 (half, leaving the rest for replies), delivered 2.
        assert delivered == ["r0", "r1"]
        assert seat.active == {"r0", "r1"}
        requeued = await store.get_run("r2")
        assert requeued is not None and requeued.state == "queued"
        history = await store.get_history("r2")
        assert history[-1].event == "run.queued"
        assert history[-1].detail == "the server could not deliver it to worker 'w1'"
        assert [r.state for r in await store.list_runs(state="running")] == ["running"] * 2
        # The connection drains: the requeued run is the first one delivered next.
        accept["n"], room["n"] = 100, 1000
        dispatcher.poke()
        await trio.sleep(1)
        assert delivered[:3] == ["r0", "r1", "r2"]
        assert len(delivered) == 8  # every slot filled, without waiting for any lease


async def test_a_failed_give_back_leaves_the_run_to_its_lease_and_the_dispatcher_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    class NoReleases(MemoryStore):
        async def apply(self, ops: Any) -> list[Any]:
            if any(isinstance(op, o.ReleaseRun) for op in ops):
                raise StoreUnavailable("database is unreachable: connection refused")
            return await super().apply(ops)

    store = NoReleases()
    delivered: list[str] = []
    full = {"now": True}

    def push(assign: Assign) -> bool:
        if full["now"]:
            return False
        delivered.append(assign.run.id)
        return True

    async with dispatching(store, 4) as dispatcher:
        dispatcher.tell(Joined(Seat(1, "w1", (WF,), slots=1, push=push)))
        await trio.sleep(1)
        stuck = await store.get_run("r0")
        assert stuck is not None and stuck.state == "running"  # until its lease expires
        full["now"] = False
        dispatcher.poke()
        await trio.sleep(1)
        assert delivered == ["r1"]  # the Dispatcher went on
        await trio.sleep(60)  # r0's lease expires and the run is queued again
        again = await store.get_run("r0")
        assert again is not None and again.state == "queued"  # the one slot holds r1


async def test_a_lease_another_server_expired_frees_the_slot_at_the_next_heartbeat(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Several servers on one store: whichever Timer comes first expires a lease, so the
    # Dispatcher that assigned the run may never hear of the expiry. The worker's heartbeats
    # (which do not renew the run) free the slot once a lease has passed since the assignment.
    from aiki.actors.dispatcher import Alive

    store = MemoryStore()
    delivered: list[str] = []

    def push(assign: Assign) -> bool:
        delivered.append(assign.run.id)
        return True

    seat = Seat(1, "w1", (WF,), slots=1, push=push)
    async with dispatching(store, 2) as dispatcher:
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        assert delivered == ["r0"]  # (its Assign lost on the way: the worker never has it)
        run = await store.get_run("r0")
        assert run is not None and run.lease_expires_at is not None
        assert await execute(store, o.ExpireLeases(run.lease_expires_at)) == ("r0",)
        dispatcher.tell(Alive(1, None, ()))  # within a lease of the assignment: kept
        await trio.sleep(1)
        assert seat.active == {"r0"}
        await trio.sleep(30)
        dispatcher.tell(Alive(1, None, ()))
        dispatcher.poke()
        await trio.sleep(1)
        assert delivered == ["r0", "r0"]  # the slot was free again: the run is back
        assert seat.active == {"r0"}


async def test_a_late_revoke_leaves_the_lease_claimed_after_the_cancel_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A cancel revokes a held lease and queues the run again, to compensate; a claim may
    commit before the server tells the old holder. The revoke names the epoch it revoked:
    the worker holding the newer lease is not told to stop, and keeps its slot (found by
    review: the revoke carried no epoch, and the worker dropped its new lease)."""
    from aiki.protocol import Revoke

    store = MemoryStore()
    seat, pushed = recording_seat(1, "w1")
    async with dispatching(store, 1) as dispatcher:
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        first = [m.run.lease_epoch for m in pushed if isinstance(m, Assign)]
        out = await execute(store, o.CancelRun("r0", "bye", 60.0, "c", 2.0))
        assert out.run is not None and out.run.state == "queued"
        seat.active.clear()  # the old actor ended: its slot is free (an Ended)
        dispatcher.poke()
        await trio.sleep(1)
        assigns = [m.run.lease_epoch for m in pushed if isinstance(m, Assign)]
        assert len(assigns) == 2 and assigns[1] > first[0]
        dispatcher.revoke("r0", "bye", first[0])  # late: the epoch the cancel revoked
        await trio.sleep(1)
        assert [m for m in pushed if isinstance(m, Revoke)] == []
        assert seat.active == {"r0"}
        dispatcher.revoke("r0", "bye", assigns[1])  # that lease's own revoke stops it
        await trio.sleep(1)
        assert [m.epoch for m in pushed if isinstance(m, Revoke)] == [assigns[1]]
        assert seat.active == set()


async def test_a_lease_expired_and_claimed_again_at_once_stays_with_its_new_holder(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The Timer expires w1's lease of r0, and a claim waiting behind that commit gives r0
    to w2 at once. The expiry is acted on at its commit: w1's seat lets r0 go, w2's keeps
    it, and a cancel's Revoke of the new lease reaches w2 (found by the simulation's
    promptness checker, seed 148: the Timer told the Dispatcher after its writes returned,
    by then the claim was placed, and w2's seat forgot r0: no Revoke, its slot free)."""
    from aiki.protocol import Revoke
    from tests.actors.test_direct_requests import HeldOps

    store = HeldOps("ExpireLeases")
    (w1, w1_pushed), (w2, w2_pushed) = recording_seat(1, "w1"), recording_seat(2, "w2")
    pushed = {"w1": w1_pushed, "w2": w2_pushed}
    async with dispatching(store, 1) as dispatcher:
        dispatcher.tell(Joined(w1))
        await trio.sleep(1)
        assert [m.run.id for m in pushed["w1"]] == ["r0"]
        await store.holding.wait()  # r0's lease is over: the Timer's expiry is applied
        dispatcher.tell(Joined(w2))  # w2's claim waits behind it
        await trio.sleep(1)
        store.release()
        await trio.sleep(1)
        assigned = [m for m in pushed["w2"] if isinstance(m, Assign)]
        assert [m.run.id for m in assigned] == ["r0"]
        assert "r0" not in w1.active and w1.suspect
        assert w2.active == {"r0"} and not w2.suspect
        dispatcher.revoke("r0", "bye", assigned[0].run.lease_epoch)
        assert [m.run_id for m in pushed["w2"] if isinstance(m, Revoke)] == ["r0"]


async def test_an_older_lease_let_go_leaves_the_seat_holding_the_newer_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker's write under an older lease of a run is refused (a stale heartbeat, the
    give-back of a run paused and resumed since) after the run was leased to it again: the
    session tells the Dispatcher that lease ended, and the seat keeps the newer one (found
    by the simulation's promptness checker, seed 384: the seat forgot the run, so a cancel
    of its new lease sent the worker no Revoke, and its slot counted free)."""
    from aiki.actors.dispatcher import Ended

    store = MemoryStore()
    seat, pushed = recording_seat(1, "w1")
    async with dispatching(store, 1) as dispatcher:
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        epoch = next(m.run.lease_epoch for m in pushed if isinstance(m, Assign))
        dispatcher.tell(Ended(1, (("r0", epoch - 1),)))
        await trio.sleep(1)
        assert seat.active == {"r0"}
        dispatcher.tell(Ended(1, (("r0", epoch),)))
        await trio.sleep(1)
        assert seat.active == set()


async def test_a_run_its_worker_rejoined_with_is_kept_until_a_lease_passes_unrenewed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker reconnects holding r0 (its hello lists it); a heartbeat it built before the
    hello, which does not list r0, arrives just after: the seat keeps r0 for a lease, as
    for a run it was assigned (found by the simulation's promptness checker, seed 347: the
    seat forgot r0 at once, and a cancel of its lease sent the worker no Revoke)."""
    from aiki.actors.dispatcher import Alive

    store = MemoryStore()
    seat = Seat(1, "w1", (WF,), slots=2, push=lambda msg: True, active={"r0"})
    async with dispatching(store, 0) as dispatcher:
        dispatcher.tell(Joined(seat))
        dispatcher.tell(Alive(1, None, ()))
        await trio.sleep(1)
        assert seat.active == {"r0"}
        await trio.sleep(30)  # a lease (30 s here) with no renewal of r0
        dispatcher.tell(Alive(1, None, ()))
        await trio.sleep(1)
        assert seat.active == set()


async def test_a_run_its_seat_forgot_is_held_again_once_its_worker_starts_a_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Seed 80: a worker paused for longer than a lease wakes with an assignment waiting in
    its inbox, and its first heartbeat, built before it reads it, lists no run: the seat
    lets the run go. The worker then starts its task (the lease still live), and a cancel's
    revoke a second later must still reach it, not wait for its next heartbeat."""
    from aiki.protocol import Revoke
    from tests.store.test_conformance import step

    store = MemoryStore()
    seat, pushed = recording_seat(1, "w1")
    async with dispatching(store, 1) as dispatcher:
        lease = await forgotten_by_a_late_heartbeat(store, dispatcher, seat, pushed)
        epoch = lease.epoch
        await dispatcher.writer.write(o.StartStep(lease, step("0", state="running"),
                                                  1_700_000_031.0, 30.0))
        assert seat.active == {"r0"}  # held again, at the commit
        dispatcher.revoke("r0", "cancelled", epoch)
        assert [m.epoch for m in pushed if isinstance(m, Revoke)] == [epoch]


async def test_a_run_claimed_back_into_a_slot_it_held_leaves_the_other_slot_claiming(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Seed 4461: another server's Timer expired w1's lease of r0, so its seat here still
    counted r0 as held. A claim for w1's one free slot took r0 back (the oldest queued run):
    a full claim, yet the slot stayed free, as r0's slot was already counted. The next run
    queued must be claimed at once, not at the next message or fallback poll (it waited
    for the poll, 4 s, while w1 had a free slot)."""
    from aiki.actors.dispatcher import Ended

    store = MemoryStore()
    delivered: list[tuple[str, int]] = []

    def push(assign: Assign) -> bool:
        delivered.append((assign.run.id, assign.run.lease_epoch))
        return True

    seat = Seat(1, "w1", (WF,), slots=2, push=push)
    async with dispatching(store, 2) as dispatcher:
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        assert [run_id for run_id, _ in delivered] == ["r0", "r1"]
        # Another server expires r0's lease (this Dispatcher is not told), r2 is queued.
        r0 = await store.get_run("r0")
        assert r0 is not None and r0.lease_expires_at is not None
        r1 = Lease("r1", delivered[1][1], "w1")  # (renewed: only r0's lease expires)
        await execute(store, o.Renew((r1,), r0.lease_expires_at, 30.0))
        assert await execute(store, o.ExpireLeases(r0.lease_expires_at)) == ("r0",)
        await execute(store, o.Enqueue("r2", "wf", "1", "null", None, 1.0))
        dispatcher.tell(Ended(1, (("r1", delivered[1][1]),)))  # r1 ended: one slot free
        dispatcher.poke()
        await trio.sleep(0.1)
        assert [run_id for run_id, _ in delivered[2:]] == ["r0", "r2"]
        assert seat.active == {"r0", "r2"}
        assert not await store.list_runs(state="queued")


def pushed_before_commit(dispatcher: Dispatcher) -> dict[str, float]:
    return {outcome: dispatcher.sources.metrics.value(PUSHED_BEFORE_COMMIT, (outcome,))
            for outcome in ("confirmed", "revoked")}


@asynccontextmanager
async def early_assigned(store: MemoryStore, queued: int, key: str | None = None
                         ) -> AsyncIterator[tuple[Any, ...]]:
    """A Dispatcher over ``store`` (``queued`` runs waiting) and an idle seat that joined
    while the queue was empty; the reserved seat's early Assign of a new run "new" (its
    enqueue's idempotency key ``key``), the enqueue, its claim and what was pushed."""
    async with dispatching(store, 0) as dispatcher:
        dispatcher.push_before_commit = True  # (as over PostgreSQL)
        seat, pushed = recording_seat(1, "w1")
        dispatcher.tell(Joined(seat))
        await trio.sleep(1)
        for i in range(queued):  # (enqueued by another server since: this one claimed none)
            await execute(store, o.Enqueue(f"r{i}", "wf", "1", "null", None, 2.0))
        enqueue = o.Enqueue("new", "wf", "1", '{"n": 1}', key, 3.0)
        reserved = dispatcher.reserve(WF, 3.0)
        assert reserved is not None and reserved[0] is seat
        early = dispatcher.assign_early(seat, enqueue, reserved[1])
        yield dispatcher, seat, pushed, enqueue, reserved[1], early


async def test_an_enqueues_run_is_pushed_before_its_claim_commits_and_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    async with early_assigned(store, 0) as (dispatcher, seat, pushed, enqueue, claim, early):
        # Pushed before anything was written, provisionally: the run as the claim will
        # lease it.
        assert await store.get_run("new") is None
        assert pushed == [Assign(early, (), provisional=True, push_id=1)]
        assert not seat.verdicts[1].decided.is_set()  # (its early task starts wait)
        assert (early.id, early.lease_epoch, early.lease_owner, early.state) == (
            "new", 1, "w1", "running")
        assert seat.holds("new", 1) and seat.reserved == 0 and seat.free == 0  # (held)
        _, claimed = await store.apply([enqueue, claim])
        assert [c.run for c in claimed] == [early]  # what the store leased is what was pushed
        dispatcher.claimed(seat, claimed, early)
        assert pushed[1:] == [Confirm("new", 1)]  # confirmed, not pushed again
        assert seat.verdicts[1].decided.is_set() and seat.verdicts[1].granted
        assert seat.active == {"new"} and seat.reserved == 0 and seat.free == 0
        assert pushed_before_commit(dispatcher) == {"confirmed": 1.0, "revoked": 0.0}


async def test_an_early_push_the_claim_did_not_grant_is_revoked(
    autojump_clock: trio.abc.Clock,
) -> None:
    # An older run of the version was queued (enqueued through another server): the claim
    # leased it, not the new run. The worker is told to stop the run pushed early, under
    # that lease, and is given the run the claim leased.
    store = MemoryStore()
    async with early_assigned(store, 1) as (dispatcher, seat, pushed, enqueue, claim, early):
        _, claimed = await store.apply([enqueue, claim])
        assert [c.run.id for c in claimed] == ["r0"]
        dispatcher.claimed(seat, claimed, early)
        assert [(type(m).__name__, getattr(m, "epoch", None)) for m in pushed] == [
            ("Assign", None), ("Revoke", 1), ("Assign", None)]
        assert pushed[1].run_id == "new" and pushed[2].run.id == "r0"
        assert seat.verdicts[1].decided.is_set() and not seat.verdicts[1].granted
        assert seat.active == {"r0"} and seat.reserved == 0
        assert pushed_before_commit(dispatcher) == {"confirmed": 0.0, "revoked": 1.0}
        new = await store.get_run("new")
        assert new is not None and new.state == "queued"  # claimed by the next claim


async def test_an_early_push_whose_commit_failed_is_revoked_and_its_slot_freed(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    async with early_assigned(store, 0) as (dispatcher, seat, pushed, _, _, early):
        dispatcher.claimed(seat, (), early)  # (the write failed, or its fate is unknown)
        assert [type(m).__name__ for m in pushed] == ["Assign", "Revoke"]
        assert (pushed[1].run_id, pushed[1].epoch) == ("new", 1)
        assert seat.active == set() and seat.free == 1


async def test_a_keyed_enqueue_is_not_pushed_early(autojump_clock: trio.abc.Clock) -> None:
    # Its key may name another run, with another payload: only the commit tells which.
    async with early_assigned(MemoryStore(), 0, "k1") as (_, seat, pushed, _, _, early):
        assert early is None and pushed == [] and seat.reserved == 1


async def test_a_heartbeat_answered_late_leaves_a_run_renewed_since_on_its_seat(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker's heartbeat built before r0's assignment reached it is answered over a lease
    after the assignment (its commit slowed, or answered after a newer heartbeat that
    renewed r0). The seat keeps r0: a renewal committed here since proves the worker holds
    it, and the one-slot worker is not given r1 beside it (found by review: the seat
    counted from the assignment alone, forgot r0, and filled the slot twice)."""
    from aiki.actors.dispatcher import Alive

    store = MemoryStore()
    seat, pushed = recording_seat(1, "w1")
    async with dispatching(store, 2) as dispatcher:
        dispatcher.writer.on_held = dispatcher.held
        dispatcher.tell(Joined(seat))
        await trio.sleep(20)
        [epoch] = [m.run.lease_epoch for m in pushed if isinstance(m, Assign)]
        lost = await dispatcher.writer.write(
            o.Renew((Lease("r0", epoch, "w1"),), 1_700_000_020.0, 30.0))
        assert lost == ()
        await trio.sleep(15)  # 35 s since the assignment, 15 s since the renewal
        dispatcher.tell(Alive(1, None, ()))  # the late heartbeat
        dispatcher.poke()
        await trio.sleep(1)
        assert seat.active == {"r0"}
        assert [m.run.id for m in pushed if isinstance(m, Assign)] == ["r0"]


async def test_a_run_its_seat_forgot_is_held_again_at_its_next_renewal(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The seat let r0 go at a heartbeat answered over a lease after the assignment, built
    before the worker had r0. The worker's next heartbeat renews r0's lease: from that
    commit the seat counts r0 again, and a cancel's revoke of the lease reaches the worker
    (found by review: only a task start counted a forgotten run again, so a worker between
    tasks stayed uncounted, its slot given twice)."""
    from aiki.protocol import Revoke

    store = MemoryStore()
    seat, pushed = recording_seat(1, "w1")
    async with dispatching(store, 1) as dispatcher:
        lease = await forgotten_by_a_late_heartbeat(store, dispatcher, seat, pushed)
        epoch = lease.epoch
        lost = await dispatcher.writer.write(o.Renew((lease,), 1_700_000_031.0, 30.0))
        assert lost == ()
        assert seat.active == {"r0"}  # held again, at the commit
        dispatcher.revoke("r0", "cancelled", epoch)
        assert [m.epoch for m in pushed if isinstance(m, Revoke)] == [epoch]


def test_a_commit_proves_held_the_leases_of_its_task_starts_and_kept_renewals() -> None:
    """What a batch's commit tells the Dispatcher its workers hold: the leases of its
    accepted task starts, and of its renewals the leases not found lost; a refused op
    proves nothing."""
    from aiki.actors.store_writer import held_under
    from aiki.errors import StaleLease
    from tests.store.test_conformance import step

    kept, lost, started = Lease("r0", 1, "w1"), Lease("r1", 1, "w1"), Lease("r2", 2, "w2")
    refused = Lease("r3", 1, "w2")
    ops = [o.Renew((kept, lost), 1.0, 30.0), o.StartStep(started, step("0"), 1.0, 30.0),
           o.StartStep(refused, step("0"), 1.0, 30.0), o.Renew((refused,), 1.0, 30.0)]
    outcomes = [("r1",), None, StaleLease("no"), StaleLease("no")]
    assert held_under(ops, outcomes) == (kept, started)


async def forgotten_by_a_late_heartbeat(store: MemoryStore, dispatcher: Dispatcher,
                                        seat: Seat, pushed: list[Any]) -> Lease:
    """r0 pushed to ``seat``'s worker; over a lease later, a heartbeat built before the
    worker read the assignment (it does not list r0) makes the seat let r0 go, while r0's
    lease lives on in the store (a skewed clock kept it in seed 80; here a renewal beside
    the writer). Returns that lease."""
    from aiki.actors.dispatcher import Alive

    dispatcher.writer.on_held = dispatcher.held
    dispatcher.tell(Joined(seat))
    await trio.sleep(20)
    [epoch] = [m.run.lease_epoch for m in pushed if isinstance(m, Assign)]
    lease = Lease("r0", epoch, "w1")
    await execute(store, o.Renew((lease,), 1_700_000_020.0, 30.0))
    await trio.sleep(11)  # over a lease since the assignment
    dispatcher.tell(Alive(1, None, ()))
    await trio.sleep(0.1)
    assert seat.active == set()  # forgotten
    return lease
