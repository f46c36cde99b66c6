"""Aiki's throughput: workflows of 3 trivial tasks, runs per second (issue 6).

Rows: store (SQLite file, PostgreSQL) x deployment x mode.

- Deployments: ``embedded`` (``aiki.embedded`` and ``aiki.worker`` in this process);
  ``ws, 1 worker`` and ``ws, 2 workers``: a real ``aiki server`` process on loopback
  WebSocket with one or two ``aiki worker`` processes, and this process as the client
  (``aiki.connect``).
- Modes: ``C`` runs in flight at any time (a closed loop: ``C`` client tasks, each enqueues a
  run and waits for its result, then takes the next), for ``C`` = 1, 100 and 1,000, until
  ``runs`` runs have completed. Every result is checked (``x + 3``).
- Every repetition gets a fresh store (a new SQLite file, a new PostgreSQL database) and fresh
  processes, then a warm-up of ``WARMUP`` runs, then the measured runs: from the first
  enqueue to the last completion. Workers get ``max(C, 10)`` slots each
  (``max_concurrent_runs`` / ``--concurrency``).

Samples are runs/s; ``extra["per_task_ms"]`` is the wall time per task (elapsed / (runs x 3)).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import attrs
import trio

from benchmarks import procs
from benchmarks.suite import Options, Row, Suite
from benchmarks.workload import TASKS_PER_RUN

APP = "benchmarks.workload:workflows"
WARMUP = 10
WAIT_TIMEOUT = 600.0

STORES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
DEPLOYMENTS = {"embedded": "embedded", "ws1": "ws, 1 worker", "ws2": "ws, 2 workers"}
MODES = {1: "one at a time", 100: "100 concurrent", 1000: "1,000 concurrent"}


def run_counts(quick: bool) -> dict[int, int]:
    """Measured runs per repetition, per concurrency (the modes a run measures).

    ``--quick`` leaves out the 1,000-concurrent mode (1,000 runs are a quarter of a minute
    per row on PostgreSQL here): a smoke run exercises every store and deployment, not every
    load.
    """
    return {1: 5, 100: 100} if quick else {1: 50, 100: 300, 1000: 1000}


@attrs.frozen
class Config:
    store: str  # "sqlite" | "postgres"
    deployment: str  # "embedded" | "ws1" | "ws2"
    concurrency: int
    runs: int

    @property
    def label(self) -> str:
        return (f"{STORES[self.store]} · {DEPLOYMENTS[self.deployment]} · "
                f"{MODES.get(self.concurrency, f'{self.concurrency} concurrent')}")

    @property
    def slots(self) -> int:
        return max(self.concurrency, 10)


@attrs.frozen
class Sample:
    elapsed: float
    runs: int
    completed: int  # runs that completed with the right result

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.elapsed

    @property
    def per_task_ms(self) -> float:
        return self.elapsed / (self.runs * TASKS_PER_RUN) * 1000.0


# -- the client side: the same closed loop for every deployment ---------------------------
async def drive(client: object, concurrency: int, runs: int, first: int = 0) -> Sample:
    """Run ``runs`` workflows with ``concurrency`` in flight; time first enqueue to last end."""
    from benchmarks.workload import three

    indexes = iter(range(first, first + runs))
    completed = 0
    wrong: list[str] = []

    async def loop() -> None:
        nonlocal completed
        for i in indexes:
            handle = await three.enqueue(client, i)  # type: ignore[arg-type]
            result = await handle.wait_for_completion(timeout=WAIT_TIMEOUT)
            if result == i + TASKS_PER_RUN:
                completed += 1
            elif len(wrong) < 5:
                wrong.append(f"run {handle.id}: {i} -> {result!r}")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, runs)):
            nursery.start_soon(loop)
    elapsed = time.perf_counter() - start
    if wrong:
        raise AssertionError(f"wrong results: {wrong}")
    return Sample(elapsed, runs, completed)


async def _embedded(url: str, concurrency: int, runs: int, warmup: int) -> Sample:
    import aiki
    from benchmarks.workload import three

    async with aiki.embedded(store=url) as client:
        async with aiki.worker(client, workflows=[three], id="bench-embedded",
                               max_concurrent_runs=max(concurrency, 10)):
            if warmup:
                await drive(client, min(concurrency, warmup), warmup, first=-warmup)
            return await drive(client, concurrency, runs)


async def _remote(url: str, workers: int, concurrency: int, runs: int, warmup: int) -> Sample:
    import aiki

    async with aiki.connect(url, request_timeout=WAIT_TIMEOUT) as client:
        await procs.wait_for_workers(client, *(worker_id(n) for n in range(workers)))
        if warmup:
            await drive(client, min(concurrency, warmup), warmup, first=-warmup)
        return await drive(client, concurrency, runs)


# -- processes for the loopback deployments -----------------------------------------------
def worker_id(n: int) -> str:
    return f"bench-w{n}"


@contextmanager
def cluster(store_url: str, workers: int, slots: int, logs: Path) -> Iterator[str]:
    """An ``aiki server`` and ``workers`` ``aiki worker`` processes; yields the server URL.
    Leaving stops the workers first, then the server."""
    with ExitStack() as stack:
        _, url = stack.enter_context(procs.server(store_url, logs))
        for n in range(workers):
            stack.enter_context(procs.worker(url, logs, worker_id(n), app=APP,
                                             concurrency=slots))
        yield url


# -- one repetition, one row --------------------------------------------------------------
def measure(config: Config, store_url: str, warmup: int = WARMUP) -> Sample:
    """One repetition of ``config`` on a store nobody has used (``store_url``)."""
    if config.deployment == "embedded":
        return trio.run(_embedded, store_url, config.concurrency, config.runs, warmup)
    workers = {"ws1": 1, "ws2": 2}[config.deployment]
    with tempfile.TemporaryDirectory(prefix="aiki-bench-logs-") as logs:
        with cluster(store_url, workers, config.slots, Path(logs)) as url:
            try:
                return trio.run(_remote, url, workers, config.concurrency, config.runs, warmup)
            except BaseException:
                for log in sorted(Path(logs).glob("*.log")):
                    text = log.read_text(errors="replace")[-2000:]
                    if text.strip():
                        print(f"--- {log.name} ---\n{text}", file=sys.stderr)
                raise


@contextmanager
def fresh_store(store: str, options: Options, directory: str, tag: str) -> Iterator[str]:
    if store == "sqlite":
        yield f"sqlite:///{os.path.join(directory, tag + '.db')}"
        return
    assert options.postgres is not None
    url = options.postgres.fresh_database("aiki")
    try:
        yield url
    finally:
        options.postgres.drop_database(url)


def measure_row(config: Config, options: Options, warmup: int = WARMUP) -> Row:
    """``options.reps`` repetitions of ``config``; failures are kept in ``extra["errors"]``."""
    samples: list[Sample] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-") as directory:
        for rep in range(options.reps):
            try:
                with fresh_store(config.store, options, directory, f"rep{rep}") as url:
                    samples.append(measure(config, url, warmup))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
    extra: dict[str, object] = {
        "system": "aiki", "store": config.store, "deployment": config.deployment,
        "concurrency": config.concurrency, "runs": config.runs, "warmup_runs": warmup,
        "slots_per_worker": config.slots, "tasks_per_run": TASKS_PER_RUN,
        "per_task_ms": [s.per_task_ms for s in samples],
        "elapsed_s": [s.elapsed for s in samples],
        "completed": [s.completed for s in samples],
        "columns": {"runs": str(config.runs)},
    }
    if errors:
        extra["errors"] = errors
    return Row("throughput", config.label, "runs/s", "1/s",
               [s.runs_per_second for s in samples if math.isfinite(s.runs_per_second)],
               extra=extra)


def configs(options: Options) -> list[Config]:
    counts = run_counts(options.quick)
    stores = ["sqlite"] + (["postgres"] if options.postgres is not None else [])
    return [Config(store, deployment, concurrency, counts[concurrency])
            for store in stores for deployment in DEPLOYMENTS for concurrency in counts]


def run(options: Options) -> list[Row]:
    if options.postgres is None:
        print("throughput: no PostgreSQL server, PostgreSQL rows skipped", file=sys.stderr)
    rows = []
    for config in configs(options):
        start = time.perf_counter()
        row = measure_row(config, options)
        rows.append(row)
        print(f"  throughput: {config.label}: {_brief(row)} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def _brief(row: Row) -> str:
    if not row.samples:
        return "FAILED " + "; ".join(row.extra.get("errors", []))
    return f"median {row.median:.1f} runs/s over {len(row.samples)} rep(s)"


SUITE = Suite(name="throughput", run=run)
