"""``python -m simulations run --seed N`` and ``python -m simulations sweep --seeds 0-499``."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import attrs

from simulations.checkers import check
from simulations.world import FAULT_CLASSES, Config, run_seed

REGRESSIONS = Path(__file__).with_name("regressions.txt")
SOMETIMES = ("ambiguous commit", "lease expiry on a live worker", "crash with a write in flight",
             "duplicate delivery", "supervisor restart", "graceful stop with runs held",
             "sleep woken early", "event buffered before its wait",
             "event delivered to a waiting run", "event wait timed out",
             "send refused for a finished run", "run woken on another server",
             "watch begun after its run ended",
             # Issue 18's blind spots: each batch must reach them.
             "stale worker write while another lease is live", "task start after a pause",
             "duplicate content address in one run",
             "schedule fired on time", "schedule caught up after downtime",
             "schedule occurrence skipped by overlap",
             "schedule occurrence buffered then fired",
             "schedule occurrence cancelled its previous run",
             "run paused while running", "task in flight recorded while paused",
             "run paused while waiting", "resumed to wait again", "failed run retried",
             "run forked", "fork past the end refused",
             "run pushed before its commit, then confirmed",
             "run pushed before its commit, then revoked",
             "task start sent early, accepted", "task start sent early, refused",
             "run cancelled", "cancel of a finished run", "parent woken by a child completed",
             "parent woken by a child failed", "parent woken by a child cancelled",
             "run waited for its children", "cancel reached a descendant",
             "deadline scope expired", "run woken at its deadline",
             "step abandoned at a deadline", "shielded work outlived its deadline",
             # A worker in a server's process, its requests answered in its own tasks.
             "task completed by an in-process worker",
             "in-process worker crashed while its run ended",
             "in-process worker crashed while its run ended, its commit's answer lost",
             "in-process worker crashed while its run waited",
             "in-process worker crashed while starting a child",
             # A revoked lease's worker told at the commit, not at its next heartbeat.
             "revoked lease's worker told at once",
             "revoked lease's worker told through another server",
             "task body stopped by a revoke")


@attrs.frozen
class SeedReport:
    seed: int
    trace_hash: str
    virtual_seconds: float
    faults: dict[str, int]
    sometimes: dict[str, int]
    violations: list[str]
    cpu_seconds: float
    safety: float = 600.0


def replay_command(seed: int, faults: tuple[str, ...], safety: float = 600.0) -> str:
    extra = "" if set(faults) == set(FAULT_CLASSES) else f" --faults {','.join(faults)}"
    if safety != 600.0:
        extra += f" --minutes {safety / 60:g}"
    return f"python -m simulations run --seed {seed}{extra}"


def run_one(seed: int, faults: tuple[str, ...] = FAULT_CLASSES, safety: float = 600.0,
            runs: int = 24) -> SeedReport:
    started = time.process_time()
    outcome = run_seed(Config(seed, faults, safety=safety, runs=runs))
    reference = run_seed(Config(seed, (), safety=safety, runs=runs))
    violations = check(outcome, reference)
    return SeedReport(seed, outcome.trace_hash, outcome.virtual_seconds, dict(outcome.faults),
                      dict(outcome.sometimes), violations, time.process_time() - started,
                      safety)


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    return seeds


def regression_seeds(text: str | None = None) -> list[tuple[int, float | None]]:
    """The seeds of ``regressions.txt``, each with the length of its faulty phase in seconds
    when its line names one (``2073 minutes=20  # why``), else None: the sweep's own length.

    A seed that found its bug only in a longer run keeps that length here, or it would pass
    either way and guard nothing.
    """
    if text is None:
        text = REGRESSIONS.read_text() if REGRESSIONS.exists() else ""
    seeds: list[tuple[int, float | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        try:
            seed = int(words[0])
            minutes = None
            for word in words[1:]:
                key, _, value = word.partition("=")
                if key != "minutes" or not value:
                    raise ValueError(word)
                minutes = float(value)
        except ValueError:
            raise ValueError(f"{REGRESSIONS.name} line {number}: expected 'SEED' or "
                             f"'SEED minutes=M' before the '#', got {line!r}") from None
        seeds.append((seed, None if minutes is None else minutes * 60.0))
    return seeds


def _progress(done: int, total: int, failed: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} seeds, "
                     f"{failed} failing, {rate:.1f} seeds/s ")
    sys.stderr.flush()


def sweep(seeds: list[int], faults: tuple[str, ...], jobs: int, safety: float,
          runs: int, own_length: Iterable[tuple[int, float]] = ()) -> int:
    """Run every seed at ``safety`` virtual seconds, and each of ``own_length`` at its own."""
    started = time.monotonic()
    reports: list[SeedReport] = []
    jobs_to_run = sorted({(s, safety) for s in seeds} | set(own_length))
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, s, faults, length, runs) for s, length in jobs_to_run]
        for future in concurrent.futures.as_completed(futures):
            reports.append(future.result())
            _progress(len(reports), len(jobs_to_run),
                      sum(1 for r in reports if r.violations), started)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    reports.sort(key=lambda r: (r.seed, r.safety))
    wall = time.monotonic() - started
    cpu = sum(r.cpu_seconds for r in reports)
    faults_total: Counter[str] = Counter()
    sometimes: Counter[str] = Counter()
    for r in reports:
        faults_total.update(r.faults)
        sometimes.update(r.sometimes)
    failing = [r for r in reports if r.violations]
    hours = sum(r.virtual_seconds for r in reports) / 3600
    print(f"seeds run            {len(reports)}")
    print(f"virtual hours        {hours:.1f}")
    print(f"wall / CPU seconds   {wall:.1f} / {cpu:.1f}")
    print(f"seeds per CPU-minute {len(reports) / max(cpu / 60, 1e-9):.1f}")
    print(f"virtual h/CPU-minute {hours / max(cpu / 60, 1e-9):.2f}")
    print("faults injected:")
    for kind, n in sorted(faults_total.items()):
        print(f"  {kind:<50}{n:>8}")
    print("situations reached (each must happen at least once):")
    missing = [s for s in SOMETIMES if not sometimes[s]]
    for s in SOMETIMES:
        print(f"  {s:<50}{sometimes[s]:>8}")
    print(f"violations           {sum(len(r.violations) for r in reports)} "
          f"in {len(failing)} seed(s)")
    for r in failing[:10]:
        print(f"\nseed {r.seed} FAILED: {r.violations[0]}")
        for more in r.violations[1:4]:
            print(f"    also: {more}")
        print(f"  replay: {replay_command(r.seed, faults, r.safety)}")
    if missing and len(reports) >= 20 and set(faults) == set(FAULT_CLASSES):
        print(f"\nFAILED: never happened in this batch: {', '.join(missing)}")
        return 1
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="run one seed and check it")
    one.add_argument("--seed", type=int, required=True)
    many = sub.add_parser("sweep", help="run many seeds in parallel processes")
    many.add_argument("--seeds", default="0-199", help="e.g. 0-499 or 1,5,9-12")
    many.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    many.add_argument("--regressions", action="store_true",
                      help="also run every seed in simulations/regressions.txt")
    for p in (one, many):
        p.add_argument("--faults", default=",".join(FAULT_CLASSES),
                       help=f"comma-separated subset of {','.join(FAULT_CLASSES)}, or none")
        p.add_argument("--safety", type=float, default=600.0,
                       help="virtual seconds of the faulty phase (default 600)")
        p.add_argument("--minutes", type=float, default=None,
                       help="the faulty phase in virtual minutes (overrides --safety)")
        p.add_argument("--runs", type=int, default=24, help="runs enqueued per seed")
    one.add_argument("--trace", action="store_true", help="print the seed's trace")
    args = parser.parse_args(argv)
    if args.minutes is not None:
        args.safety = args.minutes * 60.0
    faults = tuple(f for f in args.faults.split(",") if f and f != "none")
    unknown = set(faults) - set(FAULT_CLASSES)
    if unknown:
        parser.error(f"unknown fault class(es) {sorted(unknown)}; known: {FAULT_CLASSES}")
    if args.command == "run":
        if args.trace:
            outcome = run_seed(Config(args.seed, faults, safety=args.safety, runs=args.runs,
                                      trace=True))
            print("\n".join(outcome.trace))
        report = run_one(args.seed, faults, args.safety, args.runs)
        print(f"seed {report.seed}: trace {report.trace_hash[:16]}, "
              f"{report.virtual_seconds / 60:.1f} virtual minutes, "
              f"{report.cpu_seconds:.2f} CPU s")
        print("faults: " + ", ".join(f"{k}={v}" for k, v in sorted(report.faults.items())))
        for v in report.violations:
            print(f"VIOLATION {v}")
        print("ok" if not report.violations else
              f"FAILED: replay with {replay_command(args.seed, faults, args.safety)}")
        return 1 if report.violations else 0
    seeds = parse_seeds(args.seeds)
    own_length: list[tuple[int, float]] = []
    if args.regressions:
        for seed, length in regression_seeds():
            if length is None:
                seeds.append(seed)
            else:
                own_length.append((seed, length))
    return sweep(seeds, faults, args.jobs, args.safety, args.runs, own_length)
