"""Doubts: after a batch whose commit is unknown, the server looks again once the store
answers (the watchers of runs that ended hear it; the Dispatcher and Timer read again)."""

from __future__ import annotations

import trio
import trio.testing

from aiki.actors.doubts import Doubts
from aiki.actors.watchers import RunWatchers
from aiki.errors import StoreUnavailable
from aiki.records import RunRecord
from aiki.store import MemoryStore
from aiki.store.ops import Claim, CompleteRun, Enqueue


class DownStore(MemoryStore):
    """A memory store whose reads fail while ``down``; counts the reads asked."""

    down: bool = False
    reads: int = 0

    async def get_run(self, run_id: str) -> RunRecord | None:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("database is unreachable")
        return await super().get_run(run_id)

    async def next_due(self) -> float | None:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("database is unreachable")
        return await super().next_due()


async def completed_run(store: MemoryStore, run_id: str) -> None:
    await store.apply([Enqueue(run_id, "wf", "1", "null", None, 0.0)])
    [claimed] = (await store.apply([Claim("w1", (("wf", "1"),), 1, 0.0, 30.0)]))[0]
    await store.apply([CompleteRun(claimed.lease, "7", 1.0)])


async def test_a_doubt_tells_the_watchers_of_a_run_that_ended_once_the_store_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, watchers, looked = DownStore(), RunWatchers(), []
    heard: list[RunRecord] = []
    watchers.watch("run-1", heard.append)
    watchers.watch("run-2", heard.append)  # (still running: its watcher waits on)
    await completed_run(store, "run-1")
    await store.apply([Enqueue("run-2", "wf", "1", "null", None, 0.0)])
    doubts = Doubts(store, watchers, lambda: looked.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        await nursery.start(doubts.run)
        store.down = True
        doubts.doubt()
        doubts.doubt()  # (one pass for both)
        await trio.sleep(30)
        assert heard == [] and looked == []  # nothing known while the store is down
        assert store.reads < 15  # asked less and less often (0.1 s doubling to 5 s)
        store.down = False
        await trio.sleep(6)
        assert [(r.id, r.state) for r in heard] == [("run-1", "completed")]
        assert len(looked) == 1
        assert watchers.watched_runs() == ["run-2"]
        nursery.cancel_scope.cancel()


async def test_doubts_that_come_while_a_pass_reads_get_one_more_pass_no_sooner_than_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, watchers, looked = DownStore(), RunWatchers(), []
    doubts = Doubts(store, watchers, lambda: looked.append(trio.current_time()),
                    min_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(doubts.run)
        for _ in range(20):  # a store that fails every write, 20 times a second
            doubts.doubt()
            await trio.sleep(0.05)
        await trio.sleep(5)
        assert looked == [0.0, 1.0]  # one look, then one more for all that came after
        nursery.cancel_scope.cancel()
