"""Metrics: the one sink every component counts into, injected beside the clock (``Sources``).

A :class:`Metrics` holds plain numbers in dicts: counters, gauges and histograms keyed by
their label values. Nothing here is global: each ``Sources`` carries its own sink, so a test
or the simulation reads exactly what its own cluster counted, deterministically (durations
are measured on ``trio.current_time()``, which is virtual under a ``MockClock``). The
Prometheus text format is produced only when scraped (:mod:`aiki.observability`), through
prometheus-client, so counting costs a dict update and no lock.

Every metric is declared once in :data:`CATALOG`, with its help text and label names; the
README's table of metrics is checked against it. Label values carry what varies (a workflow,
a run event, a store op, an error class), so a new run state or store op shows up as a new
label value without new code here.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

Kind = Literal["counter", "gauge", "histogram"]

# Seconds: from a millisecond to an hour, for latencies and lateness alike.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0, 900.0, 3600.0)
COUNTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)


@attrs.frozen(eq=False)
class Metric:
    """One metric's declaration. ``side``: which process serves it (``server`` or ``worker``;
    an embedded process serves both). Compared and hashed by identity: each is declared once,
    and the sink looks one up on every count."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    side: str = "server"


# -- the server --------------------------------------------------------------------------------
RUNS = Metric(
    "aiki_runs_total", "counter",
    "Run lifecycle events committed by this server: enqueued (by a client; a schedule's "
    "runs are not), forked, started (claimed by a worker), completed, failed, retried, "
    "paused, resumed, cancelled, and whatever state a newer operation moves a run to.",
    ("workflow", "version", "event"))
RUNS_NOW = Metric(
    "aiki_runs_in_state", "gauge",
    "Runs not finished, by state (queued, running, waiting, ...), read from the store when "
    "scraped: every server of a shared store reports the same numbers.",
    ("workflow", "version", "state"))
OLDEST_QUEUED = Metric(
    "aiki_oldest_queued_run_age_seconds", "gauge",
    "How long the longest-queued run has been waiting for a worker, read from the store when "
    "scraped.", ("workflow", "version"))
DISPATCH_LATENCY = Metric(
    "aiki_dispatch_latency_seconds", "histogram",
    "From enqueue to the first claim by a worker.", ("workflow", "version"), SECONDS)
SCHEDULE_LATENESS = Metric(
    "aiki_schedule_lateness_seconds", "histogram",
    "How late the timer woke runs whose time had come (kind wait: a sleep, an event timeout, "
    "a retry delay) or started schedules' occurrences (kind schedule), after their due time.",
    ("kind",), SECONDS)
TASK_ATTEMPTS = Metric(
    "aiki_task_attempts_total", "counter",
    "Task attempts whose outcome was committed: completed, retrying (failed, will run again) "
    "or failed (for good); failures are every outcome but completed.", ("task", "outcome"))
STORE_TRANSACTIONS = Metric(
    "aiki_store_transactions_total", "counter",
    "Store transactions (group commits) the StoreWriter applied, committed or failed.",
    ("result",))
STORE_OPS_PER_COMMIT = Metric(
    "aiki_store_ops_per_commit", "histogram",
    "Operations in one committed transaction (group commit batch size).", (), COUNTS)
STORE_COMMIT_SECONDS = Metric(
    "aiki_store_commit_seconds", "histogram",
    "Time to apply one transaction, committed or not.", (), SECONDS)
STORE_OPS = Metric(
    "aiki_store_ops_total", "counter",
    "Store operations applied, by operation and outcome: ok, or the error that refused it "
    "(StaleLease, StepConflict, RunNotFound, ...).", ("op", "outcome"))
STORE_ERRORS = Metric(
    "aiki_store_errors_total", "counter",
    "Transactions that failed as a whole (the store unreachable or broken), by error.",
    ("error",))
STALE_WRITES = Metric(
    "aiki_stale_writes_refused_total", "counter",
    "Writes refused because their lease was no longer the run's (fencing), by operation.",
    ("op",))
LEASES_EXPIRED = Metric(
    "aiki_leases_expired_total", "counter",
    "Leases that ran out without a heartbeat; their runs went back to the queue.")
PUSHED_BEFORE_COMMIT = Metric(
    "aiki_runs_pushed_before_commit_total", "counter",
    "Runs pushed to an idle worker while the enqueue's claim of its slot committed "
    "(PostgreSQL), by what the commit said: confirmed, or revoked (the claim leased another "
    "run, or failed, or its fate is unknown).", ("outcome",))
WORKERS = Metric(
    "aiki_workers_connected", "gauge", "Workers connected to this server.")
SLOTS = Metric(
    "aiki_worker_slots", "gauge",
    "Run slots of the connected workers: busy, free (free excludes draining workers).",
    ("state",))
SESSIONS = Metric(
    "aiki_sessions_open", "gauge", "Connections (workers and clients) this server serves.")
MAILBOX_DROPPED = Metric(
    "aiki_mailbox_dropped_total", "counter",
    "Messages an actor's mailbox refused: full (the actor is behind) or closed (it stopped).",
    ("mailbox", "reason"))

# -- a worker ----------------------------------------------------------------------------------
TASK_DURATION = Metric(
    "aiki_worker_task_duration_seconds", "histogram",
    "Duration of task attempts run by this worker, by task and outcome "
    "(completed, failed, cancelled).", ("task", "outcome"), SECONDS, "worker")
WORKER_SLOTS_USED = Metric(
    "aiki_worker_slots_in_use", "gauge", "Runs this worker holds now.", ("worker",), (),
    "worker")
WORKER_SLOTS_MAX = Metric(
    "aiki_worker_slots_max", "gauge", "Runs this worker may hold at once (max_concurrent_runs).",
    ("worker",), (), "worker")
RECONNECTS = Metric(
    "aiki_worker_reconnects_total", "counter",
    "Times this worker's connection to the server was replaced after it was lost.",
    ("worker",), (), "worker")

CATALOG: tuple[Metric, ...] = (
    RUNS, RUNS_NOW, OLDEST_QUEUED, DISPATCH_LATENCY, SCHEDULE_LATENESS, TASK_ATTEMPTS,
    STORE_TRANSACTIONS, STORE_OPS_PER_COMMIT, STORE_COMMIT_SECONDS, STORE_OPS, STORE_ERRORS,
    STALE_WRITES, LEASES_EXPIRED, PUSHED_BEFORE_COMMIT, WORKERS, SLOTS, SESSIONS, MAILBOX_DROPPED,
    TASK_DURATION, WORKER_SLOTS_USED, WORKER_SLOTS_MAX, RECONNECTS,
)
_BY_NAME = {m.name: m for m in CATALOG}


def metric(name: str) -> Metric:
    """The declared metric called ``name``; KeyError names what is declared."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no metric {name!r}; declared: {', '.join(sorted(_BY_NAME))}") from None


@attrs.define(eq=False)
class Histogram:
    """Counts per bucket (not cumulative; the last slot is +Inf), their sum and count."""

    buckets: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with (inf, count)."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """The sink. ``inc``, ``set`` and ``observe`` take a declared :class:`Metric` and its
    label values in declaration order; ``value`` and ``histogram`` read them back.

    Not thread-safe, and needs not be: everything that counts runs in the one Trio thread
    (a task body run in a thread is measured by the Run actor, outside the thread).
    """

    enabled = True

    def __init__(self) -> None:
        self._values: dict[Metric, dict[tuple[str, ...], Any]] = {m: {} for m in CATALOG}

    def inc(self, m: Metric, labels: tuple[str, ...] = (), by: float = 1.0) -> None:
        values = self._values[m]
        values[labels] = values.get(labels, 0.0) + by

    def set(self, m: Metric, value: float, labels: tuple[str, ...] = ()) -> None:
        self._values[m][labels] = float(value)

    def replace(self, m: Metric, values: Mapping[tuple[str, ...], float]) -> None:
        """Set a gauge's every series at once: series not in ``values`` are gone (a workflow
        with no queued run left does not linger at its last value)."""
        self._values[m] = {labels: float(v) for labels, v in values.items()}

    def observe(self, m: Metric, value: float, labels: tuple[str, ...] = ()) -> None:
        series = self._values[m]
        hist = series.get(labels)
        if hist is None:
            hist = series[labels] = Histogram(m.buckets, [0] * (len(m.buckets) + 1))
        hist.counts[bisect.bisect_left(m.buckets, value)] += 1
        hist.sum += value
        hist.count += 1

    # -- reading ---------------------------------------------------------------------------
    def value(self, m: Metric, labels: tuple[str, ...] = ()) -> float:
        """A counter's or gauge's value for these labels (0 if never counted)."""
        got = self._values[m].get(labels, 0.0)
        if isinstance(got, Histogram):
            raise TypeError(f"{m.name} is a histogram: read it with histogram()")
        return float(got)

    def total(self, m: Metric, **match: str) -> float:
        """The sum of a counter's or gauge's series whose labels match ``match``."""
        idx = {name: m.labels.index(name) for name in match}
        return sum(float(v) for labels, v in self._values[m].items()
                   if all(labels[i] == match[name] for name, i in idx.items()))

    def histogram(self, m: Metric, labels: tuple[str, ...] = ()) -> Histogram | None:
        got = self._values[m].get(labels)
        return got if isinstance(got, Histogram) else None

    def series(self, m: Metric) -> dict[tuple[str, ...], Any]:
        """Every series of ``m`` (a copy): label values → a number or a :class:`Histogram`."""
        return dict(self._values[m])

    def snapshot(self, metrics: Iterable[Metric] = CATALOG) -> dict[str, dict[tuple[str, ...],
                                                                              Any]]:
        return {m.name: dict(self._values[m]) for m in metrics}


class NoMetrics(Metrics):
    """A sink that counts nothing: for measuring what counting costs (``make bench``)."""

    enabled = False

    def inc(self, m: Metric, labels: tuple[str, ...] = (), by: float = 1.0) -> None:
        pass

    def set(self, m: Metric, value: float, labels: tuple[str, ...] = ()) -> None:
        pass

    def replace(self, m: Metric, values: Mapping[tuple[str, ...], float]) -> None:
        pass

    def observe(self, m: Metric, value: float, labels: tuple[str, ...] = ()) -> None:
        pass
