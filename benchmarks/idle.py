"""Idle: what an ``aiki server`` with nothing to do costs, with one idle worker connected.

The server is ``benchmarks.counting_server``: the real ``aiki server`` process with counters
on its store (see that module). One ``aiki worker`` process (``benchmarks.probe_app``, 8
slots) is connected and idle; no client stays connected. After a 3 s settle, 60 s are
measured (``--quick``: 10 s), split into ``reps`` equal windows (one sample each):

- server CPU: user + system time of the server process (``psutil``, i.e. /proc/PID/stat),
  as % of one core; the worker's is kept in ``extra``;
- store calls per minute: transactions (``apply``) and reads the server made, with the op
  types in ``extra``;
- SQL statements per minute: counted in the server process itself (SQLite: the trace
  callback on its connection; PostgreSQL: asyncpg's query logger on every connection).
  For PostgreSQL, ``pg_stat_database.xact_commit`` of the run's database, read from another
  database before the server starts and after it stops (so every backend has flushed its
  statistics), is kept in ``extra`` beside the server's own count of transactions over the
  same whole lifetime, as a cross-check.

``python -m benchmarks.idle [--quick] [--reps N] [--postgres]`` prints its rows.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

import aiki
from benchmarks import procs
from benchmarks.suite import Options, Row, Suite

SETTLE = 3.0


def _dump(pid: int, path: Path, timeout: float = 10.0) -> dict[str, int]:
    before = json.loads(path.read_text())["dumps"] if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            counts: dict[str, int] = json.loads(path.read_text())
            if counts.get("dumps", 0) > before:
                return counts
        time.sleep(0.01)
    raise RuntimeError("the counting server did not dump its counters")


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _wait_worker(url: str) -> None:
    async with aiki.connect(url) as client:
        await procs.wait_for_workers(client, "idle-w1")


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))
            if k != "dumps" and b.get(k, 0) != a.get(k, 0)}


def measure(store_url: str, seconds: float, windows: int, logdir: Path) -> list[dict[str, Any]]:
    counts_path = logdir / "idle-counts.json"
    counts_path.unlink(missing_ok=True)
    os.environ["AIKI_BENCH_COUNTS"] = str(counts_path)
    try:
        with procs.server(store_url, logdir, module=("-m", "benchmarks.counting_server"),
                          name="idle-server") as (server, url), \
                procs.worker(url, logdir, "idle-w1") as worker:
            trio.run(_wait_worker, url)
            time.sleep(SETTLE)
            sp, wp = psutil.Process(server.pid), psutil.Process(worker.pid)
            out = []
            counts, cpu, wcpu, t = _dump(server.pid, counts_path), _cpu(sp), _cpu(wp), \
                time.monotonic()
            for _ in range(windows):
                time.sleep(seconds / windows)
                counts2, cpu2, wcpu2, t2 = _dump(server.pid, counts_path), _cpu(sp), \
                    _cpu(wp), time.monotonic()
                span = t2 - t
                out.append({
                    "seconds": span, "cpu_pct": 100 * (cpu2 - cpu) / span,
                    "worker_cpu_pct": 100 * (wcpu2 - wcpu) / span,
                    "counts": _delta(counts, counts2),
                })
                counts, cpu, wcpu, t = counts2, cpu2, wcpu2, t2
            lifetime = _dump(server.pid, counts_path)
            server.stop()
            out[-1]["lifetime_counts"] = lifetime
            return out
    finally:
        os.environ.pop("AIKI_BENCH_COUNTS", None)


def _xact_commit(pg: Any, database: str) -> int:
    out = pg.psql(f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'")
    numbers = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
    return int(numbers[0]) if numbers else -1


def _rows(label: str, windows: list[dict[str, Any]], extra: dict[str, Any]) -> list[Row]:
    def per_min(key: str) -> list[float]:
        return [round(w["counts"].get(key, 0) * 60 / w["seconds"], 1) for w in windows]

    total_s = sum(w["seconds"] for w in windows)
    totals: dict[str, int] = {}
    for w in windows:
        for k, v in w["counts"].items():
            totals[k] = totals.get(k, 0) + v
    common = {"measured_s": round(total_s, 1), "windows": len(windows)}
    return [
        Row("idle", label, "server CPU", "% core", [round(w["cpu_pct"], 3) for w in windows],
            {**common, "worker_cpu_pct": [round(w["worker_cpu_pct"], 3) for w in windows],
             **extra}),
        Row("idle", label, "store calls", "/min", per_min("store_calls"),
            {**common, "counts_over_whole_window": totals}),
        Row("idle", label, "SQL statements", "/min", per_min("sql"), common),
    ]


def run(options: Options) -> list[Row]:
    seconds = 10.0 if options.quick else 60.0
    windows = max(1, options.reps)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-idle-") as tmp:
        logdir = Path(tmp)
        result = measure(f"sqlite:///{logdir / 'idle.db'}", seconds, windows, logdir)
        rows += _rows("sqlite, 1 idle worker", result, {})
        pg: Any = options.postgres
        if pg is not None:
            url = pg.fresh_database("idle")
            name = url.split("?")[0].rsplit("/", 1)[1]
            try:
                before = _xact_commit(pg, name)
                result = measure(url, seconds, windows, logdir)
                time.sleep(1.0)  # exited backends have flushed their statistics
                after = _xact_commit(pg, name)
            finally:
                pg.drop_database(url)
            lifetime = result[-1].get("lifetime_counts", {})
            rows += _rows("postgres, 1 idle worker", result, {
                "pg_xact_commit_server_lifetime": after - before,
                "server_store_calls_lifetime": lifetime.get("store_calls"),
                "server_sql_lifetime": lifetime.get("sql"),
            })
    return rows


SUITE = Suite(name="idle", run=run)

if __name__ == "__main__":
    from benchmarks.latency import main

    main(suite=SUITE)
