"""A run pushed to its worker before the commit that leases it (``Assign.provisional``):
its actor runs the workflow's code, but writes nothing and starts no task body until the
server confirms the lease, save a task's start sent early (``StartStep.push_id``), which
the server applies only if it confirms the lease; a revoke, a lost verdict or a drain let it go
with nothing written. Also an ordinary assignment revoked before its actor started. In
virtual time; the worker alone with a stand-in link, then with a server."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.actors.dispatcher import Seat
from aiki.actors.session import Session
from aiki.actors.worker import Worker
from aiki.errors import StaleLease, StoreUnavailable
from aiki.records import Lease, RunRecord
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store.ops import Op
from tests.actors.test_link_and_worker import Severable, cluster, running

bodies: Counter[str] = Counter()


@aiki.task(name="count")
async def count(name: str) -> str:
    bodies[name] += 1
    return name


@aiki.workflow(name="twice", version="1")
async def twice(run: aiki.WorkflowRun, name: str) -> list[str]:
    return [await count.run(run, f"{name}-a"), await count.run(run, f"{name}-b")]


def pushed_early(epoch: int = 1) -> p.Assign:
    """A fresh run of ``twice`` as an enqueue's claim will lease it to ``w1``."""
    run = RunRecord("r1", "twice", "1", '"x"', "running", None, 1, epoch, "w1", 1e9, None,
                    None, None, 0.0, 0.0, None)
    return p.Assign(run, (), provisional=True, push_id=7)


@attrs.define
class StandInLink:
    """What a Worker's run needs of its Link: the welcome's lease TTL, and requests,
    written down and answered Ok; a task start sent early (naming push 7) once the
    server's verdict is given (``judge``): Ok if granted, else refused as stale."""

    welcome: p.Welcome = p.Welcome(1, "srv", 10.0, 1.0)
    sent: list[str] = attrs.field(factory=list)
    verdict: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False

    async def request(self, make: Any, timeout: float | None = None, *,
                      retry: bool = True) -> Any:
        msg = make(1)
        early = getattr(msg, "push_id", 0) == 7
        self.sent.append(type(msg).__name__ + (" early" if early else ""))
        assert retry is not early  # (sent early: never again on a new connection)
        await trio.lowlevel.checkpoint()
        if early:
            await self.verdict.wait()
            if not self.granted:
                raise StaleLease("its lease was not committed")
        return p.Ok(1)

    def judge(self, granted: bool) -> None:
        self.granted = granted
        self.verdict.set()


def lone_worker(record_start_after: float = 0.0) -> Worker:
    return Worker(Severable(), "srv", [twice], "w1", Sources.seeded(5),
                  record_start_after=record_start_after)


async def start_taken(nursery: trio.Nursery, w: Worker, link: StandInLink) -> None:
    """Start what ``w`` took from its pushes, as its run loop does."""
    while True:
        try:
            assign, held = w._assignments[1].receive_nowait()
        except trio.WouldBlock:
            return
        w._start(nursery, link, assign, held)  # type: ignore[arg-type]


@asynccontextmanager
async def pushed_to(w: Worker, *pushes: Any) -> AsyncIterator[tuple[StandInLink, trio.Nursery]]:
    """``w``, told ``pushes`` in one go, the actors of what it took started as its run loop
    does; the stand-in link its requests go to, and the nursery of its actors."""
    bodies.clear()
    link = StandInLink()
    async with trio.open_nursery() as nursery:
        await nursery.start(w.flusher.serve)
        for push in pushes:
            w._on_push(push)
        await start_taken(nursery, w, link)
        yield link, nursery
        nursery.cancel_scope.cancel()


def pushed_early_to(w: Worker) -> AbstractAsyncContextManager[tuple[StandInLink, trio.Nursery]]:
    """``w``, pushed run ``r1`` provisionally (see :func:`pushed_to`)."""
    return pushed_to(w, pushed_early())


@pytest.mark.parametrize("record_start_after", [0.0, 5.0])
@pytest.mark.parametrize("first", ["confirm", "answer"])
async def test_a_provisional_run_sends_only_its_task_start_early_and_runs_no_task_until_confirmed(
    autojump_clock: trio.abc.Clock, record_start_after: float, first: str,
) -> None:
    # Fenced starts (0): the first task's start goes at once, flagged; no body runs before
    # its answer. Deferred starts (5 s: the body would run before its start is written):
    # nothing is sent before the Confirm. Either way the lease is not heartbeated or
    # announced before the server says it committed (its Confirm, or its answer to the
    # early start, whichever comes first).
    w = lone_worker(record_start_after)
    fenced = record_start_after == 0
    async with pushed_early_to(w) as (link, _):
        await trio.sleep(1)
        held = w.held["r1"]
        assert held.state is not None  # its workflow's code runs, up to its first task
        assert link.sent == (["StartStep early"] if fenced else []) and bodies == Counter()
        assert w._committed_leases() == ()  # not heartbeated
        assert w._hello(1).held == ()  # nor announced to a new connection
        if first == "confirm" or not fenced:
            w._on_push(p.Confirm("r1", 1))
            await trio.sleep(1)
            assert bodies == Counter() or not fenced  # (the early start's answer first)
        link.judge(True)
        with trio.fail_after(60):
            while "r1" in w.held:
                await trio.sleep(1)
    assert bodies == Counter({"x-a": 1, "x-b": 1})
    if fenced:  # (the second start, once the lease is known committed, is not flagged)
        assert link.sent[:2] == ["StartStep early", "StartStep"]
    assert link.sent[-1] == "CompleteRun"


@pytest.mark.parametrize("first", ["refusal", "revoke"])
async def test_a_provisional_run_refused_or_revoked_runs_nothing(
    autojump_clock: trio.abc.Clock, first: str,
) -> None:
    # Its early start refused, or its push revoked (both come, in either order): the actor
    # ends having run nothing, and a late Confirm, or a server that would grant the start
    # after all, changes nothing.
    w = lone_worker()
    revoke = p.Revoke("r1", "its lease was not committed", 1)
    async with pushed_early_to(w) as (link, _):
        await trio.sleep(1)
        if first == "refusal":
            link.judge(False)
        else:
            w._on_push(revoke)
        await trio.sleep(1)
        assert w.held == {}
        if first == "refusal":
            w._on_push(revoke)
        else:
            w._on_push(p.Confirm("r1", 1))  # (late, or for another: ignored)
            link.judge(True)  # (the actor asks no more)
        await trio.sleep(60)
    assert link.sent == ["StartStep early"] and bodies == Counter()


@pytest.mark.parametrize("record_start_after", [0.0, 5.0])
async def test_a_provisional_run_with_no_verdict_gives_up_at_its_lease_deadline(
    autojump_clock: trio.abc.Clock, record_start_after: float,
) -> None:
    # Its Confirm could not be queued (a full outbox), nor its early start answered: the
    # run's actor waits no longer than the lease it may have been granted would last
    # unrenewed, less the margin.
    w, start = lone_worker(record_start_after), trio.current_time()
    async with pushed_early_to(w) as (link, _):
        with trio.fail_after(60):
            while "r1" in w.held:
                await trio.sleep(0.5)
        assert trio.current_time() - start == pytest.approx(9.0, abs=0.6)  # TTL 10, less 10%
    # (Deferred: the start is written once the body has waited 5 s, early too.)
    assert link.sent == ["StartStep early"] and bodies == Counter()


@pytest.mark.parametrize("record_start_after", [0.0, 5.0])
async def test_the_same_lease_pushed_as_claimed_replaces_a_provisional_run(
    autojump_clock: trio.abc.Clock, record_start_after: float,
) -> None:
    # The seat had let the run go by the commit, so the Dispatcher pushed the lease it
    # claimed as any claimed run, and refuses what the provisional push's actor sends: the
    # worker replaces that actor with a new one, which runs the run once.
    w = lone_worker(record_start_after)
    async with pushed_early_to(w) as (link, nursery):
        await trio.sleep(1)
        first = w.held["r1"]
        assert not first.confirmed.is_set()
        w._on_push(p.Assign(pushed_early().run, ()))
        await start_taken(nursery, w, link)
        assert w.held["r1"] is not first and first.scope.cancel_called
        assert w.held["r1"].confirmed.is_set()
        assert w._committed_leases() == (w.held["r1"].lease,)
        with trio.fail_after(60):
            while "r1" in w.held:
                await trio.sleep(1)
        assert bodies == Counter({"x-a": 1, "x-b": 1}) and link.sent[-1] == "CompleteRun"
        # (The first actor's start, sent early, was never answered: cut off.)
        assert link.sent.count("StartStep early") == (1 if record_start_after == 0 else 0)
        w._on_push(pushed_early(2))  # a newer lease, provisionally
        assert w.held["r1"].lease.epoch == 2 and not w.held["r1"].confirmed.is_set()
        w._on_push(assigned(2))  # (again, as any claimed run: replaced)
        await start_taken(nursery, w, link)
        assert w.held["r1"].confirmed.is_set()
        w._on_push(assigned(2))  # a duplicate of that: ignored
        await start_taken(nursery, w, link)
        assert len(w.held) == 1


@pytest.mark.parametrize("verdict", ["confirm", "revoke"])
async def test_a_draining_worker_gives_a_provisional_run_back_only_once_confirmed(
    autojump_clock: trio.abc.Clock, verdict: str,
) -> None:
    w = lone_worker()
    w.draining.set()  # (the server had not heard of it when it pushed the run)
    async with pushed_early_to(w) as (link, _):
        await trio.sleep(1)
        assert link.sent == [] and "r1" in w.held
        w._on_push(p.Confirm("r1", 1) if verdict == "confirm" else p.Revoke("r1", None, 1))
        await trio.sleep(1)
        assert link.sent == (["ReleaseRun"] if verdict == "confirm" else [])
        assert w.held == {}


async def test_a_provisional_run_is_let_go_when_its_connection_drops(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Its verdict went with the connection; the reconnection's hello does not name it.
    w = lone_worker()
    w._on_push(pushed_early())
    w.link = object()  # type: ignore[assignment]  # (connected before: a reconnection)
    w._on_welcome(p.Welcome(1, "srv", 10.0, 1.0))
    assert w.held == {}


# -- with a server ---------------------------------------------------------------------------
class HoldsTheEnqueuesClaim(MemoryStore):
    """Writes down each batch as it is handed over; holds a batch of an enqueue and its
    claim while ``hold`` is set, then fails it if ``fail`` is set. Its commits run beside
    the Trio thread, as PostgreSQL's: an enqueue's run is pushed to its worker before."""

    commits_off_the_loop = True

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.hold: trio.Event | None = None
        self.fail = False
        self.fail_after_commit = False
        self.held_one = trio.Event()

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        names = [type(op).__name__ for op in ops]
        self.batches.append(names)
        if names == ["Enqueue", "Claim"] and self.hold is not None:
            self.held_one.set()
            await self.hold.wait()
            if self.fail:
                self.fail = False
                raise StoreUnavailable("simulated: the database went away before the commit")
        outcomes = await super().apply(ops)
        if names == ["Enqueue", "Claim"] and self.fail_after_commit:
            self.fail_after_commit = False
            raise StoreUnavailable("simulated: the database went away after the commit")
        return outcomes


async def test_a_run_pushed_before_a_commit_that_failed_is_stopped_and_its_slot_reused(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The worker, which started the workflow, is told to stop it, has written nothing
    # under the lease the commit did not grant, and its one slot takes the next run.
    bodies.clear()
    store = HoldsTheEnqueuesClaim()
    store.hold, store.fail = trio.Event(), True
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[twice], max_concurrent_runs=1) as worker:
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def enqueue() -> None:
                    try:
                        await twice.enqueue(client, "lost")
                    except StoreUnavailable as exc:
                        failed.append(exc)

                nursery.start_soon(enqueue)
                await store.held_one.wait()
                await trio.sleep(1)
                [pushed] = worker.held  # its workflow runs, up to its first task
                assert not worker.held[pushed].confirmed.is_set()
                store.hold.set()
            await trio.sleep(0.5)  # (the Revoke on its way)
            assert failed and worker.held == {}
            assert await store.get_run(pushed) is None
            store.hold = None
            handle = await twice.enqueue(client, "next")
            assert await handle.wait_for_completion(timeout=60) == ["next-a", "next-b"]
    assert bodies == Counter({"next-a": 1, "next-b": 1})
    # Nothing was written for the first run: no step before the second enqueue.
    first, second = [i for i, batch in enumerate(store.batches) if "Enqueue" in batch]
    assert store.batches[first] == store.batches[second] == ["Enqueue", "Claim"]
    assert all(set(batch) <= {"Claim"} for batch in store.batches[first + 1:second])


async def enqueue_told_it_failed(client: Any, name: str) -> None:
    with pytest.raises(StoreUnavailable):
        await twice.enqueue(client, name)


async def test_an_early_start_under_a_lease_whose_commit_went_unheard_is_refused(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    # The enqueue's batch commits, but the server hears it fail (the database went away
    # after the COMMIT): it revokes the lease it pushed early, and refuses the task start
    # the worker sent under it, though the store holds that lease. The lease expires; the
    # run is claimed again, and its tasks start under the new lease only.
    caplog.set_level(logging.INFO, "aiki.session")
    bodies.clear()
    store = HoldsTheEnqueuesClaim()
    store.hold, store.fail_after_commit = trio.Event(), True
    async with cluster(store, lease_ttl=4) as (server, transport, client):
        async with running(Worker(transport, "srv", [twice], "w1", Sources.seeded(5))) as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(enqueue_told_it_failed, client, "unheard")
                await store.held_one.wait()
                await trio.sleep(0.1)  # (the early start waits at the server)
                [run_id] = w.held
                assert not w.held[run_id].confirmed.is_set()
                store.hold.set()
            handle = client.handle(run_id)
            assert await handle.wait_for_completion(timeout=60) == ["unheard-a", "unheard-b"]
        history = await handle.history()
    assert bodies == Counter({"unheard-a": 1, "unheard-b": 1})
    assert any("before its commit (push 1), was not confirmed" in r.getMessage()
               for r in caplog.records)  # (the early start, refused)
    again = next(i for i, e in enumerate(history)
                 if e.event == "run.running" and e.detail == "lease epoch 2")
    assert min(i for i, e in enumerate(history) if e.event.startswith("task.")) > again


async def test_a_lease_granted_while_its_verdict_was_lost_expires_and_the_run_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The connections drop while the enqueue's batch commits (the lease is granted): the
    # worker hears no Confirm, lets the run go, and the lease expires; the run is claimed
    # again and runs once, every task under the new lease.
    bodies.clear()
    store = HoldsTheEnqueuesClaim()
    store.hold = trio.Event()
    async with cluster(store, lease_ttl=4) as (server, transport, client):
        async with running(Worker(transport, "srv", [twice], "w1", Sources.seeded(5))) as w:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(twice.enqueue, client, "cut")
                await store.held_one.wait()
                await trio.sleep(0.1)
                [run_id] = w.held
                await transport.sever()
                store.hold.set()
            handle = client.handle(run_id)
            assert await handle.wait_for_completion(timeout=60) == ["cut-a", "cut-b"]
        run = await server.store.get_run(run_id)
        assert run is not None and run.lease_epoch == 2
        history = await handle.history()
    assert bodies == Counter({"cut-a": 1, "cut-b": 1})
    again = next(i for i, e in enumerate(history)
                 if e.event == "run.running" and e.detail == "lease epoch 2")
    assert min(i for i, e in enumerate(history) if e.event.startswith("task.")) > again


async def test_only_a_store_whose_commits_run_off_the_loop_has_runs_pushed_before_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    # SQLite's idle batches run inline, when nothing else is runnable: a push before the
    # commit would send them to the thread (measured: slower one at a time, the dispatch
    # no faster). PostgreSQL's commits run on the store's own thread.
    for store, early in ((MemoryStore(), False), (HoldsTheEnqueuesClaim(), True)):
        async with cluster(store) as (server, _, _):
            assert server.ctx.dispatcher.push_before_commit is early


def assigned(epoch: int = 1) -> p.Assign:
    """``pushed_early(epoch)``, pushed as any claimed run (after its commit)."""
    return attrs.evolve(pushed_early(epoch), provisional=False, push_id=0)


@pytest.mark.parametrize("revoked_epoch", [1, None])
async def test_an_assignment_revoked_before_its_actor_started_never_starts(
    autojump_clock: trio.abc.Clock, revoked_epoch: int | None,
) -> None:
    # An Assign and the Revoke of its lease read in one go, before the run loop took the
    # Assign (a cancel committed right after the claim): the worker holds nothing, runs
    # nothing, writes nothing; twice over for a duplicated Assign.
    w = lone_worker()
    revoke = p.Revoke("r1", "cancelled", revoked_epoch)
    async with pushed_to(w, assigned(), assigned(), revoke) as (link, _):
        assert w.held == {} and w._unstarted == {}
        await trio.sleep(5)
    assert link.sent == [] and bodies == Counter()


async def test_a_revoke_of_an_older_lease_leaves_a_newer_assignment_on_its_way(
    autojump_clock: trio.abc.Clock,
) -> None:
    w = lone_worker()
    async with pushed_to(w, assigned(epoch=2), p.Revoke("r1", "cancelled", 1)) as (link, _):
        with trio.fail_after(60):
            while "r1" in w.held:
                await trio.sleep(1)
    assert link.sent[0] == "StartStep" and link.sent[-1] == "CompleteRun"
    assert w._unstarted == {}


def seat_and_session() -> tuple[Seat, Any]:
    """A one-slot seat of worker w1, and what ``Session._granted`` reads of its session."""
    seat = Seat(1, "w1", (("twice", "1"),), 1, lambda msg: True)
    return seat, SimpleNamespace(seat=seat, ctx=SimpleNamespace(lease_ttl=10.0))


async def test_a_task_start_sent_early_is_judged_by_the_push_it_names(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A first push of r1's lease 1 is revoked (its claim's commit failed); the client's
    # retry pushes the same lease again and it commits. A start from the first push's
    # actor, however late, is refused; one from the second's waits for its verdict and is
    # accepted; one naming another run's push, or a push forgotten, is refused.
    seat, session = seat_and_session()
    lease = Lease("r1", 1, "w1")
    seat.pushed_early(1, "r1", 1, keep=20.0)
    seat.judge("r1", 1, False)
    seat.pushed_early(2, "r1", 1, keep=20.0)
    accepted: list[float] = []

    async def start(push_id: int) -> None:
        await Session._granted(session, lease, push_id)
        accepted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start, 2)
        await trio.sleep(1)
        assert accepted == []  # (undecided: it waits)
        seat.judge("r1", 1, True)
    assert accepted == [1.0]
    for push_id in (1, 3):  # revoked; never made
        with pytest.raises(StaleLease):
            await Session._granted(session, lease, push_id)
    with pytest.raises(StaleLease):  # (push 2 was r1's)
        await Session._granted(session, Lease("r2", 1, "w1"), 2)
    await trio.sleep(25)
    seat.pushed_early(3, "r3", 1, keep=20.0)  # (forgets the verdicts older than 20 s)
    assert list(seat.verdicts) == [3]
    with pytest.raises(StaleLease):
        await Session._granted(session, lease, 2)


async def test_an_undecided_early_start_is_refused_after_a_lease(
    autojump_clock: trio.abc.Clock,
) -> None:
    seat, session = seat_and_session()
    seat.pushed_early(1, "r1", 1, keep=20.0)
    with pytest.raises(StaleLease, match="was not judged in time"):
        await Session._granted(session, Lease("r1", 1, "w1"), 1)
    assert trio.current_time() == 10.0
