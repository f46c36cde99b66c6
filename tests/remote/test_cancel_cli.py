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


async def test_the_parcels_example_runs() -> None:
    import sys

    from tests.remote.processes import REPO

    result = await trio.run_process(
        [sys.executable, "examples/parcels.py"], cwd=str(REPO), capture_stdout=True,
        capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "o-1: ['tracking-book', 'tracking-lamp']"
    assert lines[2].endswith("was cancelled: customer changed their mind")
    assert sorted(lines[3].removeprefix("o-2 children: ").split(", ")) == [
        "ship cancelled", "ship completed"]
    assert lines[-1] == "  refunded o-2: 9900 cents"
    assert "  picked up bulky-sofa" not in lines


async def test_runs_show_prints_the_tree_of_children(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.parcels:workflows", "--id", "shipper")

    async def connected() -> bool:
        return "shipper" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    out = await aiki_cli(cluster, url, "enqueue", "order", "--payload",
                         '{"id": "o-7", "amount_cents": 5, "parcels": ["a", "b"]}', "--wait")
    run_id = out.split()[2]
    shown = await aiki_cli(cluster, url, "runs", "show", run_id)
    assert "children:" in shown
    after = shown.split("children:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    tree = [line for line in after if line.startswith(f"  {run_id}/")]
    assert len(tree) == 2 and all(line.rstrip().endswith("completed") for line in tree)
    child_id = tree[0].split()[0]
    child = await aiki_cli(cluster, url, "runs", "show", child_id)
    assert "parent" in child and run_id in child
