"""The asyncio client (``aiki.asyncio``) against a real ``aiki server`` and worker on
127.0.0.1, under ``asyncio.run`` and under uvloop.

Each scenario is a plain asyncio program run in a thread of its own (``trio.to_thread``), so
no Trio loop runs where the client does; the Trio side only starts and restarts processes.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trio

import aiki
import aiki.asyncio
from tests.remote.app import remote_sum
from tests.remote.processes import Cluster

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def asyncio_run(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(main)`` on the standard event loop. Named explicitly: once trio-asyncio
    is imported into a process (the PostgreSQL store's and the asyncio-task tests import it
    into this one), its event loop policy makes a bare ``asyncio.run`` run a trio-asyncio
    loop. examples/fastapi_app.py runs under a bare ``asyncio.run`` in a process of its
    own (tests/remote/test_client_examples.py)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main)


def uvloop_run(main: Coroutine[Any, Any, Any]) -> Any:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        return uvloop_run
    return asyncio_run


def no_trio_here() -> None:
    """The client runs on the loop it was given, with no Trio loop in this thread."""
    import trio.lowlevel

    assert "trio_asyncio" not in type(asyncio.get_running_loop()).__module__
    with pytest.raises(RuntimeError):
        trio.lowlevel.current_root_task()


async def test_the_asyncio_client_does_everything_and_survives_a_server_restart(
    cluster: Cluster, tmp_path: Path, run_loop: Runner,
) -> None:
    db = tmp_path / "aiki.db"
    first, url = await cluster.server(db)
    port = int(url.rsplit(":", 1)[1])
    worker = await cluster.worker(url, "a", task_seconds=0.0, concurrency=16)
    restarted = threading.Event()
    go_on = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def main() -> dict[str, Any]:
        no_trio_here()
        out: dict[str, Any] = {}
        async with aiki.asyncio.connect(url) as client:
            while "a" not in {w.id for w in await client.list_workers()}:
                await asyncio.sleep(0.05)
            typed = await remote_sum.enqueue(client, 2)  # typed through the definition
            out["typed"] = await typed.wait_for_completion(timeout=60)
            by_name = await client.enqueue("remote-sum", 3, version="1", idempotency_key="k")
            again = await client.enqueue("remote-sum", 3, version="1", idempotency_key="k")
            out["idempotent"] = (again.id == by_name.id, by_name.created, again.created)
            out["by_name"] = await client.handle(by_name.id).wait_for_completion(timeout=60)
            out["status"] = (await by_name.status()).state
            out["history"] = [e.event for e in await by_name.history()][-1]
            out["listed"] = len(await client.list_runs(workflow="remote-sum", limit=10))
            # 100 concurrent enqueue-and-wait from one client on one event loop.
            handles = await asyncio.gather(*(remote_sum.enqueue(client, n)
                                             for n in range(100)))
            out["many"] = await asyncio.gather(*(h.wait_for_completion(timeout=60)
                                                 for h in handles))
            with pytest.raises(aiki.RunNotFound):
                await client.handle("nope").status()
            parked = await client.enqueue("remote-sum", 1, version="9")
            with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
                await parked.wait_for_completion(timeout=0.2)
            dropped = await client.enqueue("remote-sum", 2, version="9")
            out["cancel"] = (await dropped.cancel("not needed"), await dropped.cancel())
            with pytest.raises(aiki.WorkflowCancelled, match="not needed"):
                await dropped.wait_for_completion(timeout=5)
            # Restart the server under the client; requests meanwhile wait and go on.
            trio.from_thread.run_sync(go_on.set, trio_token=token)
            during = asyncio.ensure_future(remote_sum.enqueue(client, 7))
            await asyncio.get_running_loop().run_in_executor(None, restarted.wait, 60)
            out["during"] = await (await during).wait_for_completion(timeout=60)
            out["after"] = await (await remote_sum.enqueue(client, 8)).wait_for_completion(
                timeout=60)
            out["connections"] = client.connections
            # Retention by hand: every finished run goes, the parked one stays.
            out["purged"] = await client.purge_runs(
                before=datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1))
            out["left"] = [r.id for r in await client.list_runs()] == [parked.id]
        return out

    async with trio.open_nursery() as nursery:
        outcome: list[dict[str, Any]] = []

        async def client_thread() -> None:
            outcome.append(await trio.to_thread.run_sync(run_loop, main()))

        nursery.start_soon(client_thread)
        await go_on.wait()
        first.kill()
        await first.wait(10)
        second, again = await cluster.server(db, port=port)
        assert again == url
        restarted.set()
    out = outcome[0]
    assert out["typed"] == 63 and out["by_name"] == 93
    assert out["idempotent"] == (True, True, False)
    assert (out["status"], out["history"], out["listed"]) == ("completed", "run.completed", 2)
    assert out["many"] == [30 * n + 3 for n in range(100)]
    assert (out["during"], out["after"]) == (213, 243)
    assert out["connections"] >= 2
    assert out["cancel"] == (True, False)
    assert out["purged"] == 105 and out["left"]
    assert worker.alive and second.alive


async def test_the_asyncio_client_token_and_refusals(cluster: Cluster, tmp_path: Path,
                                                     run_loop: Runner) -> None:
    token_file = tmp_path / "token.txt"
    token_file.write_text("s3cret\n")
    server, url = await cluster.server(tmp_path / "aiki.db", "--token-file", str(token_file))

    async def main() -> None:
        with pytest.raises(aiki.AuthenticationFailed, match="wrong token"):
            async with aiki.asyncio.connect(url, token="nope"):
                pass  # pragma: no cover
        async with aiki.asyncio.connect(url, token="s3cret") as client:
            with pytest.raises(aiki.UnknownWorkflow):
                await client.enqueue("nobody-registered-this")
            with pytest.raises(TypeError):
                remote_sum.enqueue(client, object())  # type: ignore[arg-type]
            assert await client.list_workers() == []
            parked = await client.enqueue("remote-sum", 2, version="1")  # no worker: queued
            await parked.pause()
            assert (await parked.status()).state == "paused"
            with pytest.raises(aiki.RunNotPausable):
                await parked.pause()
            await parked.resume()
            with pytest.raises(aiki.RunNotPaused):
                await parked.resume()
            fork = await client.fork(parked.id, from_step=0)
            assert (await fork.status()).forked_from == parked.id
            with pytest.raises(aiki.InvalidFork, match="has 0 step"):
                await client.fork(parked.id, from_step=1)
        async with aiki.asyncio.connect(url, token="s3cret", request_timeout=0.5) as client:
            os.kill(server.process.pid, signal.SIGSTOP)  # up, but it stops answering
            try:
                with pytest.raises(TimeoutError, match="no reply from the server within 0.5"):
                    await client.list_runs()
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert len(await client.list_runs()) == 2  # the parked run and its fork
        with pytest.raises(aiki.ConnectionLost, match="cannot connect"):
            async with aiki.asyncio.connect("ws://127.0.0.1:9"):
                pass  # pragma: no cover

    await trio.to_thread.run_sync(run_loop, main())
    assert server.alive


def test_importing_aiki_and_its_clients_starts_nothing() -> None:
    """``import aiki``, ``aiki.sync`` and ``aiki.asyncio`` load no trio-asyncio, start no
    thread and no loop (a process that never runs Trio can use them)."""
    code = (
        "import sys, threading\n"
        "import aiki, aiki.sync, aiki.asyncio\n"
        "assert 'trio_asyncio' not in sys.modules, 'trio_asyncio imported'\n"
        "assert 'asyncpg' not in sys.modules, 'asyncpg imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "import trio.lowlevel\n"
        "try:\n"
        "    trio.lowlevel.current_root_task()\n"
        "except RuntimeError:\n"
        "    print('ok')\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
