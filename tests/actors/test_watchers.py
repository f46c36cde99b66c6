"""Run watchers, and the runs a server knows have not ended: a watch of a run the server
queued lately needs no read of the store, and an end heard from anywhere is never missed."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

import aiki
from aiki import protocol as p
from aiki.actors.watchers import RunWatchers
from aiki.records import RunRecord
from aiki.sources import Sources
from aiki.store import MemoryStore
from aiki.store.ops import Claim, CompleteRun
from tests.actors.test_server import hello, running_server


def ended(run_id: str, state: str = "completed") -> RunRecord:
    return RunRecord(run_id, "wf", "1", "null", state, None, 1, 1, None, None, "7", None,
                     None, 0.0, 1.0, 1.0)


def test_a_run_is_known_unfinished_from_the_commit_that_queued_it_until_its_end() -> None:
    watchers = RunWatchers()
    watchers.applying()
    assert not watchers.known_unfinished("a")  # (not before the commit)
    watchers.queued(("a", "b", "c"))
    assert all(watchers.known_unfinished(r) for r in "abc")
    watchers.ended(ended("a"))  # this server's commit
    watchers.heard_end("b")  # another server's notice
    watchers.ended(ended("c", "waiting"))  # (not an end)
    assert [watchers.known_unfinished(r) for r in "abc"] == [False, False, True]
    assert watchers.vouch("c") and not watchers.vouch("c")  # (once: for the first watch)
    watchers.applying()
    watchers.queued(("d",))
    watchers.forget()  # (notices lost, or a commit of unknown fate)
    assert not watchers.vouch("d")


def test_an_end_heard_before_the_commit_that_queued_its_run_is_back_wins() -> None:
    """Another server may claim and end a run before this one's writer is back from the
    commit that queued it: the notice comes first, and the run is not marked after it."""
    watchers = RunWatchers()
    watchers.applying()
    watchers.heard_end("a")
    watchers.queued(("a", "b"))
    assert not watchers.known_unfinished("a") and watchers.known_unfinished("b")
    # Everything forgotten while a batch is applied: none of its runs is vouched for.
    watchers.applying()
    watchers.forget()
    watchers.queued(("c",))
    assert not watchers.known_unfinished("c")
    # An end heard while no batch is applied is not kept for the next one.
    watchers.heard_end("d")
    watchers.applying()
    watchers.queued(("d",))
    assert watchers.known_unfinished("d")


def test_only_the_latest_queued_runs_are_known() -> None:
    watchers = RunWatchers(limit=3)
    for run_id in "abcde":
        watchers.applying()
        watchers.queued((run_id,))
    assert [watchers.known_unfinished(r) for r in "abcde"] == [False, False, True, True, True]


class CountingStore(MemoryStore):
    reads: int = 0

    async def get_run(self, run_id: str) -> Any:
        self.reads += 1
        return await super().get_run(run_id)


@aiki.workflow(name="wf-watched")
async def double(run: aiki.WorkflowRun, x: int) -> int:
    return x * 2


async def test_a_client_waiting_for_a_run_it_queued_costs_no_read_and_hears_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    async with aiki.embedded(store, sources=Sources.seeded(3)) as client:
        handle = await double.enqueue(client, 4)
        heard: list[int] = []

        async def first_watch() -> None:
            heard.append(await handle.wait_for_completion(timeout=30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_watch)
            await trio.sleep(1)
            assert store.reads == 0  # the watch read nothing: the server queued the run
            async with aiki.worker(client, workflows=[double]):
                await trio.sleep(1)
        assert heard == [8]  # the first watch heard the end (within its timeout)
        # A later watch reads the run (vouched for once).
        assert await handle.wait_for_completion(timeout=30) == 8
        assert store.reads == 1


async def test_a_run_ended_through_another_server_unwatched_is_read_when_watched_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The notice of its end came while nobody here watched it: it is forgotten as
    unfinished, so the later watch reads it (skipping the read would wait for ever)."""
    store = MemoryStore()
    async with running_server(store) as (server, transport), trio.open_nursery() as nursery:
        on_notice = server._notices(nursery)
        client = await transport.connect("srv")
        await hello(client)
        await client.send(p.Enqueue(2, "wf", "null", "1", None, "run-1"))
        assert isinstance(await client.receive(), p.Enqueued)
        assert server.ctx.watchers.known_unfinished("run-1")  # (until a watch)
        # Another server's worker runs it to its end.
        [claimed] = (await store.apply([Claim("w9", (("wf", "1"),), 1, 1.0, 30.0)]))[0]
        await store.apply([CompleteRun(claimed.lease, "7", 2.0)])
        on_notice("ended:run-1")
        await client.send(p.WatchRun(3, "run-1"))
        with trio.fail_after(5):
            heard = await client.receive()
        assert isinstance(heard, p.RunEnded) and heard.run.state == "completed"
        nursery.cancel_scope.cancel()


async def test_lost_notices_leave_no_run_known_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_server(MemoryStore()) as (server, transport), \
            trio.open_nursery() as nursery:
        client = await transport.connect("srv")
        await hello(client)
        await client.send(p.Enqueue(2, "wf", "null", "1", None, "run-1"))
        assert isinstance(await client.receive(), p.Enqueued)
        server._notices(nursery)("resync")
        assert not server.ctx.watchers.known_unfinished("run-1")
        nursery.cancel_scope.cancel()
