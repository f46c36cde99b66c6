"""The deploy gate: ``aiki replay`` against a server holding unfinished version 1 runs passes
a compatible version 2 and fails an incompatible one, naming the runs and steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.remote.processes import REPO, Cluster, eventually
from tests.remote.test_quickstart import aiki_cli


async def gate(cluster: Cluster, url: str, app: str) -> tuple[int, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "aiki", "replay", "--server", url, "--app", app],
        cwd=str(REPO), capture_stdout=True, capture_stderr=True, check=False,
        env=cluster.env(),
    )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


async def test_the_replay_gate(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "tests.remote.replay_apps:v1", "--id", "v1")

    async def connected() -> bool:
        return "v1" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    ids = [(await aiki_cli(cluster, url, "enqueue", "gated", "--payload", str(i))).split()[2]
           for i in range(3)]

    async def all_waiting() -> bool:
        listing = await aiki_cli(cluster, url, "runs", "list", "--state", "waiting")
        return all(run_id in listing for run_id in ids)

    await eventually(all_waiting, 30, "the runs to wait for their event", worker, server)
    worker.kill()

    code, out = await gate(cluster, url, "tests.remote.replay_apps:compatible")
    assert code == 0, out
    assert "3 pass, 0 diverge" in out
    assert "as version 2: 2 step(s) replayed; the run waits here" in out

    code, out = await gate(cluster, url, "tests.remote.replay_apps:incompatible")
    assert code == 1, out
    assert "0 pass, 3 diverge" in out
    for run_id in ids:
        assert run_id in out
    assert "at step 0" in out and "task 'add-one'" in out

    exported = json.loads(await aiki_cli(cluster, url, "runs", "export", ids[0]))
    assert exported["format"] == "aiki.run/1" and exported["run"]["id"] == ids[0]
    assert [s["name"] for s in exported["steps"]] == ["add-one", "go"]
