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

Beside DBOS (issue 10's targets are Aiki/DBOS ratios): when the ``dbos`` package is installed,
the ``embedded`` and ``ws, 1 worker`` rows are measured interleaved with the same store and
mode on DBOS (:func:`benchmarks.dbos_side.measure_once`, a subprocess on a fresh SQLite file
or PostgreSQL database): Aiki rep 1, DBOS rep 1, DBOS rep 2, Aiki rep 2, Aiki rep 3, ... (the
side that goes first alternates), so a drift of the shared machine's load over minutes hits
both sides of a pair alike. Each pair gives one ratio (Aiki runs/s over DBOS runs/s); the row
keeps them in ``extra["pair_ratios"]`` (every pair in ``extra["pairs"]``), and
:func:`benchmarks.report.annotate` reports their median, min and max as ``aiki_over_dbos``.
The suite then adds one DBOS row per store and mode (suite ``dbos``; pooling the repetitions
measured beside both deployments), with DBOS's configuration (journal mode, synchronous, pool
size). ``ws, 2 workers`` rows are measured alone; their ratio is of medians, and unpaired.
The embedded one-at-a-time rows also measure one single-row commit (the ``baseline`` suite's
floor) next to each Aiki repetition: their cost per task over one commit is a median of
per-pair multiples too (``extra["pair_commit_multiples"]``).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from benchmarks import baseline, dbos_side, procs
from benchmarks.suite import Options, Row, Suite, selected
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

    Aiki's windows are about a second at 100 concurrent and half a second one at a time
    (DBOS's longer): with 300 runs at 100 concurrent (a third of a second for Aiki, each
    client three runs), the ramp up and down was a large part of it, and one run's pairs
    read 4.99-6.02x where the next run's read 7.03-9.55x, same code.
    """
    return {1: 5, 100: 100} if quick else {1: 200, 100: 1000, 1000: 1000}


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
    return aiki_row(config, samples, errors, warmup)


def aiki_row(config: Config, samples: list[Sample], errors: list[str], warmup: int = WARMUP,
             pairs: list[Pair] | None = None) -> Row:
    extra: dict[str, object] = {
        "system": "aiki", "store": config.store, "deployment": config.deployment,
        "concurrency": config.concurrency, "runs": config.runs, "warmup_runs": warmup,
        "slots_per_worker": config.slots, "tasks_per_run": TASKS_PER_RUN,
        "per_task_ms": [s.per_task_ms for s in samples],
        "elapsed_s": [s.elapsed for s in samples],
        "completed": [s.completed for s in samples],
        "columns": {"runs": str(config.runs)},
    }
    if pairs is not None:
        extra["pairs"] = [p.to_json() for p in pairs]
        extra["pair_ratios"] = [p.ratio for p in pairs if p.ratio is not None]
        multiples = [p.task_over_commit for p in pairs if p.task_over_commit is not None]
        if multiples:
            extra["pair_commit_multiples"] = multiples
    if errors:
        extra["errors"] = errors
    return Row("throughput", config.label, "runs/s", "1/s",
               [s.runs_per_second for s in samples if math.isfinite(s.runs_per_second)],
               extra=extra)


# -- Aiki beside DBOS: interleaved repetitions, one ratio per pair -------------------------
# The deployments whose rows get a DBOS counterpart measured beside them (the ones issue 10's
# targets read). DBOS has no deployments: its rows are the same for both.
PAIRED_DEPLOYMENTS = ("embedded", "ws1")


@attrs.frozen
class Pair:
    """One repetition of each side, one right after the other."""

    rep: int
    first: str  # "aiki" | "dbos": which side ran first
    aiki: Sample | None  # None: that side failed (its error is in the row)
    dbos: dict[str, Any] | None  # measure_once's answer
    commit_ms: float | None = None  # one single-row commit, measured next to the Aiki side

    @property
    def task_over_commit(self) -> float | None:
        if self.aiki is None or not self.commit_ms:
            return None
        multiple = self.aiki.per_task_ms / self.commit_ms
        return multiple if math.isfinite(multiple) else None

    @property
    def dbos_runs_per_second(self) -> float | None:
        return self.dbos["runs"] / self.dbos["elapsed"] if self.dbos else None

    @property
    def ratio(self) -> float | None:
        dbos = self.dbos_runs_per_second
        if self.aiki is None or not dbos:
            return None
        ratio = self.aiki.runs_per_second / dbos
        return ratio if math.isfinite(ratio) else None

    def to_json(self) -> dict[str, Any]:
        return {"rep": self.rep, "first": self.first,
                "aiki_runs_per_s": self.aiki.runs_per_second if self.aiki else None,
                "dbos_runs_per_s": self.dbos_runs_per_second, "ratio": self.ratio,
                "commit_ms": self.commit_ms, "task_over_commit": self.task_over_commit}


def alternate(reps: int, aiki: Callable[[int], Sample], dbos: Callable[[int], dict[str, Any]],
              errors: dict[str, list[str]], commit: Callable[[int], float] | None = None
              ) -> list[Pair]:
    """``reps`` pairs: Aiki then DBOS in even repetitions, DBOS then Aiki in odd ones, so a
    drift in the machine's load hits both sides of a pair alike and neither side is always
    first. ``commit`` (one single-row commit's ms, for the cost-per-task targets) runs between
    them, next to Aiki either way. A side that fails leaves its error in ``errors[side]`` and
    its pair no ratio."""
    sides: dict[str, Callable[[int], Any]] = {"aiki": aiki}
    if commit is not None:
        sides["commit"] = commit
    sides["dbos"] = dbos
    pairs = []
    for rep in range(reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        got: dict[str, Any] = {}
        for side in order:
            try:
                got[side] = sides[side](rep)
            except Exception as exc:
                errors.setdefault(side, []).append(f"{type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
        pairs.append(Pair(rep, order[0], got.get("aiki"), got.get("dbos"), got.get("commit")))
    return pairs


def measure_paired(config: Config, options: Options, warmup: int = WARMUP
                   ) -> tuple[Row, list[dict[str, Any]], list[str]]:
    """``options.reps`` pairs of ``config`` and its DBOS counterpart, each repetition on a
    fresh store; the Aiki row (with every pair's ratio), DBOS's answers and errors."""
    errors: dict[str, list[str]] = {"aiki": [], "dbos": []}
    with tempfile.TemporaryDirectory(prefix="aiki-bench-") as directory:
        def aiki_once(rep: int) -> Sample:
            with fresh_store(config.store, options, directory, f"rep{rep}") as url:
                return measure(config, url, warmup)

        def dbos_once(rep: int) -> dict[str, Any]:
            return dbos_side.measure_fresh(config.store, config.concurrency, config.runs,
                                           options, directory, f"dbos-rep{rep}")

        def commit_once(rep: int) -> float:
            return commit_ms(config.store, options, directory, f"commit-rep{rep}")

        # The cost-per-task targets (embedded, one at a time) are over one commit: measured
        # next to each Aiki repetition too, for the same reason.
        beside_commit = config.deployment == "embedded" and config.concurrency == 1
        pairs = alternate(options.reps, aiki_once, dbos_once, errors,
                          commit_once if beside_commit else None)
    samples = [p.aiki for p in pairs if p.aiki is not None]
    row = aiki_row(config, samples, errors["aiki"] + [f"single-row commit: {e}"
                                                      for e in errors.get("commit", [])],
                   warmup, pairs)
    return row, [p.dbos for p in pairs if p.dbos is not None], errors["dbos"]


def commit_ms(store: str, options: Options, directory: str, tag: str) -> float:
    """One single-row commit's time (ms), the baseline suite's way, on a fresh file or
    database."""
    count = baseline.commits(options)
    if store == "sqlite":
        return 1000.0 / baseline.sqlite_commit_rate(os.path.join(directory, tag + ".db"), count)
    assert options.postgres is not None
    url = options.postgres.fresh_database("baseline")
    try:
        return 1000.0 / baseline.postgres_commit_rate(url, count)
    finally:
        options.postgres.drop_database(url)


def configs(options: Options) -> list[Config]:
    counts = run_counts(options.quick)
    stores = ["sqlite"] + (["postgres"] if options.postgres is not None else [])
    return [Config(store, deployment, concurrency, counts[concurrency])
            for store in stores for deployment in DEPLOYMENTS for concurrency in counts
            if selected(options.only, store=store, deployment=deployment,
                        concurrency=concurrency)]


def run(options: Options) -> list[Row]:
    if options.postgres is None:
        print("throughput: no PostgreSQL server, PostgreSQL rows skipped", file=sys.stderr)
    with_dbos = dbos_side.available()
    if not with_dbos:
        print("throughput: the dbos package is not installed: no DBOS rows, no Aiki/DBOS "
              "ratios (pip install -e '.[bench]')", file=sys.stderr)
    measured: dict[Config, Row] = {}
    # (store, concurrency) -> runs, DBOS's answers, errors, the deployment of each answer
    beside: dict[tuple[str, int], tuple[int, list[dict[str, Any]], list[str], list[str]]] = {}
    # Every embedded row before any loopback one. Workaround for an Aiki hang seen here
    # (2026-12-01, at ea23d56): in a process that has run a workflow through aiki.connect, the
    # first embedded PostgreSQL store's first task outcome is never written (the run's lease
    # expires every 40 s and its first task starts again, for ever). The table keeps its
    # order (store, deployment, mode).
    ordered = sorted(configs(options), key=lambda config: config.deployment != "embedded")
    for config in ordered:
        start = time.perf_counter()
        if with_dbos and config.deployment in PAIRED_DEPLOYMENTS:
            row, answers, errors = measure_paired(config, options)
            _, pooled, pooled_errors, paired_with = beside.setdefault(
                (config.store, config.concurrency), (config.runs, [], [], []))
            pooled.extend(answers)
            pooled_errors.extend(errors)
            paired_with.extend([config.deployment] * len(answers))
        else:
            row = measure_row(config, options)
        measured[config] = row
        print(f"  throughput: {config.label}: {_brief(row)} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = [measured[config] for config in configs(options)]
    for (store, concurrency), (runs, answers, errors, paired_with) in sorted(
            beside.items(), key=lambda item: (list(STORES).index(item[0][0]), item[0][1])):
        rows.append(dbos_side.row(store, concurrency, runs, answers, errors, paired_with))
    return rows


def _brief(row: Row) -> str:
    if not row.samples:
        return "FAILED " + "; ".join(row.extra.get("errors", []))
    text = f"median {row.median:.1f} runs/s over {len(row.samples)} rep(s)"
    ratios = row.extra.get("pair_ratios")
    if ratios:
        text += (f"; Aiki/DBOS per pair {', '.join(f'{r:.2f}' for r in ratios)}"
                 f" (median {statistics.median(ratios):.2f})")
    elif "pairs" in row.extra:
        text += "; no Aiki/DBOS pair completed"
    return text


SUITE = Suite(name="throughput", run=run)
