"""The cost of a task body's style: Trio ``async def``, a plain ``def`` (a worker thread) and
an asyncio coroutine (``loop="asyncio"``, through trio-asyncio).

Embedded engine on the memory store (so the store costs next to nothing and the style's own
cost shows), one worker, runs one at a time, each a workflow of 20 trivial tasks of one
style. Per repetition each style gets its own ``trio.run`` (order rotated between
repetitions) with 2 warm-up runs. Metric: microseconds per task (elapsed / tasks); the ratio
is each style's median over the Trio style's, from the same run.

``python -m benchmarks task_styles [--quick] [--reps N]``.
"""

from __future__ import annotations

import statistics
import time

import trio

import aiki
from aiki.store import MemoryStore
from benchmarks.suite import Options, Row, Suite

STYLES = ("trio", "thread", "asyncio")
TASKS = 20


@aiki.task(name="bench-trio")
async def trio_step(n: int) -> int:
    return n + 1


@aiki.task(name="bench-thread")
def thread_step(n: int) -> int:
    return n + 1


@aiki.task(name="bench-asyncio", loop="asyncio")
async def asyncio_step(n: int) -> int:
    return n + 1


def _workflow(style: str, step: aiki.Task[int, int]) -> aiki.Workflow[int, int]:
    @aiki.workflow(name=f"bench-{style}")
    async def chain(run: aiki.WorkflowRun, n: int) -> int:
        for _ in range(TASKS):
            n = await step.run(run, n)
        return n

    return chain


WORKFLOWS = {"trio": _workflow("trio", trio_step), "thread": _workflow("thread", thread_step),
             "asyncio": _workflow("asyncio", asyncio_step)}


def measure_style(style: str, runs: int) -> float:
    """Microseconds per task over ``runs`` runs of ``style``."""
    wf = WORKFLOWS[style]

    async def main() -> float:
        async with aiki.embedded(MemoryStore()) as client:
            async with aiki.worker(client, workflows=[wf]):
                for n in range(2):  # warm-up: the thread pool, the asyncio loop
                    await (await wf.enqueue(client, n)).wait_for_completion(timeout=60)
                began = time.perf_counter()
                for n in range(runs):
                    result = await (await wf.enqueue(client, n)).wait_for_completion(60)
                    assert result == n + TASKS
                return (time.perf_counter() - began) / (runs * TASKS) * 1e6

    return trio.run(main)


def run(options: Options) -> list[Row]:
    runs = 10 if options.quick else 50
    samples: dict[str, list[float]] = {style: [] for style in STYLES}
    for rep in range(options.reps):
        for style in STYLES[rep % 3:] + STYLES[:rep % 3]:
            samples[style].append(round(measure_style(style, runs), 1))
    trio_median = statistics.median(samples["trio"])
    rows = []
    for style in STYLES:
        ratio = statistics.median(samples[style]) / trio_median
        rows.append(Row("task_styles", f"{style} task body", "µs per task", "µs",
                        samples[style], {"style": style, "runs_per_rep": runs,
                                         "tasks_per_run": TASKS, "over_trio": round(ratio, 3),
                                         "ratios": {"× Trio style": f"{ratio:.2f}"}}))
    return rows


SUITE = Suite(name="task_styles", run=run)


if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
