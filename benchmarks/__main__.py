"""``python -m benchmarks [suite ...] [--quick] [--reps N] [--json PATH] [--no-postgres]
[--only WORDS]``.

Runs the named suites (all of them by default, in the order of ``SUITES``) with one embedded
PostgreSQL server for the whole run, prints one table per suite at the end and writes every
row to JSON (``benchmarks/results/latest.json`` by default; rewritten after each suite, so a
run stopped half-way keeps what it measured). A suite whose module or optional dependency is
missing, or that fails, is reported and skipped; the others still run.

Aiki beside DBOS: the ``throughput`` suite measures each of its embedded and ``ws, 1 worker``
rows interleaved with the same workload on DBOS (Aiki, DBOS, DBOS, Aiki, ... one fresh store
each), and makes the DBOS rows, shown in the ``dbos`` table; the Aiki/DBOS ratio is the
median of the ratios of adjacent repetitions, and only those ratios feed the target lines.
The ``dbos`` suite alone (without ``throughput``) measures the DBOS rows one after another.

``--only sqlite,embedded,100`` keeps the throughput and DBOS rows of those stores,
deployments and concurrencies (comma-separated or repeated; words of one kind are
alternatives); the other suites ignore it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.suite import ONLY_WORDS, Options, Row, Suite, unknown_only_words

# Name -> module; each module exposes SUITE. Imported only when the suite runs.
SUITES: dict[str, str] = {
    "baseline": "benchmarks.baseline",
    "throughput": "benchmarks.throughput",
    "dbos": "benchmarks.dbos_side",
    "latency": "benchmarks.latency",
    "scale": "benchmarks.scale",
    "idle": "benchmarks.idle",
    "wakeups": "benchmarks.wakeups",
    "clients": "benchmarks.clients",
    "task_styles": "benchmarks.task_styles",
    "memory": "benchmarks.memory",
    "metrics_overhead": "benchmarks.metrics_overhead",
}

# Run only when named: a check of one change's cost, not a figure of the engine.
ON_REQUEST = {"metrics_overhead"}

NOTES: dict[str, str] = {
    "metrics_overhead": "Throughput rows (SQLite) with the metrics sink on and off "
                        "(AIKI_METRICS=off), alternating in one run; ratio = median on / "
                        "median off, goal >= 0.97.",
    "wakeups": "Durable sleeps, embedded, one worker that gives every sleep back (inline wait "
               "limit 0.1 s). N runs asleep for a day; then the store calls of 20 s with "
               "nothing due (goal: 0); then probes sleeping 2-4 s beside them: lateness of "
               "the server's wake-up (the sleep.completed commit) and of the next task's "
               "start, against the due time the store recorded. Goal: wake-up p99 <= 10 ms.",
    "memory": "Python memory (tracemalloc, after a full collection) an embedded server and "
              "worker keep per run the store holds: runs asleep for a day (slots given back) "
              "and runs queued for a workflow no worker serves, at two fills, after a "
              "warm-up. Goal: <= 512 B a run, i.e. nothing kept per run.",
    "baseline": "Single-row INSERT + COMMIT, 1 client, one transaction per row: the floor one "
                "durable checkpoint costs.",
    "throughput": "Workflows of 3 trivial tasks (x + 1 each). Mode = runs in flight at any time "
                  "(closed loop: each client task enqueues, waits for the result, repeats) "
                  "until `runs` runs completed. Each repetition: a fresh store and fresh "
                  "processes, 10 warm-up runs, then timed from the first enqueue to the last "
                  "completion. `ws` = an `aiki server` process on loopback WebSocket with "
                  "`aiki worker` processes (max(C, 10) slots each), this process as client. "
                  "ms/task = elapsed / (runs × 3); × one commit = that over the baseline's "
                  "median commit time, same store (embedded, one at a time: over a single-row "
                  "commit measured right beside each repetition, the median of those per-pair "
                  "multiples). Aiki/DBOS (> 1: Aiki faster): the embedded "
                  "and `ws, 1 worker` rows are measured interleaved with DBOS on the same store "
                  "and mode, repetition by repetition (Aiki then DBOS, then DBOS then Aiki, "
                  "...; a fresh store each), so the machine's drift hits both alike; the ratio "
                  "is the median of the ratios of adjacent repetitions (their range and count "
                  "in brackets), and only these feed the target lines. `ws, 2 workers` rows "
                  "are not paired: their ratio is of medians, marked unpaired.",
    "dbos": "DBOS Transact, the same 3-step workflow, in a subprocess per repetition, same "
            "PostgreSQL server (own database) or its SQLite system database, put in WAL "
            "mode first like Aiki's (DBOS sets no PRAGMA: synchronous is SQLite's default "
            "FULL, as Aiki's). One at a time: the workflow function called directly; "
            "concurrent: C client threads each DBOS.start_workflow(...) and wait on the "
            "handle's get_result(). DBOS defaults otherwise (pool of 20 connections). "
            "With the throughput suite in the same run, every DBOS repetition is measured "
            "beside an Aiki one (interleaved; `measured beside` names the Aiki deployments), "
            "and a row pools the repetitions of both pairings; alone, the rows are measured "
            "one after another.",
}

NOTES["clients"] = (
    "Enqueue-and-wait round trips of a one-task workflow over loopback WebSocket (SQLite "
    "server, one worker process), from the Trio client (aiki.connect), the asyncio client "
    "(aiki.asyncio, asyncio.run) and the blocking client (aiki.sync; threads for 16 at "
    "once), each on a fresh connection in the same processes; × Trio client = median over "
    "the Trio client's median in the same mode and run.")

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def load(name: str) -> Suite:
    module = importlib.import_module(SUITES[name])
    suite = getattr(module, "SUITE", None)
    if not isinstance(suite, Suite):
        raise TypeError(f"{SUITES[name]} has no SUITE = Suite(...)")
    return suite


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parents[1],
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "aiki_commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repetition and small counts")
    parser.add_argument("--reps", type=int, default=3, metavar="N",
                        help="repetitions per row (default 3; 1 with --quick)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--no-postgres", action="store_true",
                        help="skip every PostgreSQL row (no server is started)")
    parser.add_argument("--only", action="append", default=[], metavar="WORDS",
                        help="throughput and DBOS rows only of these stores, deployments and "
                             "concurrencies, comma-separated or repeated: "
                             + "; ".join(", ".join(words) for words in ONLY_WORDS.values()))
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    only = tuple(word.strip() for words in args.only for word in words.split(",")
                 if word.strip())
    if unknown_only_words(only):
        parser.error(f"unknown --only word(s) {', '.join(unknown_only_words(only))}; known: "
                     + "; ".join(", ".join(words) for words in ONLY_WORDS.values()))
    names = args.suites or [name for name in SUITES if name not in ON_REQUEST]
    reps = 1 if args.quick else args.reps

    info = machine()
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info, "quick": args.quick, "reps": reps, "only": list(only), "suites": {},
        "rows": [],
    }
    rows: list[Row] = []
    began = time.perf_counter()
    with ExitStack() as stack:
        pg = None
        if not args.no_postgres:
            try:
                from benchmarks.postgres import started

                pg = stack.enter_context(started())
                info["postgresql"] = pg.version()
                info["postgresql_settings"] = {
                    k: pg.setting(k) for k in ("fsync", "synchronous_commit",
                                               "full_page_writes", "max_connections")}
            except Exception as exc:
                print(f"PostgreSQL rows skipped: {exc}", file=sys.stderr)
        options = Options(quick=args.quick, reps=reps, postgres=pg, suites=tuple(names),
                          only=only)
        for name in names:
            start = time.perf_counter()
            print(f"== {name} ==", file=sys.stderr, flush=True)
            try:
                suite = load(name)
            except ImportError as exc:
                message = f"skipped: cannot import {SUITES[name]} ({exc})"
                print(f"{name}: {message}", file=sys.stderr)
                results["suites"][name] = {"status": message}
                continue
            try:
                produced = suite.run(options)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                message = f"failed: {type(exc).__name__}: {exc}"
                print(f"{name}: {message}", file=sys.stderr)
                results["suites"][name] = {"status": message}
                continue
            rows.extend(produced)
            seconds = time.perf_counter() - start
            results["suites"][name] = {"status": "ok", "seconds": round(seconds, 1)}
            print(f"== {name}: {len(produced)} rows in {seconds:.0f} s ==", file=sys.stderr,
                  flush=True)
            report.annotate(rows)
            results["rows"] = [r.to_json() for r in rows]
            _write(args.json, results)

    report.annotate(rows)
    results["rows"] = [r.to_json() for r in rows]
    results["seconds"] = round(time.perf_counter() - began, 1)
    _write(args.json, results)

    print(f"\nAiki benchmarks: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"SQLite {info['sqlite']}, PostgreSQL {info.get('postgresql', '(none)')}, "
          f"aiki {info['aiki_commit']}; {'--quick, ' if args.quick else ''}{reps} rep(s); "
          f"{'only ' + ','.join(only) + '; ' if only else ''}"
          f"{results['seconds']:.0f} s")
    # The throughput suite makes the dbos table's rows: show it when they are there.
    shown = [*names, *(name for name in SUITES if name not in names
                       and any(r.suite == name for r in rows))]
    for name in shown:
        suite_rows = [r for r in rows if r.suite == name]
        status = results["suites"].get(name, {}).get(
            "status", "ok" if suite_rows else "not run")
        print(f"\n### {name}" + ("" if status == "ok" else f" ({status})"))
        if name in NOTES:
            print(f"\n{NOTES[name]}")
        if suite_rows:
            print()
            print(report.table(suite_rows))
    lines = report.target_lines(rows, args.quick)
    if lines:
        print("\n### targets (issue 10)\n")
        for line in lines:
            print(line)
    failures = report.errors(rows)
    if failures:
        print("\nErrors:")
        for line in failures:
            print(f"- {line[:500]}")
    print(f"\nResults written to {args.json}")
    return 0


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
