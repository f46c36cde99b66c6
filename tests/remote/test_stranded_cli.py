"""Stranded runs from the command line: a run of a version no worker has is listed by
``aiki runs list --stranded`` and ``aiki workers``, the server warns once, ``aiki worker``
warns at start that its app lacks that version, and ``aiki runs retry`` re-pins a failed run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.remote.processes import REPO, Cluster, eventually
from tests.remote.test_quickstart import aiki_cli


async def test_stranded_runs_from_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db", "--stranded-after", "1s")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "tests.remote.replay_apps:compatible", "--id", "v2")

    async def connected() -> bool:
        return "v2" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    out = await aiki_cli(cluster, url, "enqueue", "gated", "--version", "1", "--payload", "5")
    run_id = out.split()[2]

    async def listed() -> bool:
        return run_id in await aiki_cli(cluster, url, "runs", "list", "--stranded")

    await eventually(listed, 30, "the run to be listed as stranded", worker, server)
    [stranded] = json.loads(await aiki_cli(cluster, url, "runs", "list", "--stranded",
                                           "--output", "json"))
    assert (stranded["id"], stranded["version"], stranded["state"]) == (run_id, "1", "queued")
    shown = await trio.run_process(
        [sys.executable, "-m", "aiki", "workers", "--server", url], cwd=str(REPO),
        capture_stdout=True, capture_stderr=True, check=True, env=cluster.env())
    assert "v2" in shown.stdout.decode()
    assert "stranded: 1 run(s) of gated@1, queued since" in shown.stderr.decode()

    async def server_warned() -> bool:
        return "version 1 have waited" in server.log()

    await eventually(server_warned, 30, "the server's warning", worker, server)
    assert server.log().count("have waited") == 1  # once per version
    # A second worker of this app, at start, says what it lacks.
    second = await cluster.spawn("worker2", "worker", "--server", url, "--app",
                                 "tests.remote.replay_apps:compatible", "--id", "v2b")

    async def worker_warned() -> bool:
        return "1 unfinished run(s) of gated version 1" in second.log()

    await eventually(worker_warned, 30, "the new worker's warning", second, server)
    refused = await trio.run_process(
        [sys.executable, "-m", "aiki", "runs", "retry", run_id, "--version", "2",
         "--server", url], cwd=str(REPO), capture_stdout=True, capture_stderr=True,
        check=False, env=cluster.env(),
    )
    assert refused.returncode == 1
    assert "only a failed run can be retried" in refused.stderr.decode()
