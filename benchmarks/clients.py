"""The enqueue-and-wait round trip from each kind of client: Trio (``aiki.connect``),
asyncio (``aiki.asyncio.connect``, under ``asyncio.run``) and blocking (``aiki.sync``).

Per repetition: a fresh ``aiki server`` (SQLite in a temp dir) and one ``aiki worker``
(``benchmarks.probe_app``, one trivial task per run) on loopback; then each client kind in
turn (the order rotates between repetitions, so drift does not favour one kind), each with
a new connection and 10 warm-up round trips. A round trip is ``enqueue`` then
``wait_for_completion`` of the same run. Two modes: one at a time, and 16 at once (16 Trio
tasks, 16 asyncio tasks, or 16 threads sharing one blocking client). The metric is
milliseconds per round trip (elapsed / runs); the ratio column is each kind's median over the
Trio client's median in the same mode, from the same run.

``python -m benchmarks clients [--quick] [--reps N]`` (or ``python -m benchmarks.clients``).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

import aiki
import aiki.asyncio
import aiki.sync
from benchmarks import procs
from benchmarks.probe_app import probe_latency
from benchmarks.suite import Options, Row, Suite

KINDS = ("trio", "asyncio", "sync")
WARMUP = 10
TIMEOUT = 60.0


def split_evenly(runs: int, concurrency: int) -> list[int]:
    """``runs`` shared out among ``concurrency`` loops, as evenly as whole numbers go."""
    return [runs // concurrency + (i < runs % concurrency) for i in range(concurrency)]


def trio_client(url: str, runs: int, concurrency: int) -> float:
    async def main() -> float:
        async with aiki.connect(url) as client:
            await procs.wait_for_workers(client, "clients-w1")
            for n in range(WARMUP):
                await (await probe_latency.enqueue(client, n)).wait_for_completion(TIMEOUT)

            async def loop(count: int) -> None:
                for n in range(count):
                    await (await probe_latency.enqueue(client, n)).wait_for_completion(TIMEOUT)

            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for count in split_evenly(runs, concurrency):
                    nursery.start_soon(loop, count)
            return time.perf_counter() - began

    return trio.run(main)


def asyncio_client(url: str, runs: int, concurrency: int) -> float:
    async def main() -> float:
        async with aiki.asyncio.connect(url) as client:
            for n in range(WARMUP):
                await (await probe_latency.enqueue(client, n)).wait_for_completion(TIMEOUT)

            async def loop(count: int) -> None:
                for n in range(count):
                    await (await probe_latency.enqueue(client, n)).wait_for_completion(TIMEOUT)

            began = time.perf_counter()
            await asyncio.gather(*(loop(count) for count in split_evenly(runs, concurrency)))
            return time.perf_counter() - began

    return asyncio.run(main())


def sync_client(url: str, runs: int, concurrency: int) -> float:
    with aiki.sync.connect(url) as client:
        for n in range(WARMUP):
            probe_latency.enqueue(client, n).wait_for_completion(TIMEOUT)

        def loop(count: int) -> None:
            for n in range(count):
                probe_latency.enqueue(client, n).wait_for_completion(TIMEOUT)

        if concurrency == 1:
            began = time.perf_counter()
            loop(runs)
            return time.perf_counter() - began
        with ThreadPoolExecutor(concurrency) as pool:
            began = time.perf_counter()
            list(pool.map(loop, split_evenly(runs, concurrency)))
            return time.perf_counter() - began


CLIENTS: dict[str, Callable[[str, int, int], float]] = {
    "trio": trio_client, "asyncio": asyncio_client, "sync": sync_client}


def measure(runs: int, concurrency: int, reps: int) -> dict[str, list[float]]:
    """ms per round trip, one sample per repetition, for each kind."""
    out: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="aiki-bench-clients-") as tmp:
        logdir = Path(tmp)
        for rep in range(reps):
            store = f"sqlite:///{logdir / f'clients-{concurrency}-{rep}.db'}"
            with procs.server(store, logdir) as (_, url), \
                    procs.worker(url, logdir, "clients-w1", concurrency=max(8, concurrency)):
                order = KINDS[rep % 3:] + KINDS[:rep % 3]
                for kind in order:
                    seconds = CLIENTS[kind](url, runs, concurrency)
                    out[kind].append(round(seconds / runs * 1000, 4))
    return out


def run(options: Options) -> list[Row]:
    runs = 100 if options.quick else 500
    rows: list[Row] = []
    for concurrency, mode in ((1, "one at a time"), (16, "16 at once")):
        samples = measure(runs, concurrency, options.reps)
        trio_median = statistics.median(samples["trio"])
        for kind in KINDS:
            ratio = statistics.median(samples[kind]) / trio_median
            rows.append(Row(
                "clients", f"{kind} client · {mode}", "ms per enqueue + wait", "ms",
                samples[kind],
                {"client": kind, "concurrency": concurrency, "runs_per_rep": runs,
                 "over_trio": round(ratio, 3), "ratios": {"× Trio client": f"{ratio:.2f}"}},
            ))
    return rows


SUITE = Suite(name="clients", run=run)


if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
