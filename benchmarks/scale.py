"""Scale: store rates with 0 and with 1,000,000 finished runs, and replay time vs history size.

(a) Enqueue and claim rates, through the store's own operations (``Store.apply`` with
``Enqueue`` / ``Claim`` ops, exactly what the StoreWriter applies), on an empty store and on
one holding ``FILLED`` finished runs (``benchmarks/fill.py``: 3 steps and 9 history events
each, five workflow names, idempotency keys on a third). Two shapes each:

- *1 per commit*: one op per ``apply`` (a lone enqueue; a Dispatcher claiming for one free
  slot). With ``synchronous=FULL`` / ``synchronous_commit=on`` this is dominated by the
  commit's fsync, so it shows the cost a user sees, not the indexes.
- *100 per commit*: 100 enqueues per ``apply``, or one ``Claim(limit=100)``: the per-op work
  (index lookups, the runs' steps read back) dominates, so a store that slows down with its
  size shows it here first.

Each repetition enqueues ``n`` runs one at a time, ``n`` in batches, then claims ``n`` one at
a time and ``n`` by 100, on a fresh copy of the store (SQLite: a copy of a cached filled file;
PostgreSQL: ``CREATE DATABASE ... TEMPLATE`` of a database filled once per bench run).
Enqueued runs use the filled workflow names; claims name all five, as one worker registering
them all would. Empty and filled repetitions alternate. Target (issue 6): filled within 10%
of empty.

(b) Replay time of a run with 10, 100 and 1,000 recorded tasks (embedded server, SQLite).
The run is recorded once per size: ``replay-n`` (``benchmarks.probe_app``) runs its tasks,
then parks; the worker leaves its block normally, which releases the lease (the run is
queued again with every step recorded). Each repetition opens a copy of that store and
starts a fresh worker: *total* is from the worker's start (connect, claim with every step,
the ``Assign`` through the wire codec) to the client seeing the run completed; *replay* is
from the workflow's entry on the new lease to its last task returning its recorded result.
Linear growth: time(1000)/time(100) about 10 (fixed costs make it less), per task flat.

``python -m benchmarks.scale [--quick] [--reps N] [--postgres]`` prints its rows.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import aiki
from aiki.sources import Sources
from aiki.store.base import Store
from aiki.store.ops import Claim, Enqueue
from aiki.store.sqlite import SqliteStore
from benchmarks import fill
from benchmarks.probe_app import REPLAY_MARKS, REPLAY_PARKED, replay_n
from benchmarks.suite import Options, Row, Suite

FILLED = 1_000_000
QUICK_FILLED = 100_000
BATCH = 100
RATIO_TARGET = 0.10
REPLAY_SIZES = (10, 100, 1000)
PAIRS = tuple((name, fill.VERSION) for name in fill.WORKFLOWS)


# -- (a) rates ------------------------------------------------------------------------------
async def measure_rates(store: Store, n: int, seed: int = 0) -> dict[str, float]:
    """Enqueue ``2n`` runs (n one per commit, n by 100), claim them (n one per claim, n by
    100); ops per second of each phase."""
    sources = Sources(fill.RealClock(), random.Random(seed))  # ids as the client makes them
    counter = 0

    def enqueue() -> Enqueue:
        nonlocal counter
        counter += 1
        workflow = fill.WORKFLOWS[counter % len(fill.WORKFLOWS)]
        key = f"bench-{seed}-{counter}" if counter % 3 == 0 else None
        payload = json.dumps({"order": counter, "amount_cents": 100 + counter % 9000})
        return Enqueue(sources.new_id(), workflow, fill.VERSION, payload, key, time.time())

    out: dict[str, float] = {}
    t = time.perf_counter()
    for _ in range(n):
        [outcome] = await store.apply([enqueue()])
        assert outcome.created, outcome
    out["enqueue_1"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for start in range(0, n, BATCH):
        outcomes = await store.apply([enqueue() for _ in range(min(BATCH, n - start))])
        assert all(o.created for o in outcomes), outcomes
    out[f"enqueue_{BATCH}"] = n / (time.perf_counter() - t)

    t = time.perf_counter()
    for _ in range(n):
        [claimed] = await store.apply([Claim("bench-w", PAIRS, 1, time.time(), 300.0)])
        assert len(claimed) == 1, claimed
    out["claim_1"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    got = 0
    while got < n:
        [claimed] = await store.apply([Claim("bench-w", PAIRS, BATCH, time.time(), 300.0)])
        assert claimed, f"only {got} of {n} runs claimed"
        got += len(claimed)
    out[f"claim_{BATCH}"] = n / (time.perf_counter() - t)
    return out


def _sqlite_rates(path: Path, n: int, seed: int) -> dict[str, float]:
    async def go() -> dict[str, float]:
        store = await SqliteStore.open(str(path))  # the defaults: WAL, synchronous=FULL
        try:
            return await measure_rates(store, n, seed)
        finally:
            await store.aclose()

    return trio.run(go)


def _postgres_rates(url: str, n: int, seed: int) -> dict[str, float]:
    from aiki.store.postgres import PostgresStore

    async def go() -> dict[str, float]:
        async with PostgresStore.open(url) as store:
            return await measure_rates(store, n, seed)

    return trio.run(go)


def _copy(source: Path, target: Path) -> None:
    """Copy a store file and flush it to disk: otherwise the store's first WAL checkpoint
    (which fsyncs the database file) pays for writing back the whole copy."""
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rm_sqlite(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


Results = dict[str, list[dict[str, float]]]


def sqlite_rates(options: Options, tmp: Path, filled: int, n: int) -> Results:
    source = fill.cached_sqlite(filled)
    results: Results = {"empty": [], "filled": []}
    for rep in range(options.reps):
        empty = tmp / f"empty-{rep}.db"
        results["empty"].append(_sqlite_rates(empty, n, rep))
        _rm_sqlite(empty)
        copy = tmp / f"filled-{rep}.db"
        _copy(source, copy)
        results["filled"].append(_sqlite_rates(copy, n, rep))
        _rm_sqlite(copy)
    return results


def postgres_rates(options: Options, filled: int, n: int) -> Results:
    pg: Any = options.postgres
    template = f"scale_filled_{filled}"
    pg.psql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    pg.psql(f'CREATE DATABASE "{template}"')
    try:
        fill.fill_postgres(pg.url(template), filled)
        results: Results = {"empty": [], "filled": []}
        for rep in range(options.reps):
            url = pg.fresh_database("scale_empty")
            try:
                results["empty"].append(_postgres_rates(url, n, rep))
            finally:
                pg.drop_database(url)
            name = f"scale_filled_copy_{rep}"
            pg.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
            url = pg.url(name)
            try:
                results["filled"].append(_postgres_rates(url, n, rep))
            finally:
                pg.drop_database(url)
        return results
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


def _rate_rows(store: str, results: Results, filled: int, n: int) -> list[Row]:
    rows = []
    for key, metric in (("enqueue_1", "enqueue/s, 1 per commit"),
                        (f"enqueue_{BATCH}", f"enqueue/s, {BATCH} per commit"),
                        ("claim_1", "claim/s, 1 per commit"),
                        (f"claim_{BATCH}", f"claim/s, {BATCH} per claim")):
        empty = [round(r[key], 1) for r in results["empty"]]
        full = [round(r[key], 1) for r in results["filled"]]
        ratio = statistics.median(full) / statistics.median(empty)
        rows.append(Row("scale", f"{store}, empty", metric, "ops/s", empty, {"ops": n}))
        rows.append(Row("scale", f"{store}, {filled:,} finished runs", metric, "ops/s", full, {
            "ops": n, "ratio_vs_empty": round(ratio, 3),
            "target": f"within {RATIO_TARGET:.0%} of empty",
            "met": ratio >= 1 - RATIO_TARGET,
        }))
    return rows


# -- (b) replay -----------------------------------------------------------------------------
async def _record(path: Path, n: int) -> str:
    """Run ``replay-n`` until its ``n`` tasks are recorded, then release it; its id."""
    store = await SqliteStore.open(str(path), synchronous="NORMAL")  # setup, not measured
    async with aiki.embedded(store=store) as client:
        async with aiki.worker(client, workflows=[replay_n], id="recorder",
                               max_concurrent_runs=1):
            handle = await replay_n.enqueue(client, n)
            parked = REPLAY_PARKED.setdefault(handle.id, trio.Event())
            with trio.fail_after(600):
                await parked.wait()
        # Leaving the block gave the run back: queued again, with its n steps recorded.
    await store.aclose()
    return handle.id


async def _replay(path: Path, run_id: str, n: int) -> dict[str, float]:
    async with aiki.embedded(store=f"sqlite:///{path}") as client:
        REPLAY_MARKS.pop(run_id, None)
        t0 = time.perf_counter()
        async with aiki.worker(client, workflows=[replay_n], id="replayer",
                               max_concurrent_runs=1):
            result = await client.handle(run_id).wait_for_completion(timeout=600)
            t1 = time.perf_counter()
    assert result == n * (n - 1) // 2, result
    entered, replayed = REPLAY_MARKS[run_id]
    return {"total": (t1 - t0) * 1000, "replay": (replayed - entered) * 1000,
            "until_entry": (entered - t0) * 1000}


def replay_times(options: Options, tmp: Path) -> dict[int, list[dict[str, float]]]:
    out: dict[int, list[dict[str, float]]] = {}
    for n in REPLAY_SIZES:
        source = tmp / f"replay-{n}.db"
        run_id = trio.run(_record, source, n)
        out[n] = []
        for rep in range(options.reps + 1):  # the first is a warm-up (imports, page cache)
            copy = tmp / f"replay-{n}-{rep}.db"
            _copy(source, copy)
            result = trio.run(_replay, copy, run_id, n)
            _rm_sqlite(copy)
            if rep > 0:
                out[n].append(result)
        _rm_sqlite(source)
    return out


def _replay_rows(times: dict[int, list[dict[str, float]]]) -> list[Row]:
    rows = []
    med = {n: {k: statistics.median(r[k] for r in reps) for k in ("total", "replay")}
           for n, reps in times.items()}
    for n, reps in times.items():
        extra: dict[str, Any] = {
            "total_per_task_ms": round(med[n]["total"] / n, 4),
            "replay_ms": [round(r["replay"], 3) for r in reps],
            "replay_per_task_ms": round(med[n]["replay"] / n, 4),
            "worker_start_to_workflow_entry_ms": [round(r["until_entry"], 3) for r in reps],
        }
        smaller = n // 10
        if smaller in med:
            extra["total_ratio_vs_10x_fewer"] = round(med[n]["total"] / med[smaller]["total"], 2)
            extra["replay_ratio_vs_10x_fewer"] = round(
                med[n]["replay"] / med[smaller]["replay"], 2)
            extra["linear"] = extra["total_ratio_vs_10x_fewer"] <= 12.0
        rows.append(Row("scale", f"replay {n} tasks (sqlite, embedded)", "replay, start to done",
                        "ms", [round(r["total"], 3) for r in reps], extra))
    return rows


def run(options: Options) -> list[Row]:
    filled = QUICK_FILLED if options.quick else FILLED
    n = 300 if options.quick else 2000
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-scale-") as tmp:
        rows += _rate_rows("sqlite", sqlite_rates(options, Path(tmp), filled, n), filled, n)
        if options.postgres is not None:
            rows += _rate_rows("postgres", postgres_rates(options, filled, n), filled, n)
        rows += _replay_rows(replay_times(options, Path(tmp)))
    return rows


SUITE = Suite(name="scale", run=run)

if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
