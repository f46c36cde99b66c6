"""``handle.send`` and ``handle.wakeup`` from the asyncio and blocking clients, against a real
server and a worker for examples/expense.py: the operations the lead added to the Trio client
reach the other two as one Call each in the core."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

import aiki
import aiki.asyncio
import aiki.sync
from examples.expense import Claim, Decision, decision, expense
from tests.remote.processes import Cluster, eventually
from tests.remote.test_asyncio_client import asyncio_run


async def expense_server(cluster: Cluster, tmp_path: Path) -> str:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.expense:workflows", "--id", "approver")

    async def connected() -> bool:
        async with aiki.connect(url) as client:
            return "approver" in {w.id for w in await client.list_workers()}

    await eventually(connected, 30, "the worker to connect", worker, server)
    return url


async def test_send_and_wakeup_from_the_blocking_client(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    url = await expense_server(cluster, tmp_path)

    def scenario() -> None:
        with aiki.sync.connect(url) as client:
            handle = expense.enqueue(client, Claim("e-1", "bob", "ann", 4200))
            deadline = time.monotonic() + 30
            while [w.name for w in handle.status().waits] != ["decision"]:
                assert time.monotonic() < deadline, "the run never waited for its decision"
                time.sleep(0.05)
            assert handle.wakeup() is False  # waiting for an event, not sleeping
            assert handle.send(decision, Decision(True, "ann"), idempotency_key="m-1")
            assert handle.wait_for_completion(timeout=30) == "approved by ann"
            with pytest.raises(aiki.RunFinished):
                handle.send(decision, Decision(False, "ann"))
            with pytest.raises(aiki.PayloadError):
                handle.send(decision, "not a decision")  # refused here, nothing sent

    await trio.to_thread.run_sync(scenario)


async def test_send_by_name_from_the_asyncio_client(cluster: Cluster, tmp_path: Path) -> None:
    url = await expense_server(cluster, tmp_path)

    async def scenario() -> None:
        import asyncio

        async with aiki.asyncio.connect(url) as client:
            handle = await client.enqueue("expense", {"id": "e-2", "employee": "cy",
                                                      "manager": "dee", "amount_cents": 1})
            while [w.name for w in (await handle.status()).waits] != ["decision"]:
                await asyncio.sleep(0.05)
            assert await handle.send("decision", {"approved": False, "by": "dee"})
            assert await handle.wait_for_completion(timeout=30) == "rejected by dee"
            with pytest.raises(aiki.RunNotFound):
                await client.handle("no-such-run").send("decision", {})

    await trio.to_thread.run_sync(asyncio_run, scenario())
