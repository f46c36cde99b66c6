"""The README's three-terminal quick start, as written (on a free port): a server, a worker
for ``examples.quickstart:workflows``, and the client commands and example."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from tests.remote.processes import REPO, Cluster, eventually


async def aiki_cli(cluster: Cluster, url: str, *args: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "aiki", *args], cwd=str(REPO), capture_stdout=True,
        capture_stderr=True, env=cluster.env(AIKI_SERVER=url), check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_the_readme_quick_start(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.quickstart:workflows", "--id", "quickstart")

    async def connected() -> bool:
        return "quickstart" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    out = await aiki_cli(cluster, url, "enqueue", "checkout", "--payload",
                         '{"id": "o-1", "amount_cents": 1999}', "--wait")
    first, result = out.splitlines()
    assert first.startswith("enqueued run ")
    assert result == '"emailed receipt for o-1"'
    run_id = first.split()[-1]

    listing = await aiki_cli(cluster, url, "runs", "list")
    header, row = listing.splitlines()
    assert header.split() == ["ID", "WORKFLOW", "VERSION", "STATE", "ATTEMPTS", "WORKER",
                              "CREATED", "UPDATED"]
    assert row.split()[:5] == [run_id, "checkout", "1", "completed", "1"]

    shown = await aiki_cli(cluster, url, "runs", "show", run_id)
    assert f"run              {run_id}" in shown
    assert 'result           "emailed receipt for o-1"' in shown
    assert "charge-card  completed  2" in shown  # the first attempt failed and was retried
    assert "task.retrying" in shown and "run.completed" in shown

    workers = (await aiki_cli(cluster, url, "workers")).splitlines()
    assert workers[0].split()[:3] == ["ID", "WORKFLOWS", "SLOTS"]
    assert workers[1].split()[:4] == ["quickstart", "checkout@1", "8", "0"]

    example = await trio.run_process(
        [sys.executable, "examples/remote_client.py", url], cwd=str(REPO),
        capture_stdout=True, capture_stderr=True, env=cluster.env(), check=False,
    )
    assert example.returncode == 0, example.stderr.decode()
    lines = example.stdout.decode().splitlines()
    assert lines[0] == "emailed receipt for o-43"
    assert lines[-1] == "quickstart: 0 of 8 slots in use"

    failed = await trio.run_process(
        [sys.executable, "-m", "aiki", "runs", "show", "no-such-run", "--server", url],
        cwd=str(REPO), capture_stdout=True, capture_stderr=True, check=False,
        env=cluster.env(),
    )
    assert failed.returncode == 1
    assert failed.stderr.decode().strip() == (
        "aiki runs show: error: no run with id 'no-such-run'")
