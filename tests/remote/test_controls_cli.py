"""Run controls from the command line, against a real server and workers: the README's
repair story (``examples/repair.py``: a run fails on a bug, the fix is deployed as version 2,
``aiki runs retry ID --version 2`` finishes it without running its completed step again),
then ``aiki runs pause``, ``resume`` and ``fork``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.remote.processes import REPO, Cluster, eventually
from tests.remote.test_quickstart import aiki_cli

ORDER = '{"id": "o-9", "cents": 1999, "address": "Main St 1"}'


async def cli_error(cluster: Cluster, url: str, *args: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "aiki", *args, "--server", url], cwd=str(REPO),
        capture_stdout=True, capture_stderr=True, check=False, env=cluster.env())
    assert result.returncode == 1, result.stdout.decode()
    return result.stderr.decode().strip()


async def test_the_readme_repair_story_and_the_other_controls(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    buggy = await cluster.spawn("buggy", "worker", "--server", url, "--app",
                                "examples.repair:buggy", "--id", "buggy")

    async def connected(worker_id: str) -> bool:
        return worker_id in await aiki_cli(cluster, url, "workers")

    await eventually(lambda: connected("buggy"), 30, "the worker to connect", buggy, server)
    out = await aiki_cli(cluster, url, "enqueue", "order", "--payload", ORDER)
    run_id = out.split()[2]

    async def shown(text: str) -> bool:
        return text in await aiki_cli(cluster, url, "runs", "show", run_id)

    await eventually(lambda: shown("IndexError: list index out of range"), 30,
                     "the run to fail on its bug", buggy, server)
    buggy.kill()  # the fix is deployed: version 2
    fixed = await cluster.spawn("fixed", "worker", "--server", url, "--app",
                                "examples.repair:fixed", "--id", "fixed")
    await eventually(lambda: connected("fixed"), 30, "the fixed worker to connect", fixed,
                     server)
    out = await aiki_cli(cluster, url, "runs", "retry", run_id, "--version", "2")
    assert out.strip() == f"run {run_id}: queued again on version 2"
    await eventually(lambda: shown("charged 1999 for o-9; label for Main St 1"), 30,
                     "the retried run to finish", fixed, server)
    shown_json = json.loads(await aiki_cli(cluster, url, "runs", "show", run_id,
                                           "--output", "json"))
    assert (shown_json["run"]["state"], shown_json["run"]["version"]) == ("completed", "2")
    charges = [e for e in shown_json["history"]
               if e["event"] == "task.completed" and e["name"] == "charge-card"]
    assert len(charges) == 1  # the card was charged once: replayed on the retry
    assert any(e["detail"] and "re-pinned from version 1 to 2" in e["detail"]
               for e in shown_json["history"])

    # A finished run cannot be paused or resumed; nothing changes.
    assert (await cli_error(cluster, url, "runs", "pause", run_id)).endswith(
        f"run {run_id} is completed: only a queued, running or waiting run can be paused; "
        "nothing changed")
    assert "not paused" in await cli_error(cluster, url, "runs", "resume", run_id)

    # Fork the repaired run after its first step: the card is not charged again.
    out = await aiki_cli(cluster, url, "runs", "fork", run_id, "--from-step", "1")
    fork_id = out.split()[1].rstrip(":")
    assert out.strip() == f"run {fork_id}: forked from run {run_id} at step 1"
    shown_fork = ""

    async def fork_done() -> bool:
        nonlocal shown_fork
        shown_fork = await aiki_cli(cluster, url, "runs", "show", fork_id)
        return "label for Main St 1" in shown_fork

    await eventually(fork_done, 30, "the fork to finish", fixed, server)
    assert f"forked from      run {run_id}, its first 1 step(s) copied" in shown_fork
    assert "from_step must be 0 to 2, got 3" in await cli_error(
        cluster, url, "runs", "fork", run_id, "--from-step", "3")

    # A queued run of a version no worker has: paused, then resumed.
    out = await aiki_cli(cluster, url, "enqueue", "order", "--version", "1", "--payload", ORDER,
                         "--idempotency-key", "pause-me")
    queued_id = out.split()[2]
    out = await aiki_cli(cluster, url, "runs", "pause", queued_id)
    assert out.startswith(f"run {queued_id}: paused")
    assert "paused" in await aiki_cli(cluster, url, "runs", "list", "--state", "paused")
    out = await aiki_cli(cluster, url, "runs", "resume", queued_id)
    assert out.strip() == f"run {queued_id}: resumed (queued)"
