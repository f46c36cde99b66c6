"""Stranded runs: queued for a version no connected worker has registered. The server says
so (once per version), lists them, and a client waiting on one is told."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import trio

import aiki
from aiki.sdk.client import StrandedWatch
from aiki.store import Store


@aiki.workflow(name="orphan", version="1")
async def orphan_v1(run: aiki.WorkflowRun, x: int) -> int:
    return x


@aiki.workflow(name="orphan", version="2")
async def orphan_v2(run: aiki.WorkflowRun, x: int) -> int:
    return x * 10


async def test_stranded_runs_are_listed_logged_and_waiters_are_told(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[orphan_v1]):
            handles = [await orphan_v2.enqueue(client, i) for i in range(3)]
            served = await orphan_v1.enqueue(client, 7)
            assert await served.wait_for_completion(timeout=10) == 7
            assert await client.list_runs(stranded=True) == []  # not for a minute yet
            with pytest.raises(TimeoutError):
                await handles[0].wait_for_completion(timeout=200)
            stranded = await client.list_runs(stranded=True)
            assert sorted(r.id for r in stranded) == sorted(h.id for h in handles)
            [version] = await client.stranded_versions()
            assert (version.workflow, version.version, version.runs) == ("orphan", "2", 3)
        server_lines = [r.getMessage() for r in caplog.records if r.name == "aiki.dispatcher"]
        assert len([m for m in server_lines if "stranded" in m]) == 1  # once per version
        assert "workflow 'orphan' version 2" in server_lines[0]
        told = [r.getMessage() for r in caplog.records if r.name == "aiki.client"]
        assert told and handles[0].id in told[0] and "version 2" in told[0]
        # A worker with the version: they run, and nothing is stranded any more.
        async with aiki.worker(client, workflows=[orphan_v2]):
            assert [await h.wait_for_completion(timeout=10) for h in handles] == [0, 10, 20]
            assert await client.list_runs(stranded=True) == []


# -- the client's one watch over all its waits ------------------------------------------------
class _ListsStranded:
    """Stands in for a client: ``list_runs(stranded=True)`` answers from ``stranded``, and
    says when it was asked."""

    def __init__(self) -> None:
        self.stranded: list[aiki.RunSummary] = []
        self.asked: list[float] = []

    async def list_runs(self, *, stranded: bool, limit: int) -> list[aiki.RunSummary]:
        assert stranded
        self.asked.append(trio.current_time())
        return list(self.stranded)


def _summary(run_id: str) -> Any:
    return SimpleNamespace(id=run_id, workflow="orphan", version="2")


async def test_one_watch_looks_at_all_waits_after_1_2_4_minutes_and_tells_each_once(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    watch = StrandedWatch()
    client = _ListsStranded()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.serve, client)
        start = trio.current_time()
        watch.add("a")
        watch.add("a")  # two handles wait on it: one look serves both
        await trio.sleep(60 + 120 + 240 + 1)
        assert [round(t - start) for t in client.asked] == [60, 180, 420]
        client.stranded = [_summary("a")]
        await trio.sleep(480)
        assert [r.getMessage() for r in caplog.records].count(
            "run a is still queued and no connected worker has registered workflow 'orphan' "
            "version 2: start a worker that has it (the run waits in the queue until one "
            "does)") == 1
        asked = len(client.asked)
        await trio.sleep(7200)
        assert len(client.asked) == asked, "told once: no more looks for it"
        # A new wait, while the watch has nothing left to look at, gets its look a minute on.
        added = trio.current_time()
        client.stranded = [_summary("b")]
        watch.add("b")
        await trio.sleep(61)
        assert round(client.asked[-1] - added) == 60
        assert any("run b is still queued" in r.getMessage() for r in caplog.records)
        # Waits that ended are not looked at.
        for run_id in ("a", "a", "b"):
            watch.discard(run_id)
        asked = len(client.asked)
        await trio.sleep(7200)
        assert len(client.asked) == asked
        nursery.cancel_scope.cancel()
