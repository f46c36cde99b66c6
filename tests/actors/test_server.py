"""The server under bad input and failure: every refusal is clear, nothing stored is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import aiki
from aiki import protocol as p
from aiki.errors import StoreUnavailable
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store.ops import CompleteRun, Op
from aiki.transport.memory import MemoryConnection, MemoryTransport


class FlakyStore(MemoryStore):
    """A memory store whose database can be made to go away, or to crash the writer."""

    down: bool = False
    crash_next: bool = False

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("bug in the store driver")
        if self.down:
            raise StoreUnavailable("database is unreachable: connection refused")
        return await super().apply(ops)


@asynccontextmanager
async def running_server(store: MemoryStore, **kw: Any) -> AsyncIterator[
    tuple[Server, MemoryTransport]
]:
    transport = MemoryTransport()
    server = Server(store, Sources.seeded(5), **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        yield server, transport
        nursery.cancel_scope.cancel()


async def hello(conn: MemoryConnection, role: str = "client", token: str | None = None) -> None:
    await conn.send(p.Hello(1, role, "tester", token=token))  # type: ignore[arg-type]
    assert isinstance(await conn.receive(), p.Welcome)


async def test_malformed_and_unknown_messages_are_refused_and_the_connection_keeps_serving(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running_server(MemoryStore()) as (_, transport):
        conn = await transport.connect("srv")
        assert isinstance(conn, MemoryConnection)
        await hello(conn)
        for raw, expected in [
            ("{not json", "not valid JSON"),
            ('{"type": "launch_missiles", "req": 2}', "unknown message type 'launch_missiles'"),
            ('{"type": "get_run", "req": 3}', "run_id"),
            ('[1, 2]', "must be a JSON object"),
        ]:
            await conn.send_raw(raw)
            refused = await conn.receive()
            assert isinstance(refused, p.Refused) and refused.error_type == "ProtocolError"
            assert expected in refused.message
        await conn.send(p.GetRun(9, "nope"))
        refused = await conn.receive()
        assert (refused.req, refused.error_type) == (9, "RunNotFound")


async def test_a_client_may_not_speak_for_a_worker(autojump_clock: trio.abc.Clock) -> None:
    async with running_server(MemoryStore()) as (_, transport):
        conn = await transport.connect("srv")
        await hello(conn)
        await conn.send(p.Heartbeat(2, ()))
        refused = await conn.receive()
        assert refused.error_type == "ProtocolError"
        assert "only accepted from a worker" in refused.message


async def test_silence_and_wrong_tokens_are_closed_with_a_reason(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running_server(MemoryStore(), token="s3cret") as (_, transport):
        silent = await transport.connect("srv")
        goodbye = await silent.receive()  # nothing said: closed after the hello timeout
        assert isinstance(goodbye, p.Goodbye) and "no hello within" in goodbye.reason
        wrong = await transport.connect("srv")
        await wrong.send(p.Hello(1, "client", "intruder", token="guess"))
        goodbye = await wrong.receive()
        assert isinstance(goodbye, p.Goodbye) and "authentication failed" in goodbye.reason
        right = await transport.connect("srv")
        await hello(right, token="s3cret")


@aiki.workflow(name="noop", version="1")
async def noop(run: aiki.WorkflowRun, x: int) -> int:
    return x


async def test_a_dead_database_gives_a_clear_error_and_loses_nothing_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FlakyStore()
    async with aiki.embedded(store, sources=Sources.seeded(1)) as client:
        first = await noop.enqueue(client, 1)
        store.down = True
        with pytest.raises(StoreUnavailable, match="database is unreachable"):
            await noop.enqueue(client, 2)
        store.down = False
        assert [r.id for r in await store.list_runs()] == [first.id]
        async with aiki.worker(client, workflows=[noop]):
            assert await first.wait_for_completion(timeout=10) == 1


async def test_a_crashing_store_writer_is_restarted_by_the_supervisor(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FlakyStore()
    async with running_server(store) as (server, transport):
        conn = await transport.connect("srv")
        await hello(conn)
        store.crash_next = True
        await conn.send(p.Enqueue(2, "noop", "1", "1"))
        refused = await conn.receive()
        assert refused.error_type == "StoreUnavailable" and "bug in the store driver" in (
            refused.message)
        await conn.send(p.Enqueue(3, "noop", "2", "1"))
        enqueued = await conn.receive()
        assert isinstance(enqueued, p.Enqueued) and enqueued.created
        assert server.supervisor.restarts == 1
        assert isinstance(server.supervisor.first_failure, RuntimeError)


class SlowStore(MemoryStore):
    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        await trio.sleep(1.0)
        return await super().apply(ops)


async def test_a_message_delivered_twice_is_answered_twice_and_the_listener_keeps_serving(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Two equal messages in flight at once were one borrower of the session's request
    # limiter: the second crashed the listener, and every connection of the server with it.
    async with running_server(SlowStore()) as (server, transport):
        conn = await transport.connect("srv")
        assert isinstance(conn, MemoryConnection)
        await hello(conn)
        twice = p.Enqueue(2, "wf", "null", "1", None, "run-1")
        await conn.send(twice)
        await conn.send(twice)
        replies = [await conn.receive(), await conn.receive()]
        assert [type(r) for r in replies] == [p.Enqueued, p.Enqueued]
        assert server.supervisor.restarts == 0


class ReplyLostStore(MemoryStore):
    """Commits a run's completion, then loses the reply (once)."""

    lose_completion: bool = True

    def loses(self, op: Op[Any]) -> bool:
        return isinstance(op, CompleteRun)

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        outcomes = await super().apply(ops)
        if self.lose_completion and any(self.loses(op) for op in ops):
            self.lose_completion = False
            raise StoreUnavailable("connection lost after COMMIT")
        return outcomes


async def test_a_completion_whose_reply_was_lost_still_reaches_the_watchers(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The worker's retry is refused as stale (the run has ended), and no notice of a server's
    # own commit comes back to it: the watchers heard nothing, for ever.
    store = ReplyLostStore()
    async with aiki.embedded(store, sources=Sources.seeded(2)) as client:
        async with aiki.worker(client, workflows=[noop]):
            handle = await noop.enqueue(client, 7)
            assert await handle.wait_for_completion(timeout=60) == 7
    assert not store.lose_completion


async def leased_run(transport: MemoryTransport) -> tuple[
    MemoryConnection, MemoryConnection, aiki.records.Lease
]:
    """A worker ``w1`` of workflow ``wf`` 1 with one slot, a client, and the lease of run
    ``run-1`` that the client enqueued and the worker was assigned."""
    worker = await transport.connect("srv")
    assert isinstance(worker, MemoryConnection)
    await worker.send(p.Hello(1, "worker", "w1", (p.WorkflowRef("wf", "1"),), slots=1))
    assert isinstance(await worker.receive(), p.Welcome)
    client = await transport.connect("srv")
    assert isinstance(client, MemoryConnection)
    await hello(client)
    await client.send(p.Enqueue(2, "wf", "null", "1", None, "run-1"))
    assert isinstance(await client.receive(), p.Enqueued)
    assign = await worker.receive()
    assert isinstance(assign, p.Assign)
    if assign.provisional:  # (pushed as the enqueue's own claim committed: confirmed since)
        assert await worker.receive() == p.Confirm("run-1", assign.run.lease_epoch)
    return worker, client, aiki.records.Lease("run-1", assign.run.lease_epoch, "w1")


async def test_a_worker_that_gives_a_run_back_gets_no_more_runs_even_if_its_drain_was_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A worker gives runs back only when it drains. Its Drain request may be delayed or
    # lost on the way; the server used to hand the run straight back to it, again and
    # again (simulation seed 148), instead of waiting for another worker.
    store = MemoryStore()
    async with running_server(store) as (_, transport):
        worker, client, lease = await leased_run(transport)
        await worker.send(p.ReleaseRun(2, lease))  # no Drain before it
        assert await worker.receive() == p.Ok(2)
        with trio.move_on_after(60):
            pushed = await worker.receive()
            pytest.fail(f"the server pushed {pushed!r} to a worker that gave a run back")
        run = await store.get_run("run-1")
        assert run is not None and (run.state, run.lease_owner) == ("queued", None)


@pytest.mark.parametrize("ending", ["complete", "wait"])
async def test_a_worker_whose_end_of_a_run_the_store_did_not_answer_still_hears_a_cancel(
    autojump_clock: trio.abc.Clock, ending: str,
) -> None:
    """The store is down when a worker ends its run (or sends it to wait): the worker holds
    the lease and sends the write again, so its seat holds the run meanwhile, and a cancel
    committed then reaches it at once (found by the simulation's promptness checker, seed
    783: the seat forgot the run at the failed write, so the cancel sent the worker no
    Revoke, and its slot counted as free)."""
    store = FlakyStore()
    async with running_server(store) as (server, transport):
        worker, client, lease = await leased_run(transport)
        store.down = True
        await worker.send(p.CompleteRun(2, lease, "1") if ending == "complete" else p.WaitRun(
            2, lease, (aiki.records.WaitFor("0", "sleep", "nap", 1e12),), "sleeps"))
        refused = await worker.receive()
        assert isinstance(refused, p.Refused) and refused.error_type == "StoreUnavailable"
        [seat] = server.ctx.dispatcher.seats.values()
        assert seat.active == {"run-1"}  # (its slot is not free)
        store.down = False
        await client.send(p.CancelRun(3, "run-1", "no longer wanted"))
        assert isinstance(await client.receive(), p.CancelAnswer)
        with trio.fail_after(1):
            revoke = await worker.receive()
        assert isinstance(revoke, p.Revoke) and revoke.run_id == "run-1"


async def test_a_worker_whose_end_of_a_run_was_refused_as_paused_still_hears_a_cancel(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client pauses a run; its worker's completion is refused as paused. The worker
    still holds the lease (it gives the run back paused, in a write of its own), so its
    seat holds the run until then, and a cancel committed meanwhile reaches it at once
    (found by the simulation's promptness checker, seed 6536: the seat forgot the run at
    the refusal, so the cancel sent the worker no Revoke)."""
    async with running_server(MemoryStore()) as (server, transport):
        worker, client, lease = await leased_run(transport)
        await client.send(p.PauseRun(3, "run-1"))
        assert isinstance(await client.receive(), p.Controlled)
        await worker.send(p.CompleteRun(2, lease, "1"))
        while not isinstance(refused := await worker.receive(), p.Refused):
            pass  # (the server's word of the pause)
        assert refused.error_type == "RunPaused"
        await trio.testing.wait_all_tasks_blocked()  # (what the session told, handled)
        [seat] = server.ctx.dispatcher.seats.values()
        assert seat.active == {"run-1"}  # (its slot is not free)
        await client.send(p.CancelRun(4, "run-1", "no longer wanted"))
        assert isinstance(await client.receive(), p.CancelAnswer)
        with trio.fail_after(1):
            revoke = await worker.receive()
        assert isinstance(revoke, p.Revoke) and revoke.run_id == "run-1"


async def test_a_worker_still_compensating_when_the_grace_period_ends_is_told_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The Timer ends a cancelled run whose grace period is over while its worker still
    holds it (compensating): the worker is sent a Revoke at once. (A known-bad change that
    freed an ended run's seat at the commit, before that Revoke was sent, fails this test;
    the simulation's promptness checker caught it too, seed 35.)"""
    async with running_server(MemoryStore()) as (_, transport):
        worker, client, _ = await leased_run(transport)
        await client.send(p.CancelRun(3, "run-1", "no longer wanted", grace=5.0))
        assert isinstance(await client.receive(), p.CancelAnswer)
        pushed = [await worker.receive(), await worker.receive()]
        assert [type(m) for m in pushed] == [p.Revoke, p.Assign]  # to compensate
        compensating = pushed[1].run.lease_epoch
        with trio.fail_after(6):  # the grace period, and no later
            revoke = await worker.receive()
        assert isinstance(revoke, p.Revoke) and revoke.run_id == "run-1"
        assert revoke.epoch is None or revoke.epoch >= compensating


@aiki.workflow(name="sends-a-child", version="1")
async def sends_a_child(run: aiki.WorkflowRun, x: int) -> int:
    await noop.start_child(run, x)  # not joined: the run ends once the child has
    return x + 1


class ChildReplyLostStore(ReplyLostStore):
    """Commits a child's completion (its id has a ``/``), which ends its parent too, then
    loses the reply (once)."""

    def loses(self, op: Op[Any]) -> bool:
        return isinstance(op, CompleteRun) and "/" in op.lease.run_id


async def test_a_parent_ended_by_a_child_whose_completion_reply_was_lost_reaches_its_watchers(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Seed 31 (with the enqueue that claims a free slot): a parent whose function had
    # returned ended with its last child's completion, whose reply was lost. The session told
    # the child's watchers (a read) but not the parent's, and no notice of a server's own
    # commit comes back to it: the client waiting for the parent waited for ever.
    store = ChildReplyLostStore()
    async with aiki.embedded(store, sources=Sources.seeded(2)) as client:
        async with aiki.worker(client, workflows=[sends_a_child, noop]):
            handle = await sends_a_child.enqueue(client, 7)
            assert await handle.wait_for_completion(timeout=60) == 8
    assert not store.lose_completion


class SlowReads(MemoryStore):
    """Each run read takes a second; counts the reads at once."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = 0
        self.most = 0

    async def get_run(self, run_id: str) -> Any:
        self.reading += 1
        self.most = max(self.most, self.reading)
        try:
            await trio.sleep(1.0)
            return await super().get_run(run_id)
        finally:
            self.reading -= 1


async def test_a_session_answers_at_most_max_in_flight_requests_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = SlowReads()
    async with running_server(store) as (server, transport):
        server.ctx.max_in_flight = 3
        conn = await transport.connect("srv")
        assert isinstance(conn, MemoryConnection)
        await hello(conn)
        start = trio.current_time()
        for req in range(2, 12):
            await conn.send(p.GetRun(req, "nowhere"))
        replies = [await conn.receive() for _ in range(10)]
        assert sorted(r.req for r in replies) == list(range(2, 12))
        assert all(isinstance(r, p.Refused) and r.error_type == "RunNotFound" for r in replies)
        assert store.most == 3  # the others waited for room
        assert trio.current_time() - start == pytest.approx(4.0)  # 3 + 3 + 3 + 1


# -- messages sent past the outbox keep the order ---------------------------------------------
async def test_messages_sent_past_the_outbox_never_overtake_those_queued_in_it() -> None:
    from types import SimpleNamespace

    from aiki.actors.session import Session
    from aiki.transport.memory import connection_pair

    server_end, client_end = connection_pair("client", "server", buffer=2)
    session = Session(SimpleNamespace(sources=Sources.seeded(0)), server_end, 1)  # type: ignore[arg-type]
    assert session._push(p.Ok(0))  # the outbox's task is not reading yet: queued
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._send_outbox)
        assert (await client_end.receive()).req == 0
        assert session._push(p.Ok(1)) and session._push(p.Ok(2))  # straight on
        assert session._push(p.Ok(3))  # the connection is full: queued, and being sent
        await trio.testing.wait_all_tasks_blocked()
        assert (await client_end.receive()).req == 1  # room again on the connection...
        assert session._push(p.Ok(4))  # ...but 3 is on its way: 4 queues behind it
        got = [(await client_end.receive()).req for _ in range(3)]
        assert got == [2, 3, 4]
        await trio.testing.wait_all_tasks_blocked()
        assert session._push(p.Ok(5))  # nothing ahead again: straight on
        assert session.outbox.queued() == 0
        assert (await client_end.receive()).req == 5
        # A closed outbox (a shutdown: its goodbye is the last message) lets nothing past.
        session.outbox.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not session._push(p.Ok(6))
        nursery.cancel_scope.cancel()
