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
    assert "  refunded o-2: 9900 cents" in lines
    assert "  picked up bulky-sofa" not in lines
    assert lines[4] == "o-3: ['late: shipping took more than 3 days']"
    assert lines[5] == "o-3 children: ship cancelled, ship completed"
    assert "  picked up lost-parcel" not in lines


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


async def test_a_three_level_tree_cancelled_mid_flight_on_two_workers(
        cluster: Cluster, tmp_path: Path) -> None:
    """The issue's "done when": a tree of seven runs (a root, two children, four leaves whose
    tasks are running) spread over two worker processes is cancelled; every run ends
    cancelled, and no task starts after the cancel."""
    import aiki
    from tests.remote.processes import workers_connected

    server, url = await cluster.server(tmp_path / "aiki.db")
    workers = [await cluster.worker(url, name, "--app", "tests.remote.app:with_tree",
                                    task_seconds=600.0, concurrency=2) for name in "ab"]
    async with aiki.connect(url) as client:
        await eventually(lambda: workers_connected(client, "a", "b"), 30,
                         "both workers to connect", server, *workers)
        handle = await client.enqueue("remote-tree", 2, version="1")

        async def leaves_running() -> bool:
            return sum(e == "start" for _, e, _ in cluster.executions()) >= 4

        await eventually(leaves_running, 60, "the four leaves' tasks to start", server,
                         *workers)
        assert await handle.cancel("abandoned") is True
        started = cluster.executions()
        with pytest.raises(aiki.WorkflowCancelled, match="abandoned"):
            await handle.wait_for_completion(timeout=60)
        runs, todo = [], [handle.id]
        while todo:
            status = await client.handle(todo.pop()).status()
            runs.append(status)
            todo += [c.id for c in status.children]
        await trio.sleep(1.0)  # a task started late would show in the log by now
        after = cluster.executions()
    assert len(runs) == 7
    assert [r.state for r in runs] == ["cancelled"] * 7
    assert {w for w, e, _ in started if e == "start"} == {"a", "b"}  # mid-flight on both
    assert after == started  # no task started after the cancel, none ran to its end
    assert all(worker.alive for worker in workers)
