"""Statements a task write costs for runs that live past their heartbeats (PostgreSQL).

One at a time, a run's writes after its claim are one autocommitted statement each when the
store kept the run as it wrote it last (``aiki.store.postgres._fast``); the locked way is
four (BEGIN with the lock, the read, the write, COMMIT). A heartbeat renews the run's lease
and changes its row: before f39739d that sent the run the locked way for the rest of its
life. This runs ``RUNS`` workflows of ``TASKS`` tasks of 20 ms each, embedded on a fresh
PostgreSQL database, with a lease of 0.6 s (a heartbeat every 0.2 s, so each run is renewed
about five times), and counts every statement sent:

    python -m benchmarks.heartbeats [RUNS] [CONCURRENCY]

It prints statements per run and per task write (a task's start and its outcome are two
writes; one at a time most ride together: the outcome with the next start).
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import trio

import aiki
from benchmarks import postgres

TASKS = 40


@aiki.task(name="nap")
async def nap(x: int) -> int:
    await trio.sleep(0.02)
    return x + 1


@aiki.workflow(name="long", version="1")
async def long(run: aiki.WorkflowRun, x: int) -> int:
    for _ in range(TASKS):
        x = await nap.run(run, x)
    return x


def count_statements() -> collections.Counter[str]:
    """Every statement asyncpg sends from now on, by its first word."""
    counts: collections.Counter[str] = collections.Counter()
    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        original = getattr(asyncpg.connection.Connection, name)

        def counting(self: Any, query: str, *args: Any,
                     _original: Callable[..., Awaitable[Any]] = original,
                     **kwargs: Any) -> Awaitable[Any]:
            counts[query.split()[0].rstrip(";")] += 1
            return _original(self, query, *args, **kwargs)

        setattr(asyncpg.connection.Connection, name, counting)
    return counts


async def measure(url: str, runs: int, concurrency: int,
                  counts: collections.Counter[str]) -> float:
    """Seconds for ``runs`` runs, ``concurrency`` at a time; ``counts`` holds only theirs."""
    async with aiki.embedded(store=url, lease_ttl=0.6) as client:
        async with aiki.worker(client, workflows=[long], id="heartbeats",
                               max_concurrent_runs=max(concurrency, 1)):
            counts.clear()
            started = time.perf_counter()
            indexes = iter(range(runs))

            async def loop() -> None:
                for i in indexes:
                    handle = await long.enqueue(client, i)
                    result = await handle.wait_for_completion(timeout=120)
                    if result != i + TASKS:
                        raise AssertionError(f"run {handle.id}: {i} -> {result!r}")

            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, runs)):
                    nursery.start_soon(loop)
            return time.perf_counter() - started


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    counts = count_statements()
    with postgres.started() as server:
        elapsed = trio.run(measure, server.fresh_database(), runs, concurrency, counts)
    total = sum(counts.values())
    print(f"{runs} runs of {TASKS} tasks, {concurrency} at a time, {elapsed:.2f} s: "
          f"{total / runs:.1f} statements a run, {total / runs / (2 * TASKS):.2f} a task "
          f"write; by first word: {dict(counts.most_common())}")


if __name__ == "__main__":
    main()
