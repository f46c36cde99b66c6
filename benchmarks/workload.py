"""The benchmark workload: a workflow of 3 trivial tasks, each returning its input + 1.

Importable by ``aiki worker --app benchmarks.workload:workflows`` (the loopback rows start
real worker processes), and used in-process by the embedded rows. ``three(x)`` returns
``x + 3``; the benchmark checks every result.
"""

from __future__ import annotations

import aiki

TASKS_PER_RUN = 3


@aiki.task(name="bench-inc")
async def inc(x: int) -> int:
    return x + 1


@aiki.workflow(name="bench-three", version="1")
async def three(run: aiki.WorkflowRun, x: int) -> int:
    for _ in range(TASKS_PER_RUN):
        x = await inc.run(run, x)
    return x


workflows = [three]
