"""DBOS Transact on the same workload, for the side-by-side rows (issue 6).

DBOS is asyncio- and thread-based and keeps process-wide globals, so it never runs in the
benchmark's own process: each repetition is one subprocess,

    python -m benchmarks.dbos_side --url URL --concurrency C --runs N [--warmup W]

which launches DBOS on ``URL`` (a fresh PostgreSQL database, or ``sqlite:///file``), runs a
warm-up, then ``N`` workflows of 3 trivial steps with ``C`` in flight at any time, and prints
one JSON object: elapsed seconds from the first start to the last completion, how many runs
completed with the right result, and the DBOS version.

How the runs are started: one at a time by calling the workflow function directly (DBOS's
ordinary synchronous call); concurrently with ``DBOS.start_workflow`` and its handle's
``get_result()`` (the workflow runs at once in DBOS's executor thread pool; no queue polling
delay). ``C`` client threads each start a workflow and wait for it, so exactly ``C`` are in
flight, like the Aiki rows. DBOS's defaults are kept (system database pool of 20
connections), except one, for a fair comparison: on SQLite its database file is put in WAL
mode before DBOS opens it, as Aiki's is (``--journal-mode``; DBOS's default rollback journal
made it 1.5-1.9x slower). DBOS sets no PRAGMA, so its ``synchronous`` is SQLite's default,
``FULL``, the same as Aiki's default. The JSON line reports the journal mode read back from
the file after the run.

The parent side: with the ``throughput`` suite in the same bench run, that suite measures
every DBOS repetition interleaved with an Aiki one (:func:`measure_fresh`, :func:`row`) and
this suite adds nothing; alone (``python -m benchmarks dbos``), it measures the DBOS rows one
after another.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

TASKS_PER_RUN = 3


def _sqlite_path(url: str) -> str | None:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


def _journal_mode(path: str, mode: str | None = None) -> str:
    """Set (when ``mode`` is given) and read back the journal mode of the file at ``path``."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        if mode is not None:
            db.execute(f"PRAGMA journal_mode = {mode}")
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        db.close()


def _measure(url: str, concurrency: int, runs: int, warmup: int,
             journal_mode: str = "wal") -> dict[str, Any]:
    import dbos
    from dbos import DBOS

    path = _sqlite_path(url)
    if path is not None and journal_mode != "default":
        _journal_mode(path, journal_mode)  # WAL persists in the file: DBOS's connections get it

    DBOS(config={"name": "aiki-bench", "system_database_url": url, "log_level": "WARNING"})

    @DBOS.step()
    def inc(x: int) -> int:
        return x + 1

    @DBOS.workflow()
    def three(x: int) -> int:
        for _ in range(TASKS_PER_RUN):
            x = inc(x)
        return x

    DBOS.launch()
    try:
        for i in range(warmup):
            assert three(-i - 1) == -i + 2
        completed = 0
        failures: list[str] = []
        lock = threading.Lock()
        if concurrency == 1:
            start = time.perf_counter()
            for i in range(runs):
                if three(i) == i + TASKS_PER_RUN:
                    completed += 1
            elapsed = time.perf_counter() - start
        else:
            indexes = iter(range(runs))

            def loop() -> None:
                nonlocal completed
                while True:
                    with lock:
                        i = next(indexes, None)
                    if i is None:
                        return
                    try:
                        ok = DBOS.start_workflow(three, i).get_result() == i + TASKS_PER_RUN
                    except Exception as exc:  # reported, not hidden
                        with lock:
                            failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    if ok:
                        with lock:
                            completed += 1

            threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
        return {"elapsed": elapsed, "runs": runs, "completed": completed,
                "failures": failures[:5], "dbos_version": _version(dbos),
                "journal_mode": _journal_mode(path) if path is not None else None}
    finally:
        DBOS.destroy(destroy_registry=True)


def _version(module: Any) -> str:
    try:
        from importlib.metadata import version

        return version("dbos")
    except Exception:
        return str(getattr(module, "__version__", "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dbos_side")
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--journal-mode", default="wal",
                        help="SQLite journal mode set on the file first ('default': leave it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = _measure(args.url, args.concurrency, args.runs, args.warmup, args.journal_mode)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- the suite: the parent side, one subprocess per repetition ----------------------------
MODES = {1: "one at a time", 100: "100 concurrent", 1000: "1,000 concurrent"}
STORES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
WARMUP = 10


def run_counts(quick: bool) -> dict[int, int]:
    """Measured runs per repetition, per concurrency (the same as the Aiki rows')."""
    from benchmarks.throughput import run_counts as aiki_counts

    return aiki_counts(quick)


def measure_once(url: str, concurrency: int, runs: int, warmup: int = WARMUP,
                 timeout: float = 900.0) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dbos_side", "--url", url, "--concurrency",
         str(concurrency), "--runs", str(runs), "--warmup", str(warmup)],
        capture_output=True, text=True, timeout=timeout, cwd=str(_repo()),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"DBOS subprocess failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result["completed"] != runs:
        raise RuntimeError(f"DBOS completed {result['completed']} of {runs} runs: "
                           f"{result['failures']}")
    return result


def _repo() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dbos") is not None


def measure_fresh(store: str, concurrency: int, runs: int, options: Any, directory: str,
                  tag: str) -> dict[str, Any]:
    """One repetition on a store nobody has used: a new SQLite file in ``directory`` (named
    after ``tag``), or a new PostgreSQL database on ``options.postgres``, dropped after."""
    import os

    if store == "sqlite":
        return measure_once(f"sqlite:///{os.path.join(directory, tag + '.sqlite')}",
                            concurrency, runs)
    url = options.postgres.fresh_database("dbos")
    try:
        return measure_once(url, concurrency, runs)
    finally:
        options.postgres.drop_database(url)


def row(store: str, concurrency: int, runs: int, results: list[dict[str, Any]],
        errors: list[str], paired_with: list[str] | None = None) -> Any:
    """The DBOS row of ``results`` (one per repetition), stating DBOS's configuration.

    ``paired_with``: for the rows the throughput suite measures interleaved with its own, the
    Aiki deployment each repetition was paired with (the row pools them)."""
    from benchmarks.suite import Row

    version = next((r["dbos_version"] for r in results), "?")
    journal = next((r["journal_mode"] for r in results if r.get("journal_mode")), "?")
    mode = MODES.get(concurrency, f"{concurrency} concurrent")
    how = "direct call" if concurrency == 1 else "start_workflow + handles"
    config = (f"journal {journal.upper()}, synchronous FULL" if store == "sqlite"
              else "pool 20")
    columns = {"runs": str(runs), "started with": how, "DBOS settings": config}
    extra: dict[str, Any] = {
        "system": "dbos", "store": store, "concurrency": concurrency, "runs": runs,
        "warmup_runs": WARMUP, "dbos_version": version, "started_with": how,
        "configuration": config,
        "per_task_ms": [r["elapsed"] / (runs * TASKS_PER_RUN) * 1000.0 for r in results],
    }
    if paired_with is not None:
        extra["paired_with"] = paired_with
        columns["measured beside"] = ", ".join(sorted(set(paired_with), key=paired_with.index))
    extra["columns"] = columns
    if errors:
        extra["errors"] = errors
    label = f"DBOS {version} · {STORES[store]} · {mode}"
    return Row("dbos", label, "runs/s", "1/s", [runs / r["elapsed"] for r in results],
               extra=extra)


def run(options: Any) -> list[Any]:
    """DBOS rows on their own, one after another, when the ``throughput`` suite does not run
    in the same bench run (it measures them, interleaved with its own rows)."""
    import tempfile

    from benchmarks.suite import selected

    if not available():
        raise ImportError("the DBOS rows need the dbos package: pip install -e '.[bench]'")
    if "throughput" in options.suites:
        print("dbos: measured by the throughput suite, interleaved with the Aiki rows",
              file=sys.stderr)
        return []
    counts = run_counts(options.quick)
    stores = ["sqlite"] + (["postgres"] if options.postgres is not None else [])
    if options.postgres is None:
        print("dbos: no PostgreSQL server, PostgreSQL rows skipped", file=sys.stderr)
    rows = []
    for store in stores:
        for concurrency, runs in counts.items():
            if not selected(options.only, store=store, concurrency=concurrency):
                continue
            results: list[dict[str, Any]] = []
            errors: list[str] = []
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="aiki-bench-dbos-") as directory:
                for rep in range(options.reps):
                    try:
                        results.append(measure_fresh(store, concurrency, runs, options,
                                                     directory, f"rep{rep}"))
                    except Exception as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        print(f"  dbos: {exc}", file=sys.stderr)
            rows.append(row(store, concurrency, runs, results, errors))
            print(f"  dbos: {rows[-1].label}: "
                  f"{f'median {rows[-1].median:.1f} runs/s' if results else 'FAILED'} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return rows


def _suite() -> Any:
    from benchmarks.suite import Suite

    return Suite(name="dbos", run=run)


SUITE = _suite()
