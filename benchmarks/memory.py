"""Memory per waiting run and per queued run, in the engine's own process.

Issue 10 trades CPU for nothing that grows with the runs a store holds: a run asleep for a
day (its slot given back, the server's Timer to wake it) and a run queued with no worker for
its workflow live in the store, not in the server's or the worker's memory.

In this process: an embedded server on SQLite (a file in a temp dir; PostgreSQL too when the
run has a server) and one worker whose inline wait limit is 0.1 s, so each sleep gives its
slot back. Python's allocations are traced (``tracemalloc``, the whole process: server,
worker, client, store driver), read after a full collection:

1. warm-up: ``WARM`` runs put to sleep and ``WARM`` queued (the engine's caches, its
   statements and its first allocations of each kind), then the baseline;
2. ``asleep`` runs (``--quick``: a tenth) each sleep a day: all of them ``waiting``;
3. ``queued`` runs of a workflow no worker serves: all of them ``queued``.

Each row is the growth over its step divided by its runs, in bytes per run. Goal: at most
``GOAL_BYTES`` per run, i.e. nothing kept per run (what remains is noise: a few objects the
allocator keeps, a cache's growth). Measured at two fills (``asleep`` and four times as
many), the per-run figure must not grow with the fill either.

``python -m benchmarks.memory [--quick] [--reps N] [--postgres]`` prints its rows.
"""

from __future__ import annotations

import gc
import tempfile
import tracemalloc
from typing import Any

import trio

import aiki
from aiki.store import Store, open_store
from benchmarks.suite import Options, Row, Suite, store_urls

WARM = 200
GOAL_BYTES = 512  # per run: nothing kept in the process for a run the store holds


@aiki.workflow(name="mem-sleeper", version="1")
async def sleeper(run: aiki.WorkflowRun, seconds: float) -> bool:
    return await run.sleep(seconds)


@aiki.workflow(name="mem-unserved", version="1")
async def unserved(run: aiki.WorkflowRun, x: int) -> int:  # no worker serves it
    return x


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _count(store: Store, state: str, at_least: int) -> None:
    """Wait until ``at_least`` runs are in ``state`` (the store's counts, not its records)."""
    while sum(c.count for c in await store.run_counts() if c.state == state) < at_least:
        await trio.sleep(0.2)


async def _put(client: Any, workflow: Any, args: list[Any]) -> None:
    limit = trio.CapacityLimiter(100)

    async def one(x: Any) -> None:
        async with limit:
            await workflow.enqueue(client, x)  # (the handle is dropped: nobody watches)

    async with trio.open_nursery() as nursery:
        for x in args:
            nursery.start_soon(one, x)


async def measure(store_url: str, asleep: int, queued: int, settle: float = 1.0,
                  ) -> dict[str, Any]:
    """Bytes traced per waiting and per queued run (see the module's text); ``settle``:
    seconds given the last runs' actors to end after their commits, before each reading."""
    tracemalloc.start()
    try:
        store = await open_store(store_url)
        try:
            async with aiki.embedded(store, sources=aiki.Sources.real()) as client:
                async with aiki.worker(client, workflows=[sleeper], max_concurrent_runs=100,
                                       inline_retry_max=0.1):
                    await _put(client, sleeper, [86400.0] * WARM)
                    await _put(client, unserved, list(range(WARM)))
                    await _count(store, "waiting", WARM)
                    await trio.sleep(settle)  # (the last runs' actors end after their commit)
                    base = _traced()
                    await _put(client, sleeper, [86400.0] * asleep)
                    await _count(store, "waiting", WARM + asleep)
                    await trio.sleep(settle)
                    waiting = _traced()
                    await _put(client, unserved, list(range(queued)))
                    await _count(store, "queued", WARM + queued)
                    await trio.sleep(settle)
                    after = _traced()
        finally:
            await store.aclose()
    finally:
        tracemalloc.stop()
    return {"waiting_b": (waiting - base) / asleep, "queued_b": (after - waiting) / queued,
            "base_mb": base / 1e6}


def rows_of(store: str, runs: int, result: dict[str, Any]) -> list[Row]:
    """A measurement's two rows (waiting, queued), each judged against the goal."""
    rows = []
    for kind, key in (("waiting", "waiting_b"), ("queued", "queued_b")):
        value = round(result[key], 1)
        rows.append(Row("memory", f"{store}, {runs:,} runs {kind}", "memory per run", "B",
                        [value], {"runs": runs, "baseline_mb": round(result["base_mb"], 1),
                                  "goal": GOAL_BYTES, "met": value <= GOAL_BYTES,
                                  "target": f"<= {GOAL_BYTES} B a run"}))
    return rows


def run(options: Options) -> list[Row]:
    small = 500 if options.quick else 2_000
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-memory-") as tmp:
        for name, url_of in store_urls(options, tmp, "memory"):
            for runs in (small, 4 * small):
                # One repetition: bytes, not timings (a second reads the same within bytes).
                rows += rows_of(name, runs, trio.run(measure, url_of(str(runs)), runs, runs))
    return rows


SUITE = Suite(name="memory", run=run)

if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
