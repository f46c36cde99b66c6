"""Day-one traps with real processes on 127.0.0.1 (issue 16): start-up order, a worker id
given twice, and mistakes that must read as one line."""

from __future__ import annotations

import json
import re
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


async def read_line(stream: trio.abc.ReceiveStream | None) -> str:
    assert stream is not None
    line = b""
    with trio.fail_after(60):
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            line += chunk
    return line.decode()


async def aiki_output(*args: str) -> str:
    done = await trio.run_process([sys.executable, "-m", "aiki", *args], cwd=str(REPO),
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return str(done.stdout.decode())


async def test_enqueue_wait_prints_the_id_at_once_then_progress_then_the_result(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker-g", "worker", "--server", url, "--id", "g",
                                 "--app", "tests.remote.app:with_gate")
    gate = tmp_path / "gate"
    async with aiki.connect(url, timeout=5) as client:
        await eventually(lambda: workers_connected(client, "g"), 60, "the worker", worker)
        enqueue = await cluster.spawn(
            "enqueue", "enqueue", "remote-gated", "--payload", json.dumps(str(gate)),
            "--wait", "--server", url, stdout=subprocess.PIPE)
        first = await read_line(enqueue.process.stdout)
        assert first.startswith("enqueued run "), first
        run_id = first.split()[-1]
        # The run is still at its gate: the id came before the wait, not after it.
        assert (await client.handle(run_id).status()).state in ("queued", "running")

        async def shows_the_step() -> bool:
            return f"run {run_id}: running on g; step 0: task 'gate' running" in (
                enqueue.log())

        await eventually(shows_the_step, 60, "progress naming the current step", enqueue)
        gate.touch()
        rest = await read_all(enqueue.process.stdout)
        assert await enqueue.wait(60) == 0, enqueue.log()
        assert rest == '"opened"\n'
        assert "\x1b[" not in enqueue.log(), "no spinner when stderr is not a terminal"

    listed = json.loads(await aiki_output("runs", "list", "--server", url, "--output", "json"))
    assert [(r["id"], r["state"]) for r in listed] == [(run_id, "completed")]
    shown = json.loads(await aiki_output("runs", "show", run_id, "--server", url,
                                         "--output", "json"))
    assert shown["run"]["result"] == '"opened"' and shown["steps"][0]["name"] == "gate"
    assert shown["history"][-1]["event"] == "run.completed"
    workers = json.loads(await aiki_output("workers", "--server", url, "--output", "json"))
    assert [w["id"] for w in workers] == ["g"]
    text = await aiki_output("runs", "show", run_id, "--server", url, "--utc")
    assert re.search(r"created +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text), text
    assert not re.search(r"\b\d{10}\.\d", text), "no raw epochs"
