"""Day-one traps with real processes on 127.0.0.1 (issue 16): start-up order, a worker id
given twice, and mistakes that must read as one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import aiki
from tests.remote.processes import REPO, Cluster, eventually, workers_connected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def read_all(stream: trio.abc.ReceiveStream | None) -> str:
    assert stream is not None
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_a_worker_and_an_enqueue_started_before_the_server_go_on_once_it_is_up(
    cluster: Cluster, tmp_path: Path,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    worker = await cluster.worker(url, "early", "--timeout", "120")
    enqueue = await cluster.spawn(
        "enqueue", "enqueue", "remote-sum", "--version", "1", "--payload", "2", "--wait",
        "--server", url, "--timeout", "120", stdout=subprocess.PIPE)

    async def waiting() -> bool:
        return "cannot reach the server" in worker.log() and (
            "cannot reach the server" in enqueue.log())

    await eventually(waiting, 60, "the worker and the enqueue to say they wait", worker,
                     enqueue)
    server, _ = await cluster.server(tmp_path / "aiki.db", port=port)
    output = await read_all(enqueue.process.stdout)
    assert await enqueue.wait(120) == 0, enqueue.log()
    assert output.splitlines()[-1] == "63"
    async with aiki.connect(url, timeout=5) as client:
        assert await workers_connected(client, "early")
    assert worker.log().count("cannot reach the server") == 1, "one line, not one per try"


async def test_a_second_worker_process_with_a_live_id_exits_with_one_line(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    first = await cluster.worker(url, "dup")
    async with aiki.connect(url, timeout=5) as client:
        await eventually(lambda: workers_connected(client, "dup"), 60, "the first worker",
                         first)
        second = await cluster.worker(url, "dup")
        assert await second.wait(60) == 1
        last = second.log().strip().splitlines()[-1]
        assert last.startswith("aiki worker: error: worker id 'dup' is in use by a live "
                               "worker (session "), second.log()
        assert "Traceback" not in second.log()
        assert first.alive
        assert [w.id for w in await client.list_workers()] == ["dup"]


def run_aiki(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiki", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_aiki("server", "--listen", f"127.0.0.1:{port}", "--store", "memory",
                        "--log-level", "warning")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"aiki server: error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already "
        "in use"]


@pytest.mark.parametrize("args,line", [
    (["server", "--store", "oracle://x", "--listen", "127.0.0.1:0"],
     "aiki server: error: unsupported store URL 'oracle://x'"),
    (["server", "--store", "sqlite:////no/such/dir/x.db", "--listen", "127.0.0.1:0"],
     "aiki server: error: cannot open the SQLite store '/no/such/dir/x.db'"),
    (["worker", "--app", "no_such_module:workflows"],
     "aiki worker: cannot import 'no_such_module'"),
])
def test_a_bad_store_url_or_a_missing_app_module_is_one_line(args: list[str],
                                                            line: str) -> None:
    done = run_aiki(*args)
    assert done.returncode != 0
    [only] = done.stderr.splitlines()
    assert only.startswith(line)
