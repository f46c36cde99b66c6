"""Versions of one workflow for the replay gate's test (``aiki replay --app``)."""

from __future__ import annotations

import aiki

go = aiki.event("go", int)


@aiki.task(name="add-one")
async def add_one(x: int) -> int:
    return x + 1


def _make(version: str, offset: int) -> aiki.Workflow[int, int]:
    @aiki.workflow(name="gated", version=version, events=[go])
    async def gated(run: aiki.WorkflowRun, x: int) -> int:
        y = await add_one.run(run, x + offset)  # offset 0 keeps the recorded input
        return y + await go.wait(run)

    return gated


v1 = [_make("1", 0)]
compatible = [_make("2", 0)]  # version 2, the same calls
incompatible = [_make("2", 1000)]  # version 2, another input to the task: replay breaks
