"""A report built on a schedule: the README's schedules example.

With ``aiki server`` running and a worker for this app (``aiki worker --app
examples.reports:workflows``), schedule it from the shell::

    aiki schedules create sales-report report --every 1m --payload '{"kind": "sales"}'
    aiki schedules show sales-report

or from Python with ``python examples/reports.py`` (the same schedule, then its last runs).
"""

from __future__ import annotations

import datetime

import attrs
import trio

import aiki


@attrs.frozen
class ReportRequest:
    kind: str


@aiki.task(name="gather-figures")
async def gather_figures(req: ReportRequest) -> int:
    return len(req.kind) * 1000  # ... query the warehouse


@aiki.workflow(name="report", version="1")
async def report(run: aiki.WorkflowRun, req: ReportRequest) -> str:
    total = await gather_figures.run(run, req)
    when = datetime.datetime.fromtimestamp(await run.now(), datetime.UTC)
    return f"{req.kind} report at {when.isoformat(timespec='seconds')}: {total}"


workflows = [report]


async def main() -> None:
    async with aiki.connect("ws://127.0.0.1:9090") as client:
        sched = await report.schedule(client, ReportRequest("sales"), id="sales-report",
                                      every=datetime.timedelta(minutes=1))
        described = await sched.describe()
        print(f"{described.id}: {described.spec}, next at "
              f"{datetime.datetime.fromtimestamp(described.next_fire_times[0]).isoformat()}")
        for occurrence in described.recent:
            print(f"  {occurrence.key}  {occurrence.outcome}  {occurrence.run_id or ''}  "
                  f"{occurrence.run_state or occurrence.detail or ''}")


if __name__ == "__main__":
    trio.run(main)
