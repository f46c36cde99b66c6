"""Real processes on 127.0.0.1: a worker killed with SIGKILL mid-run, the server killed with
SIGKILL and restarted on the same SQLite file. Leases are 2 s, so each test takes seconds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import trio

import aiki
from tests.remote.processes import SIGKILL, Cluster, eventually, workers_connected


async def test_a_worker_killed_mid_run_loses_nothing_and_finished_tasks_ran_once(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    a = await cluster.worker(url, "a", task_seconds=0.2)
    b = await cluster.worker(url, "b", task_seconds=0.2)
    async with aiki.connect(url) as client:
        await eventually(lambda: workers_connected(client, "a", "b"), 30,
                         "both workers to connect", a, b, server)
        handles = [await client.enqueue("remote-sum", n, version="1") for n in range(50)]

        async def a_is_busy_and_some_finished() -> bool:
            busy = [w for w in await client.list_workers() if w.id == "a" and w.in_use > 0]
            done = await client.list_runs(state="completed", limit=1000)
            return bool(busy) and len(done) >= 5

        await eventually(a_is_busy_and_some_finished, 30, "worker a to be mid-run", a, b)
        a.kill()  # SIGKILL: no goodbye, no release; its leases must expire
        assert await a.wait(10) == -SIGKILL

        with trio.fail_after(60):
            results = [await h.wait_for_completion(timeout=60) for h in handles]
        assert results == [30 * n + 3 for n in range(50)]

        starts = cluster.starts()
        finished_by_a: set[str] = set()
        resumed = 0
        for n, handle in enumerate(handles):
            history = await handle.history()
            for event in history:
                if event.event == "task.completed" and event.worker_id == "a":
                    step = int((event.position or "0").split(".")[0])
                    finished_by_a.add(f"{n}.{step}")
            owners = [e.worker_id for e in history if e.event == "run.running"]
            if owners[:1] == ["a"] and "b" in owners:
                resumed += 1
        assert finished_by_a, "worker a finished some tasks before it was killed"
        assert resumed >= 1, "some runs were in flight on a and resumed on b"
        ran_twice = {key: starts[key] for key in finished_by_a if starts[key] != 1}
        assert not ran_twice, f"checkpointed tasks ran again after the kill: {ran_twice}"
        assert set(starts) == {f"{n}.{s}" for n in range(50) for s in range(3)}
    assert b.alive and server.alive


async def test_the_server_killed_and_restarted_on_its_file_loses_no_run(
    cluster: Cluster, tmp_path: Path,
) -> None:
    db = tmp_path / "aiki.db"
    first, url = await cluster.server(db)
    port = int(url.rsplit(":", 1)[1])
    a = await cluster.worker(url, "a", task_seconds=0.15, concurrency=4)
    b = await cluster.worker(url, "b", task_seconds=0.15, concurrency=4)
    async with aiki.connect(url) as client:
        await eventually(lambda: workers_connected(client, "a", "b"), 30,
                         "both workers to connect", a, b, first)
        handles = [await client.enqueue("remote-sum", n, version="1") for n in range(20)]

        async def some_finished_some_running() -> bool:
            done = await client.list_runs(state="completed", limit=1000)
            running = await client.list_runs(state="running", limit=1000)
            return len(done) >= 3 and len(running) >= 1

        await eventually(some_finished_some_running, 30, "runs in flight", a, b, first)
        first.kill()
        await first.wait(10)

        second, again = await cluster.server(db, port=port)
        assert again == url
        # Nobody is restarted but the server: the workers and this client reconnect.
        await eventually(lambda: workers_connected(client, "a", "b"), 30,
                         "the workers to reconnect by themselves", a, b, second)
        with trio.fail_after(60):
            results = [await h.wait_for_completion(timeout=60) for h in handles]
        assert results == [30 * n + 3 for n in range(20)]
        runs = await client.list_runs(limit=1000)
        assert sorted(r.id for r in runs) == sorted(h.id for h in handles), "none lost"
        assert Counter(r.state for r in runs) == Counter({"completed": 20})
        assert client.link.connections >= 2
    assert "lost the connection" in a.log() and "lost the connection" in b.log()
    assert a.alive and b.alive
