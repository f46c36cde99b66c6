"""Waits from the command line, against a real server and worker: ``aiki runs show`` says
what a run waits for, ``aiki runs send`` decides it, ``aiki runs wakeup`` on a run that is
not sleeping changes nothing; and ``examples/expense.py`` runs as the README says."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from tests.remote.processes import REPO, Cluster, eventually
from tests.remote.test_quickstart import aiki_cli


async def test_send_show_and_wakeup_from_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.expense:workflows", "--id", "approver")

    async def connected() -> bool:
        return "approver" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    out = await aiki_cli(cluster, url, "enqueue", "expense", "--payload",
                         '{"id": "e-9", "employee": "bob", "manager": "ann",'
                         ' "amount_cents": 100}')
    run_id = out.split()[2]

    async def waiting() -> bool:
        return "event 'decision' at step 1, since" in await aiki_cli(
            cluster, url, "runs", "show", run_id)

    await eventually(waiting, 30, "the run to wait for its decision", worker, server)
    out = await aiki_cli(cluster, url, "runs", "wakeup", run_id)
    assert out.strip() == f"run {run_id}: not sleeping; nothing changed"
    out = await aiki_cli(cluster, url, "runs", "send", run_id, "decision", "--payload",
                         '{"approved": true, "by": "ann"}', "--key", "mail-1")
    assert out.strip() == f"run {run_id}: event 'decision' delivered to its wait"

    async def decided() -> bool:
        return "approved by ann" in await aiki_cli(cluster, url, "runs", "show", run_id)

    await eventually(decided, 30, "the run to finish", worker, server)
    failed = await trio.run_process(
        [sys.executable, "-m", "aiki", "runs", "send", run_id, "decision", "--server", url],
        cwd=str(REPO), capture_stdout=True, capture_stderr=True, check=False,
        env=cluster.env(),
    )
    assert failed.returncode == 1
    assert failed.stderr.decode().startswith(f"aiki runs send: error: run {run_id} is "
                                             "completed: it takes no more events")


async def test_the_expense_example_runs() -> None:
    result = await trio.run_process(
        [sys.executable, "examples/expense.py"], cwd=str(REPO), capture_stdout=True,
        capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["e-1: approved by ann", "e-2: escalated"]
    assert "  to finance: expense e-2: no decision in 3 days" in lines


async def test_runs_purge_from_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db", "--retention", "86400")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.quickstart:workflows", "--id", "purger")

    async def connected() -> bool:
        return "purger" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    await aiki_cli(cluster, url, "enqueue", "checkout", "--payload",
                   '{"id": "o-1", "amount_cents": 1}', "--wait")
    out = await aiki_cli(cluster, url, "runs", "purge", "--before", "2000-01-01")
    assert out.startswith("deleted 0 run(s) that finished before 2000-01-01T00:00:00")
    out = await aiki_cli(cluster, url, "runs", "purge", "--before", "2999-01-01T00:00+00:00")
    assert out.strip() == "deleted 1 run(s) that finished before 2999-01-01T00:00:00+00:00"
    assert "no runs" in await aiki_cli(cluster, url, "runs", "list")
    bad = await trio.run_process(
        [sys.executable, "-m", "aiki", "runs", "purge", "--before", "yesterday",
         "--server", url], cwd=str(REPO), capture_stdout=True, capture_stderr=True,
        check=False, env=cluster.env(),
    )
    assert bad.returncode == 2
    assert "'yesterday' is not an ISO 8601 date or time" in bad.stderr.decode()
