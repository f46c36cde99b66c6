"""The blocking client (``aiki.sync``) against a real ``aiki server`` and worker on 127.0.0.1.

The client code runs in plain threads (``trio.to_thread``), where no Trio or asyncio loop
runs: that is how Django, Flask or a script use it. The Trio side of the test only starts,
kills and restarts processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

import aiki
import aiki.sync
from tests.remote.processes import Cluster, eventually

THREADS = 16
PER_THREAD = 50


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def workers(client: aiki.sync.Client) -> set[str]:
    return {w.id for w in client.list_workers()}


async def test_one_blocking_client_shared_by_16_threads_and_across_a_server_restart(
    cluster: Cluster, tmp_path: Path,
) -> None:
    db = tmp_path / "aiki.db"
    first, url = await cluster.server(db)
    port = int(url.rsplit(":", 1)[1])
    worker = await cluster.worker(url, "a", task_seconds=0.0, concurrency=64)
    opening = aiki.sync.connect(url)
    client: aiki.sync.Client = await in_thread(opening.__enter__)
    try:
        async def connected() -> bool:
            return "a" in await in_thread(workers, client)

        await eventually(connected, 30, "the worker to connect", worker, first)

        # 16 threads x 50 enqueues at once on the one client, then each waits for its runs.
        def thread_enqueues(t: int) -> list[tuple[int, Any]]:
            out = []
            for i in range(PER_THREAD):
                n = t * PER_THREAD + i
                out.append((n, client.enqueue("remote-sum", n, version="1")))
            return [(n, h.wait_for_completion(timeout=120)) for n, h in out] + [
                (-1, h) for _, h in out]

        def burst() -> list[Any]:
            with ThreadPoolExecutor(THREADS) as pool:
                return [r for f in [pool.submit(thread_enqueues, t) for t in range(THREADS)]
                        for r in f.result()]

        outcome = await in_thread(burst)
        results = {n: value for n, value in outcome if n >= 0}
        handles = [h for n, h in outcome if n < 0]
        assert results == {n: 30 * n + 3 for n in range(THREADS * PER_THREAD)}
        assert len({h.id for h in handles}) == THREADS * PER_THREAD
        assert all(h.created for h in handles)
        runs = await in_thread(lambda: client.list_runs(limit=1000))
        assert len(runs) == THREADS * PER_THREAD and {r.state for r in runs} == {"completed"}

        # Now the server is killed and restarted while 16 threads enqueue and wait.
        done = Counter[str]()
        lock = threading.Lock()

        def enqueue_and_wait(t: int) -> list[int]:
            values = []
            for i in range(10):
                n = 10_000 + t * 10 + i
                values.append(client.enqueue("remote-sum", n, version="1")
                              .wait_for_completion(timeout=120) - 30 * n - 3)
                with lock:
                    done["runs"] += 1
            return values

        def second_burst() -> list[int]:
            with ThreadPoolExecutor(THREADS) as pool:
                return [v for f in [pool.submit(enqueue_and_wait, t) for t in range(THREADS)]
                        for v in f.result()]

        async with trio.open_nursery() as nursery:
            finished: list[list[int]] = []

            async def run_burst() -> None:
                finished.append(await in_thread(second_burst))

            nursery.start_soon(run_burst)

            async def some_done() -> bool:
                return done["runs"] >= 10

            await eventually(some_done, 60, "the second burst to get going", worker, first)
            first.kill()
            await first.wait(10)
            second, again = await cluster.server(db, port=port)
            assert again == url
        assert finished == [[0] * (THREADS * 10)]
        assert client.connections >= 2, "the same client reconnected"
        runs = await in_thread(lambda: client.list_runs(limit=1000))
        total = THREADS * PER_THREAD + THREADS * 10
        assert len(runs) == total  # none lost, none made twice by a request sent again
        assert Counter(r.state for r in runs) == Counter({"completed": total})
        ids = [r.id for r in runs]
        assert len(set(ids)) == len(ids)
    finally:
        await in_thread(opening.__exit__, None, None, None)
    assert worker.alive and second.alive


async def test_blocking_client_errors_token_and_timeouts(
    cluster: Cluster, tmp_path: Path,
) -> None:
    token_file = tmp_path / "token.txt"
    token_file.write_text("s3cret\n")
    server, url = await cluster.server(tmp_path / "aiki.db", "--token-file", str(token_file))
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "tests.remote.app:workflows", "--id", "tok",
                                 "--token-file", str(token_file),
                                 env=cluster.env(AIKI_TEST_WORKER="tok"))

    def scenario() -> None:
        with pytest.raises(aiki.AuthenticationFailed, match="HTTP 401"):
            with aiki.sync.connect(url, token="wrong"):
                pass  # pragma: no cover
        with pytest.raises(aiki.AuthenticationFailed, match="no token"):
            with aiki.sync.connect(url):
                pass  # pragma: no cover
        with aiki.sync.connect(url, token="s3cret", request_timeout=5) as client:
            with pytest.raises(aiki.RunNotFound):
                client.handle("no-such-run").status()
            with pytest.raises(aiki.UnknownWorkflow):
                client.enqueue("nobody-registered-this", 1)
            with pytest.raises(ValueError, match="unknown run state"):
                client.list_runs(state="x")
            with pytest.raises(aiki.PayloadError):
                client.enqueue("remote-sum", object(), version="1")
            parked = client.enqueue("remote-sum", 1, version="2")  # nobody runs version 2
            with pytest.raises(TimeoutError, match=f"run {parked.id} did not finish within 0.3"):
                parked.wait_for_completion(timeout=0.3)
            assert parked.status().state == "queued"
            parked.pause()
            assert parked.status().state == "paused"
            with pytest.raises(aiki.RunNotPausable, match="is paused"):
                parked.pause()
            parked.resume()
            with pytest.raises(aiki.RunNotPaused, match="is queued, not paused"):
                parked.resume()
            assert parked.status().state == "queued"
            handle = client.enqueue("remote-sum", 4, version="1", idempotency_key="k")
            assert handle.wait_for_completion(timeout=60) == 123
            again = client.enqueue("remote-sum", 4, version="1", idempotency_key="k")
            assert (again.id, again.created) == (handle.id, False)
            events = [e.event for e in client.handle(handle.id).history()]
            assert events[0] == "run.queued" and events[-1] == "run.completed"
            status = handle.status()
            assert [t.state for t in status.tasks] == ["completed"] * 3
            # A fork of the whole history replays it: the same result, no task run.
            fork = client.fork(handle.id, from_step=3)
            assert fork.wait_for_completion(timeout=60) == 123
            assert (fork.status().forked_from, fork.status().forked_steps) == (handle.id, 3)
            with pytest.raises(aiki.InvalidFork, match="from_step must be 0 to 3, got 4"):
                client.fork(handle.id, from_step=4)
            # Retention by hand: finished runs go, the queued one stays.
            assert client.purge_runs(before=time.time() + 60) == 2
            with pytest.raises(aiki.RunNotFound):
                handle.status()
            assert [r.id for r in client.list_runs()] == [parked.id]
        # A server that stops answering (SIGSTOP: the connection stays up): the request
        # times out; once it answers again, the same client goes on.
        with aiki.sync.connect(url, token="s3cret", request_timeout=0.5) as client:
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError, match="no reply from the server within 0.5 s"):
                    client.list_workers()
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert "tok" in workers(client)

    async def connected() -> bool:
        def check() -> bool:
            with aiki.sync.connect(url, token="s3cret") as client:
                return "tok" in workers(client)
        return bool(await in_thread(check))

    await eventually(connected, 30, "the worker to connect", worker, server)
    await in_thread(scenario)


def test_nothing_listening_is_connection_lost_at_once() -> None:
    with pytest.raises(aiki.ConnectionLost, match="cannot connect to ws://127.0.0.1:9"):
        with aiki.sync.connect("ws://127.0.0.1:9"):
            pass  # pragma: no cover
    with pytest.raises(aiki.ConfigError, match="must start with ws:// or wss://"):
        aiki.sync.connect("http://127.0.0.1:9")
