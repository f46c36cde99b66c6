"""Cancellation against a real server and worker: ``aiki runs cancel`` from the command line,
and the blocking client's ``handle.cancel``."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.remote.processes import Cluster, eventually
from tests.remote.test_quickstart import aiki_cli

EXPENSE = '{"id": "e-9", "employee": "bob", "manager": "ann", "amount_cents": 100}'


async def test_cancel_from_the_cli_ends_a_waiting_run_cancelled(
        cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.expense:workflows", "--id", "canceller")

    async def connected() -> bool:
        return "canceller" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    run_id = (await aiki_cli(cluster, url, "enqueue", "expense", "--payload",
                             EXPENSE)).split()[2]

    async def waiting() -> bool:
        return "event 'decision'" in await aiki_cli(cluster, url, "runs", "show", run_id)

    await eventually(waiting, 30, "the run to wait for its decision", worker, server)
    out = await aiki_cli(cluster, url, "runs", "cancel", run_id, "--reason", "withdrawn")
    assert out.strip() == f"run {run_id}: cancelled"

    async def cancelled() -> bool:
        return "RunCancelled: withdrawn" in await aiki_cli(cluster, url, "runs", "show",
                                                           run_id)

    await eventually(cancelled, 30, "the run to end cancelled", worker, server)
    shown = await aiki_cli(cluster, url, "runs", "show", run_id)
    assert "cancel.requested" in shown and "run.cancelled" in shown
    out = await aiki_cli(cluster, url, "runs", "cancel", run_id)
    assert out.strip() == f"run {run_id}: already finished; nothing changed"


async def test_the_blocking_client_cancels_and_waits(cluster: Cluster, tmp_path: Path) -> None:
    import aiki.sync

    server, url = await cluster.server(tmp_path / "aiki.db")

    def blocking() -> None:
        with aiki.sync.connect(url) as client:
            handle = client.enqueue("expense", {"id": "e-1"}, version="1")
            with pytest.raises(ValueError, match="grace must be a finite number"):
                handle.cancel(grace=-1)
            assert handle.cancel("no worker came") is True
            with pytest.raises(aiki.WorkflowCancelled, match="no worker came"):
                handle.wait_for_completion(timeout=10)
            assert handle.cancel() is False

    await trio.to_thread.run_sync(blocking)
    del server
