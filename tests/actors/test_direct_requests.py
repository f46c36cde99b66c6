"""Requests within one process, answered in the caller's task (MemoryConnection.direct).

A client or worker on the memory transport has the server's session answer its requests in
its own task: no message crosses the connection either way. What the server was sent it
finishes, whatever happens to the caller; the request's deadline still holds; a shutdown
waits for such answers as for any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

import aiki
from aiki import protocol as p
from aiki.errors import StoreUnavailable
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store.ops import Op
from aiki.transport.memory import MemoryConnection, MemoryTransport
from tests.actors.test_outcomes import HeldBatches, three
from tests.actors.test_server import leased_run

HeldStore = HeldBatches  # a store whose writes wait while ``held`` is set
ADDRESS = "srv"


@asynccontextmanager
async def serving(store: MemoryStore, sources: Sources, **settings: Any
                  ) -> AsyncIterator[tuple[Server, MemoryTransport, trio.Nursery]]:
    """A server on ``store`` at ``ADDRESS`` over a memory transport, until the block ends;
    and a nursery beside it, cancelled then too."""
    transport = MemoryTransport()
    server = Server(store, sources, **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, ADDRESS)
        yield server, transport, nursery
        nursery.cancel_scope.cancel()


def sent(client: aiki.Client) -> int:
    conn = client.link._conn
    assert isinstance(conn, MemoryConnection)
    return conn.sent


@pytest.mark.parametrize("check_wire", [False, True])
async def test_requests_in_one_process_cross_no_connection(
    check_wire: bool, autojump_clock: trio.abc.Clock,
) -> None:
    async with aiki.embedded(MemoryStore(), sources=Sources.seeded(1),
                             check_wire=check_wire) as client:
        async with aiki.worker(client, workflows=[three], id="w") as worker:
            assert worker.link is not None
            before = sent(client), worker.link._conn.sent  # type: ignore[union-attr]
            handles = [await three.enqueue(client, x) for x in range(5)]
            assert [await h.wait_for_completion(timeout=60) for h in handles] == [3, 4, 5, 6, 7]
            assert [await h.wait_for_completion() for h in handles] == [3, 4, 5, 6, 7]
            assert (await handles[0].status()).state == "completed"
            # Enqueues, watches, reads, task starts and outcomes, completions: not one message
            # sent (a watched run's end comes as a message from the server: that is a push).
            assert (sent(client), worker.link._conn.sent) == before  # type: ignore[union-attr]


async def test_a_deadline_ends_the_wait_for_a_direct_answer_not_the_servers_work(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Client B cancels a queued run while the store's writes are held past B's timeout.
    # Over a connection, B would time out and the server would still finish the cancel,
    # telling A, who waits for the run's end. So here: the answer is not cut short at B's
    # deadline (the server's own timeouts bound it); B hears TimeoutError once it is in,
    # as a late reply is dropped; A is told the run ended.
    store = HeldStore()
    async with serving(store, Sources.seeded(2)) as (_, transport, nursery):
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(3)) as a, \
                aiki.Client.open(transport, ADDRESS, Sources.seeded(4),
                                 request_timeout=5.0) as b:
            run = await b.enqueue("three", 0, version="1")
            ended: list[Any] = []

            async def watch() -> None:
                with pytest.raises(aiki.WorkflowCancelled):
                    await a.handle(run.id).wait_for_completion(timeout=60)
                ended.append(trio.current_time())

            nursery.start_soon(watch)
            await trio.sleep(1.0)
            store.held = trio.Event()

            async def release_later() -> None:
                await trio.sleep(10.0)
                assert store.held is not None
                store.held.set()
                store.held = None

            nursery.start_soon(release_later)
            start = trio.current_time()
            with pytest.raises(TimeoutError, match="within 5.0"):
                await b.handle(run.id).cancel()
            assert trio.current_time() - start == pytest.approx(10.0)  # once answered
            assert b.link.in_flight == 0 and not b.link._deadlines.queue
            with trio.fail_after(5):
                while not ended:
                    await trio.sleep(0.1)
            assert (await b.handle(run.id).status()).state == "cancelled"


async def test_an_embedded_stack_cancelled_during_a_direct_answer_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The answer is shielded from its asker's cancellation, not from the connection's
    # end: cancelling everything while a write is held ends at once (before: for ever).
    class Stuck(HeldStore):
        async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
            if self.held is not None:
                with trio.move_on_after(1000):  # (a hang shows as the time it took)
                    await self.held.wait()
            return await MemoryStore.apply(self, ops)

    store = Stuck()
    with trio.move_on_after(1.0):
        async with aiki.embedded(store, sources=Sources.seeded(5)) as client:
            store.held = trio.Event()
            await client.enqueue("three", 0, version="1")
    assert trio.current_time() < 10.0


async def test_the_server_finishes_a_request_whose_caller_was_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    # As a message that has left on a connection: the caller's cancellation is seen once
    # the answer is in (shielded until then), and the write stands.
    store = HeldStore()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        store.held = trio.Event()
        returned: list[Any] = []
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def release_later() -> None:
                await trio.sleep(1.0)
                scope.cancel()
                await trio.sleep(1.0)
                assert store.held is not None
                store.held.set()

            nursery.start_soon(release_later)
            with scope:
                try:
                    returned.append(await client.enqueue("three", 0, version="1",
                                                         idempotency_key="k-1"))
                finally:
                    ended_at = trio.current_time()
        # Cancelled at 1.0; seen when the answer was in, at 2.0, and the reply dropped.
        assert scope.cancelled_caught and returned == []
        assert ended_at == pytest.approx(2.0)
        store.held = None
        assert [r.idempotency_key for r in await store.list_runs()] == ["k-1"]


async def test_a_task_start_whose_asker_was_cancelled_is_left_at_the_writer_and_commits(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker's task start or outcome is answered without a shield (a cancel scope less
    per request): its asker's cancellation ends its wait at once, and the write, handed to
    the StoreWriter, commits all the same. An enqueue is still finished before its asker
    sees the cancel (the test above)."""
    store = HeldStore()
    async with serving(store, Sources.seeded(4)) as (_, transport, _nursery):
        worker, _, lease = await leased_run(transport)
        step = aiki.records.StepRecord("0", "task", "inc", "h", "0", None, "running", 1)
        answer = worker.direct()
        assert answer is not None
        store.held = trio.Event()
        with trio.move_on_after(1.0) as waited:
            await answer(p.StartStep(2, lease, step))
        assert waited.cancelled_caught and trio.current_time() == pytest.approx(1.0)
        store.held.set()
        store.held = None
        await trio.sleep(1.0)
        assert [(s.position, s.state) for s in await store.get_steps(lease.run_id)] == [
            ("0", "running")]


async def test_a_shutdown_waits_for_the_requests_being_answered_directly(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = HeldStore()
    async with serving(store, Sources.seeded(4)) as (server, transport, nursery):
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(5)) as client:
            store.held = trio.Event()
            got: list[Any] = []

            async def enqueue() -> None:
                got.append(await client.enqueue("three", 0, version="1", idempotency_key="k-2"))

            nursery.start_soon(enqueue)
            await trio.sleep(1.0)
            server.stop()
            await trio.sleep(1.0)
            assert not server.ctx.no_sessions.is_set(), "the session waits for its answer"
            store.held.set()
            await server.ctx.no_sessions.wait()
            # Answered, not lost with the connection:
            assert len(got) == 1
            assert [r.id for r in await store.list_runs()] == [h.id for h in got]


async def test_requests_answered_directly_are_bounded_by_max_in_flight_too(
    autojump_clock: trio.abc.Clock,
) -> None:
    from tests.actors.test_server import SlowReads

    store = SlowReads()
    async with serving(store, Sources.seeded(6)) as (server, transport, _):
        server.ctx.max_in_flight = 3
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(7)) as client:
            refused: list[str] = []

            async def read(run_id: str) -> None:
                with pytest.raises(aiki.RunNotFound) as caught:
                    await client.link.request(partial(p.GetRun, run_id=run_id))
                refused.append(str(caught.value))

            start = trio.current_time()
            async with trio.open_nursery() as readers:
                for i in range(10):
                    readers.start_soon(read, f"nowhere-{i}")
            assert len(refused) == 10 and store.most == 3  # every waiter got its turn
            assert trio.current_time() - start == pytest.approx(4.0)  # 3 + 3 + 3 + 1
            assert client.link._conn.sent == 1  # type: ignore[union-attr]  (the hello)


class Counting(MemoryStore):
    """A store that counts the ops of one kind it is sent, and stops a loop of them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.asked = 0

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.asked += sum(type(op).__name__ == self.kind for op in ops)
        if self.asked > 200:
            raise RuntimeError(f"a loop of {self.kind} requests")
        return await super().apply(ops)


async def runs_to_its_end(workflow: Any, store: MemoryStore, *, server_wall: float,
                          worker_wall: float) -> None:
    """A run of ``workflow`` (payload 7, which it returns) on a server whose wall clock
    starts at ``server_wall`` and an in-process worker whose clock starts at
    ``worker_wall``."""
    from aiki.actors.worker import Worker
    from aiki.sources import TrioWallClock

    server = Sources.seeded(8, TrioWallClock(anchor_wall=server_wall))
    worker = Sources.seeded(9, TrioWallClock(anchor_wall=worker_wall))
    async with serving(store, server) as (_, transport, nursery):
        await nursery.start(Worker(transport, ADDRESS, [workflow], "w", worker).run)
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(10)) as client:
            handle = await client.enqueue(workflow.name, 7, version="1")
            assert await handle.wait_for_completion(timeout=60) == 7


async def test_a_sleep_due_by_the_workers_clock_only_is_asked_about_again_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The worker's clock is 1 s ahead of the server's: for that second the server answers
    # "still sleeping" to a sleep the worker holds due. In process no time passes between a
    # request and its reply: asking again at once was a loop without end (found by the
    # simulation's in-process worker, seed 18); it asks after 10 ms, doubling.
    @aiki.workflow(name="naps", version="1")
    async def naps(run: aiki.WorkflowRun, x: int) -> int:
        await run.sleep(5.0)
        return x

    store = Counting("AwaitStep")
    await runs_to_its_end(naps, store, server_wall=1_700_000_000.0, worker_wall=1_700_000_001.0)
    assert store.asked <= 12  # the first ask, then about log2(1 s / 10 ms) more


async def test_a_retry_due_by_the_servers_clock_runs_when_it_wakes_the_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The worker's clock is 30 s behind the server's. A task fails; its retry, 20 s later by
    # the worker's clock, is due already by the server's, which queues the run again at
    # once when it waits for it. The worker held the retry not due and waited again: a
    # loop of claims and waits without end in process (found by the simulation with a
    # worker in its server's process, seed 153). The claim came on the server's clock at
    # or after the retry's time: the retry runs.
    failures = []

    @aiki.task(name="flaky-once", retry=aiki.Retry.fixed(max_attempts=2, delay=20.0))
    async def flaky(x: int) -> int:
        if not failures:
            failures.append(x)
            raise ConnectionError("once")
        return x

    @aiki.workflow(name="retries", version="1")
    async def retries(run: aiki.WorkflowRun, x: int) -> int:
        return await flaky.run(run, x)

    store = Counting("WaitRun")
    await runs_to_its_end(retries, store, server_wall=1_700_000_030.0,
                          worker_wall=1_700_000_000.0)
    assert store.asked == 1


class HeldOps(MemoryStore):
    """A store whose batches with an op of one of ``kinds`` wait while ``held`` is set
    (``holding`` is set once one does)."""

    def __init__(self, *kinds: str, answer_lost: bool = False) -> None:
        super().__init__()
        self.kinds = kinds
        self.held: trio.Event | None = trio.Event()
        self.holding = trio.Event()
        self.answer_lost = answer_lost  # the held batch commits, and its answer is lost

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        if self.held is not None and any(type(op).__name__ in self.kinds for op in ops):
            self.holding.set()
            await self.held.wait()
            if self.answer_lost:
                await super().apply(ops)
                raise StoreUnavailable("connection lost at the COMMIT")
        return await super().apply(ops)

    def release(self) -> None:
        assert self.held is not None
        self.held.set()
        self.held = None


@asynccontextmanager
async def crashed_while_held(store: HeldOps, transport: MemoryTransport,
                             workflows: list[Any], worker_id: str = "w"
                             ) -> AsyncIterator[None]:
    """A worker runs ``workflows`` until one of its writes is held; then its block is
    cancelled (a crash of the worker alone: its connection closes, which cancels the
    answer running on it, as a session's end cancels its requests in flight over a
    network). The block runs then; the write is let go after it."""
    from aiki.actors.worker import Worker

    with trio.CancelScope() as crash:
        async with trio.open_nursery() as process:
            await process.start(Worker(transport, ADDRESS, workflows, worker_id,
                                       Sources.seeded(4)).run)
            await store.holding.wait()
            crash.cancel()
    yield
    store.release()


@pytest.mark.parametrize("answer_lost", [False, True], ids=["answered", "answer-lost"])
async def test_a_run_ended_by_a_request_cut_short_is_still_told_to_its_watchers(
    autojump_clock: trio.abc.Clock, answer_lost: bool,
) -> None:
    # The worker crashes while its completion waits in the StoreWriter. The write commits
    # all the same; the session never got to tell the run's watchers, and a client waiting
    # for the run heard nothing, ever (found by the simulation's fault that crashes an
    # in-process worker while its run's end is written). The writer tells them now.
    # If the commit's answer is lost too, the writer saw a failure, and the worker that
    # would have sent its end again is gone: the server reads its watched runs again
    # after a failed batch (seed 695).
    store = HeldOps("CompleteRun", answer_lost=answer_lost)
    async with serving(store, Sources.seeded(2)) as (_, transport, nursery):
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(3)) as client:
            handle = await client.enqueue("three", 0, version="1")
            heard: list[Any] = []

            async def watch() -> None:
                heard.append(await client.handle(handle.id).wait_for_completion(timeout=600))

            nursery.start_soon(watch)
            async with crashed_while_held(store, transport, [three]):
                pass
            with trio.fail_after(60):
                while not heard:
                    await trio.sleep(0.1)
            assert heard == [3]


@aiki.workflow(name="nap", version="1")
async def nap(run: aiki.WorkflowRun, seconds: float) -> float:
    await run.sleep(seconds)
    return seconds


async def test_a_sleep_begun_by_a_request_cut_short_still_wakes_the_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The worker crashes while its run's WaitRun (a sleep of 20 s) waits in the
    # StoreWriter: the wait commits, but the Timer was never told its due time (the session
    # hints it after the write). It woke the run only when it next read the store, at the
    # lease's expiry (300 s here). A request cut short has the Timer and the Dispatcher
    # look again.
    from aiki.actors.worker import Worker

    store = HeldOps("WaitRun")
    async with serving(store, Sources.seeded(2), lease_ttl=300.0) as (_, transport, nursery):
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(3)) as client:
            handle = await client.enqueue("nap", 20.0, version="1")
            async with crashed_while_held(store, transport, [nap]):
                start = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert (await handle.status()).state == "waiting"
            await nursery.start(Worker(transport, ADDRESS, [nap], "w3",
                                       Sources.seeded(7)).run)
            assert await handle.wait_for_completion(timeout=600) == 20.0
            assert trio.current_time() - start < 25


broken: list[float] = []


@aiki.task(name="long-haul")
async def long_haul(_: None) -> None:
    try:
        await trio.sleep(1000)
    finally:
        broken.append(trio.current_time())


@aiki.workflow(name="kid", version="1")
async def kid(run: aiki.WorkflowRun, _: None) -> None:
    await long_haul.run(run, None)


@aiki.workflow(name="doomed", version="1")
async def doomed(run: aiki.WorkflowRun, _: None) -> None:
    await kid.start_child(run, None)
    await run.sleep(5)
    raise aiki.NonRetryableError("the parent gives up")


async def test_a_failed_parent_cut_short_still_has_its_childs_worker_stop_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The parent's worker crashes while its FailRun waits in the StoreWriter: the commit
    # cancels the child and revokes its lease, but the session that would have told the
    # child's worker never got there, so the child's task ran on until that worker's next
    # heartbeat learnt the lease was lost. The commit tells it now.
    from aiki.actors.worker import Worker

    broken.clear()
    store = HeldOps("FailRun")
    async with serving(store, Sources.seeded(2)) as (server, transport, nursery):
        await nursery.start(Worker(transport, ADDRESS, [kid], "kids", Sources.seeded(6)).run)
        async with aiki.Client.open(transport, ADDRESS, Sources.seeded(3)) as client:
            await client.enqueue("doomed", None, version="1")
            async with crashed_while_held(store, transport, [doomed]):
                assert not broken
                let_go = trio.current_time()
            with trio.fail_after(server.ctx.heartbeat_interval / 2):
                while not broken:
                    await trio.sleep(0.01)
            assert broken[0] - let_go < 1.0
