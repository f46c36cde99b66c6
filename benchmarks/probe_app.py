"""Workflows the latency, idle and replay benchmarks run.

``aiki worker --app benchmarks.probe_app:workflows`` loads them in a worker process.

- ``probe-latency``: one task that returns ``time.time()`` read as its body starts, so the
  client can compute enqueue → first task start across processes. Both sides read the same
  wall clock (``CLOCK_REALTIME`` of one machine); ``perf_counter`` has no common origin
  between processes.
- ``replay-n`` (in-process only): ``n`` trivial tasks, then on the run's first lease it
  parks (so every task is recorded but the workflow has not returned); a later lease
  replays all ``n`` and returns. ``REPLAY_MARKS`` keeps, per run id, the ``perf_counter``
  at workflow entry and after the last replayed task.
"""

from __future__ import annotations

import time

import trio

import aiki


@aiki.task(name="probe-start")
async def started_at(n: int) -> float:
    return time.time()


@aiki.workflow(name="probe-latency", version="1")
async def probe_latency(run: aiki.WorkflowRun, n: int) -> float:
    return await started_at.run(run, n)


@aiki.task(name="replay-step")
async def replay_step(i: int) -> int:
    return i


REPLAY_PARKED: dict[str, trio.Event] = {}
REPLAY_MARKS: dict[str, tuple[float, float]] = {}


@aiki.workflow(name="replay-n", version="1")
async def replay_n(run: aiki.WorkflowRun, n: int) -> int:
    entered = time.perf_counter()
    total = 0
    for i in range(n):
        total += await replay_step.run(run, i)
    if run.attempt == 1:
        REPLAY_PARKED.setdefault(run.id, trio.Event()).set()
        await trio.sleep_forever()  # parked: the benchmark releases this lease
    REPLAY_MARKS[run.id] = (entered, time.perf_counter())
    return total


workflows = [probe_latency]
