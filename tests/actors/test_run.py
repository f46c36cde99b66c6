"""The Run actor on its own, its server replaced by a function that answers its writes."""

from __future__ import annotations

from typing import Any

import trio

import aiki
from aiki import protocol as p
from aiki.actors.run import run_workflow
from aiki.records import RunRecord
from aiki.sources import Sources

ran: list[float] = []


@aiki.task(name="charge")
async def charge(x: int) -> int:
    ran.append(trio.current_time())
    return x


@aiki.workflow(name="pay", version="1")
async def pay(run: aiki.WorkflowRun, x: int) -> int:
    return await charge.run(run, x)


def leased_run() -> RunRecord:
    return RunRecord("r1", "pay", "1", "5", "running", None, 1, 1, "w1", 10.0, None, None,
                     None, 0.0, 0.0, None)


async def test_a_start_acknowledged_after_the_lease_may_have_expired_runs_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The start is accepted under the lease, but its reply is held up (a stalled link) for
    # longer than a lease: meanwhile the lease expired and another worker ran the task.
    ran.clear()
    written: list[str] = []

    async def persist(make: Any) -> Any:
        msg = make(1)
        written.append(type(msg).__name__)
        if isinstance(msg, p.StartStep):
            await trio.sleep(25.0)
        return p.Ok(1)

    await run_workflow(pay, p.Assign(leased_run(), ()), persist, Sources.seeded(1),
                       lease_deadline=lambda: 10.0)
    assert ran == []
    assert written == ["StartStep"]  # abandoned: nothing more is written under that lease


async def test_a_start_acknowledged_within_the_lease_runs_the_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    ran.clear()

    async def persist(make: Any) -> Any:
        return p.Ok(1)

    await run_workflow(pay, p.Assign(leased_run(), ()), persist, Sources.seeded(1),
                       lease_deadline=lambda: 10.0)
    assert len(ran) == 1
