"""Wake-ups: how late a durable sleep ends, and what an idle server with many sleeping runs
asks of its store.

In this process: an embedded server (SQLite in a temp dir; PostgreSQL too when the run has a
server) and one worker whose inline wait limit is 0.1 s, so every sleep gives its slot back
and the server's Timer wakes the run.

1. ``asleep`` runs (10,000; ``--quick``: 1,000) each sleep a day: all of them ``waiting``.
2. Idle: after ``SETTLE_S`` (the last lease granted has expired), for ``IDLE_S`` seconds
   nothing is due. Store calls (transactions and reads) the server makes meanwhile are
   counted by a wrapper around the store. Goal: none. (PostgreSQL, a store that several
   servers may share, keeps a slow fallback poll: a claim and a timer read every 30 s.)
3. Probes: ``probes`` runs sleep 2-4 s, due times spread 20 ms apart, beside the sleepers.
   Lateness is measured twice per probe against the sleep's due time as the store recorded
   it (``next_attempt_at`` of its sleep step): when the server ended the sleep (the
   ``sleep.completed`` history event: the Timer's wake-up commit), and when the workflow's
   next task body started (wake-up, claim, assignment, replay and the task's start record).
   Goal (issue 9): the wake-up within 10 ms of the due time.

``python -m benchmarks.wakeups [--quick] [--reps N] [--postgres]`` prints its rows.
"""

from __future__ import annotations

import collections
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import trio

import aiki
from aiki.store import Store, open_store
from benchmarks.latency import percentile
from benchmarks.suite import Options, Row, Suite, store_urls

IDLE_S = 20.0
SETTLE_S = 31.0  # the embedded server's lease ttl (30 s), and a second
WAKE_GOAL_MS = 10.0
started: dict[str, float] = {}


@aiki.task(name="stamp")
async def stamp(key: str) -> float:
    started[key] = time.time()
    return started[key]


@aiki.workflow(name="sleeper", version="1")
async def sleeper(run: aiki.WorkflowRun, spec: list[Any]) -> float:
    key, seconds = str(spec[0]), float(spec[1])
    await run.sleep(seconds)
    return await stamp.run(run, key)


class Counting:
    """The store, with every call the server makes counted (reads and transactions)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name.startswith(("get_", "list_", "next_")):
            async def read(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return await value(*args, **kwargs)

            return read
        return value

    async def apply(self, ops: Sequence[Any]) -> list[Any]:
        self.calls["apply"] += 1
        return await self.inner.apply(ops)  # type: ignore[no-any-return]


async def measure(store_url: str, asleep: int, probes: int) -> dict[str, Any]:
    started.clear()
    store = Counting(await open_store(store_url))
    try:
        async with aiki.embedded(store, sources=aiki.Sources.real()) as client:  # type: ignore[arg-type]
            async with aiki.worker(client, workflows=[sleeper], max_concurrent_runs=200,
                                   inline_retry_max=0.1):
                t0 = time.monotonic()
                limit = trio.CapacityLimiter(200)

                async def put(i: int) -> None:
                    async with limit:
                        await sleeper.enqueue(client, [f"asleep-{i}", 86400.0])

                async with trio.open_nursery() as nursery:
                    for i in range(asleep):
                        nursery.start_soon(put, i)
                while len(await store.inner.list_runs(state="waiting",
                                                      limit=asleep + 1)) < asleep:
                    await trio.sleep(0.5)
                fill_s = time.monotonic() - t0
                # Settle: past the expiry of the last lease granted, a due time the Timer
                # was told of (it checks it with one read).
                await trio.sleep(SETTLE_S)
                before = collections.Counter(store.calls)
                await trio.sleep(IDLE_S)
                idle_calls = {k: v - before[k] for k, v in store.calls.items()
                              if v != before[k]}
                handles = [await sleeper.enqueue(client, [f"probe-{i}", 2.0 + 0.02 * i])
                           for i in range(probes)]
                for h in handles:
                    await h.wait_for_completion(timeout=120)
                wake_ms, body_ms = [], []
                for i, h in enumerate(handles):
                    [sleep] = [s for s in await store.inner.get_steps(h.id) if s.kind == "sleep"]
                    due = sleep.next_attempt_at
                    assert due is not None
                    ended = [e.at for e in await store.inner.get_history(h.id)
                             if e.event == "sleep.completed"]
                    wake_ms.append((ended[0] - due) * 1000)
                    body_ms.append((started[f"probe-{i}"] - due) * 1000)
    finally:
        await store.inner.aclose()
    return {"fill_s": fill_s, "idle_calls": idle_calls, "wake_ms": wake_ms,
            "body_ms": body_ms}


def run(options: Options) -> list[Row]:
    asleep = 1_000 if options.quick else 10_000
    probes = 50 if options.quick else 100
    reps = max(1, options.reps if not options.quick else 1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-wakeups-") as tmp:
        for name, url_of in store_urls(options, tmp, "wakeups"):
            results = [trio.run(measure, url_of(str(i)), asleep, probes) for i in range(reps)]
            label = f"{name}, {asleep:,} runs asleep"
            wake_p50 = [percentile(r["wake_ms"], 0.5) for r in results]
            wake_p99 = [percentile(r["wake_ms"], 0.99) for r in results]
            common = {"asleep": asleep, "probes": probes,
                      "goal": f"wake-up within {WAKE_GOAL_MS:g} ms of the due time"}
            rows += [
                Row("wakeups", label, "wake-up lateness p50", "ms",
                    [round(x, 2) for x in wake_p50], common),
                Row("wakeups", label, "wake-up lateness p99", "ms",
                    [round(x, 2) for x in wake_p99],
                    {**common, "met": max(wake_p99) <= WAKE_GOAL_MS}),
                Row("wakeups", label, "next task starts p50", "ms after due",
                    [round(percentile(r["body_ms"], 0.5), 2) for r in results]),
                Row("wakeups", label, "next task starts p99", "ms after due",
                    [round(percentile(r["body_ms"], 0.99), 2) for r in results]),
                Row("wakeups", label, "idle store calls", f"per {IDLE_S:g} s",
                    [float(sum(r["idle_calls"].values())) for r in results],
                    {"calls": [r["idle_calls"] for r in results], "goal": 0}),
                Row("wakeups", label, "time to put them to sleep", "s",
                    [round(r["fill_s"], 1) for r in results]),
            ]
    return rows


SUITE = Suite(name="wakeups", run=run)

if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
