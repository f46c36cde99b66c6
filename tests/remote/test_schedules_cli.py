"""Schedules against a real ``aiki server`` and worker: the README's example from the shell
(``aiki schedules create``, ``show`` lists the last runs, ``pause``, ``trigger``,
``backfill``, ``delete``), and the blocking and asyncio clients on the same schedules."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from pathlib import Path

import trio

import aiki
import aiki.asyncio
import aiki.sync
from examples.reports import ReportRequest, report
from tests.remote.processes import REPO, Cluster, eventually
from tests.remote.test_quickstart import aiki_cli


async def test_schedules_from_the_cli_and_every_client(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.reports:workflows", "--id", "reporter")

    async def connected() -> bool:
        return "reporter" in await aiki_cli(cluster, url, "workers")

    await eventually(connected, 30, "the worker to connect", worker, server)
    out = await aiki_cli(cluster, url, "schedules", "create", "sales-report", "report",
                         "--every", "1s", "--payload", '{"kind": "sales"}')
    assert out.startswith("schedule sales-report: created; every 1s, next at ")
    out = await aiki_cli(cluster, url, "schedules", "create", "sales-report", "report",
                         "--every", "1s", "--payload", '{"kind": "sales"}')
    assert "exists with this definition (unchanged)" in out

    async def three_runs() -> bool:
        shown = await aiki_cli(cluster, url, "schedules", "show", "sales-report",
                               "--output", "json")
        return sum(o["run_state"] == "completed" for o in json.loads(shown)["recent"]) >= 3

    await eventually(three_runs, 30, "three scheduled runs to complete", worker, server)
    shown = await aiki_cli(cluster, url, "schedules", "show", "sales-report")
    assert "spec             every 1s" in shown
    assert "next fire times:" in shown
    assert "OCCURRENCE" in shown and "sales-report@" in shown and "completed" in shown
    listed = await aiki_cli(cluster, url, "schedules", "list")
    assert "sales-report" in listed and "every 1s" in listed and "active" in listed

    await aiki_cli(cluster, url, "schedules", "pause", "sales-report")
    assert "paused" in await aiki_cli(cluster, url, "schedules", "list")
    out = await aiki_cli(cluster, url, "schedules", "trigger", "sales-report")
    assert out.startswith("schedule sales-report: started run sales-report@trigger:")
    end = datetime.datetime.now(datetime.UTC).replace(microsecond=0) \
        - datetime.timedelta(seconds=1)
    start = end - datetime.timedelta(seconds=2)
    out = await aiki_cli(cluster, url, "schedules", "backfill", "sales-report", "--start",
                         start.isoformat(), "--end", end.isoformat())
    assert out.startswith("schedule sales-report: ")

    # An occurrence that replaces the previous run (cancelled, with its children).
    out = await aiki_cli(cluster, url, "schedules", "create", "latest-report", "report",
                         "--every", "1h", "--payload", '{"kind": "hr"}', "--overlap",
                         "cancel_previous")
    assert out.startswith("schedule latest-report: created; every 1h, next at ")
    shown = await aiki_cli(cluster, url, "schedules", "show", "latest-report")
    assert "cancel_previous" in shown
    await aiki_cli(cluster, url, "schedules", "delete", "latest-report")

    # Refused from the shell with the field named, nothing stored.
    bad = await trio.run_process(
        [sys.executable, "-m", "aiki", "schedules", "create", "bad", "report", "--cron",
         "0 25 * * *", "--server", url], cwd=str(REPO), capture_stdout=True,
        capture_stderr=True, check=False, env=cluster.env())
    assert bad.returncode == 1
    assert "the hour field '25' is not valid" in bad.stderr.decode()
    assert "bad" not in await aiki_cli(cluster, url, "schedules", "list")

    # The blocking client, in a thread.
    def blocking() -> tuple[str, int, bool]:
        with aiki.sync.connect(url) as client:
            sched = report.schedule(client, ReportRequest("costs"), id="costs",
                                    cron="0 3 * * *", timezone="Europe/Paris")
            described = sched.describe()
            sched.pause()
            summaries = client.list_schedules()
            deleted = sched.delete()
            return described.spec, len(summaries), deleted

    spec, count, deleted = await trio.to_thread.run_sync(blocking)
    assert spec == "cron '0 3 * * *' in Europe/Paris" and count == 2 and deleted

    # The asyncio client, under a plain asyncio loop in a thread.
    async def with_asyncio() -> tuple[bool, str]:
        async with aiki.asyncio.connect(url) as client:
            sched = await report.schedule(client, ReportRequest("hr"), id="hr",
                                          every=datetime.timedelta(hours=1))
            fired = await sched.trigger()
            await sched.delete()
            return sched.created, fired.outcome

    def run_asyncio() -> tuple[bool, str]:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(with_asyncio())
        finally:
            loop.close()

    created, outcome = await trio.to_thread.run_sync(run_asyncio)
    assert created and outcome == "fired"

    out = await aiki_cli(cluster, url, "schedules", "delete", "sales-report")
    assert out.strip() == "schedule sales-report: deleted (its runs stay)"
    assert (await aiki_cli(cluster, url, "schedules", "list")).strip() == "no schedules"
