"""The Dispatcher claims only while there may be work: a freed slot after an empty queue
costs no store transaction, and new work or the poll still reaches an idle worker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

import aiki
from aiki.store import MemoryStore
from aiki.store import ops as o


class CountingStore(MemoryStore):
    ops: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()

    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        self.ops.update(type(op).__name__ for op in ops)
        return await super().apply(ops)


@aiki.task(name="add-one")
async def add_one(x: int) -> int:
    return x + 1


@aiki.workflow(name="one-step", version="1")
async def one_step(run: aiki.WorkflowRun, x: int) -> int:
    return await add_one.run(run, x)


async def test_one_claim_per_enqueue_when_runs_come_one_at_a_time(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    store = CountingStore()
    async with aiki.embedded(store, sources=sources, poll_interval=3600) as client:
        # Two slots: a claim that fills every free slot may have left work queued, so a
        # one-slot worker would claim once more after each run.
        async with aiki.worker(client, workflows=[one_step], max_concurrent_runs=2):
            await trio.sleep(1)
            joined = store.ops["Claim"]  # the worker's arrival: one claim, nothing queued
            for i in range(5):
                handle = await one_step.enqueue(client, i)
                assert await handle.wait_for_completion(timeout=10) == i + 1
            await trio.sleep(1)
            # Each enqueue pokes one claim; the slot freed by each completion claims
            # nothing, since the last claim came back short.
            assert store.ops["Claim"] - joined == 5
            before_poll = store.ops["Claim"]
            await trio.sleep(3600)
            assert store.ops["Claim"] - before_poll == 1  # the slow fallback poll


async def test_a_full_claim_keeps_claiming_as_slots_free_up(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    store = CountingStore()
    async with aiki.embedded(store, sources=sources, poll_interval=3600) as client:
        # Queued before any worker exists (so the version is given), more than its slots.
        handles = [await client.enqueue("one-step", i, version="1") for i in range(6)]
        async with aiki.worker(client, workflows=[one_step], max_concurrent_runs=2):
            # No poke comes after the worker's arrival and the poll is an hour away: each
            # slot freed must be refilled because the claim before it came back full.
            results = [await h.wait_for_completion(timeout=60) for h in handles]
    assert results == [i + 1 for i in range(6)]
