"""What counting metrics costs: throughput rows with the sink on and off, in one run (issue 17).

The same rows as ``throughput`` (SQLite; embedded, and a real server with one worker
process), each measured ``reps`` times with metrics on and ``reps`` times off
(``AIKI_METRICS=off``: a sink that counts nothing, in this process and the server and worker
processes it starts), alternating on/off so that the machine's drift hits both alike. The
``ratio`` is median(on) / median(off); the goal is at least 0.97.

On a shared machine those rows are dominated by the disk's fsync times, which vary several
fold between repetitions, so the suite also measures what counting costs the CPU: the
embedded engine on the memory store (no disk), 1,000 runs at 100 in flight, CPU seconds of
this process per run (``time.process_time``, which time spent waiting for a busy CPU does
not inflate), on and off alternately. That ratio bounds the throughput lost where the engine
is CPU-bound, and is steady from run to run.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.suite import Options, Row, Suite
from benchmarks.throughput import Config, fresh_store, measure, run_counts


@contextmanager
def metrics(on: bool) -> Iterator[None]:
    before = os.environ.get("AIKI_METRICS")
    os.environ["AIKI_METRICS"] = "on" if on else "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ["AIKI_METRICS"]
        else:
            os.environ["AIKI_METRICS"] = before


async def _cpu_per_run(runs: int, concurrency: int, metrics_on: bool) -> float:
    import aiki
    from aiki.metrics import Metrics, NoMetrics
    from benchmarks.throughput import drive
    from benchmarks.workload import three

    sources = aiki.Sources.real()
    sources.metrics = Metrics() if metrics_on else NoMetrics()
    async with aiki.embedded(store="memory", sources=sources) as client:
        async with aiki.worker(client, workflows=[three], id="bench-cpu",
                               max_concurrent_runs=concurrency):
            await drive(client, 10, 20, first=-20)
            started = time.process_time()
            await drive(client, concurrency, runs)
            return (time.process_time() - started) / runs


def cpu_rows(reps: int, runs: int) -> list[Row]:
    import trio

    samples: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            samples[on].append(trio.run(_cpu_per_run, runs, 100, on) * 1e6)
    ratio = statistics.median(samples[True]) / statistics.median(samples[False])
    print(f"  metrics-overhead: memory · embedded · 100 concurrent: CPU per run on/off = "
          f"{ratio:.3f}", file=sys.stderr, flush=True)
    return [Row("metrics_overhead", f"memory · embedded · 100 concurrent · metrics "
                f"{'on' if on else 'off'}", "CPU per run", "µs", samples[on],
                extra={"ratio_on_off": ratio} if on else {}) for on in (True, False)]


def run(options: Options) -> list[Row]:
    counts = run_counts(options.quick)
    reps = max(options.reps, 2)
    rows = cpu_rows(max(reps, 5), 200 if options.quick else 1000)
    for deployment in ("embedded", "ws1"):
        for concurrency in (1, 100):
            config = Config("sqlite", deployment, concurrency, counts[concurrency])
            samples: dict[bool, list[float]] = {True: [], False: []}
            with tempfile.TemporaryDirectory(prefix="aiki-bench-") as directory:
                for rep in range(reps):
                    for on in ((True, False) if rep % 2 == 0 else (False, True)):
                        tag = f"rep{rep}-{'on' if on else 'off'}"
                        with metrics(on), fresh_store("sqlite", options, directory, tag) as url:
                            samples[on].append(measure(config, url).runs_per_second)
            ratio = statistics.median(samples[True]) / statistics.median(samples[False])
            print(f"  metrics-overhead: {config.label}: on/off = {ratio:.3f}",
                  file=sys.stderr, flush=True)
            for on in (True, False):
                rows.append(Row("metrics_overhead",
                                f"{config.label} · metrics {'on' if on else 'off'}",
                                "runs/s", "1/s", samples[on],
                                extra={"ratio_on_off": ratio} if on else {}))
    return rows


SUITE = Suite(name="metrics_overhead", run=run)
