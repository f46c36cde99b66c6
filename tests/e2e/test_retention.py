"""Retention: finished runs and their history are deleted once old enough, on every store,
in small batches; unfinished runs are never touched. And ``client.purge_runs`` by hand."""

from __future__ import annotations

import datetime

import pytest
import trio

import aiki
from aiki.store import Store


@aiki.task(name="quick")
async def quick(x: int) -> int:
    return x


@aiki.workflow(name="short-lived", version="1")
async def short_lived(run: aiki.WorkflowRun, x: int) -> int:
    if x < 0:
        await run.sleep(86400 * 30)
    return await quick.run(run, x)


async def test_retention_deletes_old_finished_runs_in_batches(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources, retention=3600.0) as client:
        async with aiki.worker(client, workflows=[short_lived]):
            old = [await short_lived.enqueue(client, i, idempotency_key=f"k{i}")
                   for i in range(12)]
            for h in old:
                await h.wait_for_completion(timeout=60)
            sleeper = await short_lived.enqueue(client, -1)
            await trio.sleep(1800)
            fresh = await short_lived.enqueue(client, 99)
            await fresh.wait_for_completion(timeout=60)
            assert len(await engine_store.list_runs()) == 14
            await trio.sleep(1800 + 400)  # past the hour for the first twelve, and a sweep
            left = {r.id for r in await engine_store.list_runs()}
            assert left == {sleeper.id, fresh.id}
            for h in old:
                assert await engine_store.get_history(h.id) == ()
                assert await engine_store.get_steps(h.id) == ()
            # A deleted run's key makes a new run.
            again = await short_lived.enqueue(client, 0, idempotency_key="k0")
            assert again.created and again.id != old[0].id


async def test_purge_runs_by_hand(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    async with aiki.embedded("memory", sources=sources) as client:
        async with aiki.worker(client, workflows=[short_lived]):
            for i in range(3):
                await (await short_lived.enqueue(client, i)).wait_for_completion(timeout=60)
            waiting = await short_lived.enqueue(client, -1)
            with pytest.raises(ValueError, match="timezone-aware"):
                await client.purge_runs(before=datetime.datetime(2100, 1, 1))
            tomorrow = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1000)
            assert await client.purge_runs(before=tomorrow) == 3
            assert [r.id for r in await client.list_runs()] == [waiting.id]
            assert await client.purge_runs(before=tomorrow) == 0
