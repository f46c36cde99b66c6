"""Stranded runs: queued for a version no connected worker has registered. The server says
so (once per version), lists them, and a client waiting on one is told."""

from __future__ import annotations

import logging

import pytest
import trio

import aiki
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
