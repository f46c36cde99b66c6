"""The interface every benchmark suite implements (issue 6).

A suite module exposes ``SUITE = Suite(name=..., run=...)``. ``run(options)`` is a plain
(synchronous) function: it runs its own ``trio.run`` (or subprocesses) as it needs, and
returns one ``Row`` per measured configuration, each with one sample per repetition.
``benchmarks/__main__.py`` lists the suites, runs them, prints one table per suite and writes
every row to JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from benchmarks.postgres import PostgresServer


@attrs.frozen
class Options:
    """What the command line asked for, and the shared PostgreSQL server.

    ``quick``: a smoke run (1 repetition, small counts). ``reps``: repetitions per row
    (``--reps``; already 1 when ``quick``). ``postgres``: one server for the whole bench run,
    or None when PostgreSQL rows are not wanted or it could not start (skip those rows, and
    say so in a row's ``extra`` or on stderr). ``suites``: the suites this run runs (the
    ``dbos`` suite measures nothing when ``throughput`` runs too: that suite measures the DBOS
    rows, interleaved with its own). ``only``: ``--only`` words that select throughput and
    DBOS rows (see :func:`selected`); other suites ignore them.
    """

    quick: bool = False
    reps: int = 3
    postgres: PostgresServer | None = None
    suites: tuple[str, ...] = ()
    only: tuple[str, ...] = ()


# ``--only`` words, by what they select. Words of one kind are alternatives (``sqlite,postgres``),
# kinds combine (``sqlite,embedded,100``: SQLite rows, embedded, 100 concurrent).
ONLY_WORDS: dict[str, tuple[str, ...]] = {
    "store": ("sqlite", "postgres"),
    "deployment": ("embedded", "ws1", "ws2"),
    "concurrency": ("1", "100", "1000"),
}


def unknown_only_words(only: Sequence[str]) -> list[str]:
    known = {word for words in ONLY_WORDS.values() for word in words}
    return [word for word in only if word not in known]


def selected(only: Sequence[str], **tags: object) -> bool:
    """Whether a row with these tags (``store=``, ``deployment=``, ``concurrency=``) is wanted
    by the ``--only`` words: for every kind with words given, the row's tag is one of them. A
    kind the row has no tag for does not count (DBOS rows have no deployment)."""
    for kind, words in ONLY_WORDS.items():
        asked = [word for word in only if word in words]
        if asked and kind in tags and str(tags[kind]) not in asked:
            return False
    return True


@attrs.frozen
class Row:
    """One measured configuration: one sample per repetition.

    ``metric`` names what the samples are ("runs/s", "p50", "commits/s", ...), ``unit`` their
    unit. ``extra`` holds anything else worth printing or keeping in the JSON (counts, the
    per-task cost, ratios, notes); its values must be JSON-encodable.
    """

    suite: str
    label: str
    metric: str
    unit: str
    samples: list[float]
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite, "label": self.label, "metric": self.metric,
            "unit": self.unit, "samples": list(self.samples), "min": _finite(self.min),
            "median": _finite(self.median), "max": _finite(self.max), "extra": self.extra,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@attrs.frozen
class Suite:
    name: str
    run: Callable[[Options], list[Row]]


def store_urls(options: Options, directory: str, prefix: str,
               ) -> list[tuple[str, Callable[[str], str]]]:
    """The stores a suite of embedded rows measures, each with a maker of a fresh store's
    URL from a tag: SQLite (a file in ``directory``), and PostgreSQL when the run has a
    server (a fresh database)."""
    stores: list[tuple[str, Callable[[str], str]]] = [
        ("sqlite", lambda tag: f"sqlite:///{directory}/{prefix}{tag}.db")]
    pg = options.postgres
    if pg is not None:
        stores.append(("postgres", lambda tag: pg.fresh_database(f"{prefix}{tag}")))
    return stores
