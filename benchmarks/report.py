"""Tables: one per suite, min / median / max over repetitions, plus ratio columns.

A table has one line per row: its label, the display columns the suite put in
``extra["columns"]`` (a dict of column name to text), the metric's min / median / max, and
the columns in ``extra["ratios"]`` (filled in by :func:`annotate`). Tables are Markdown, so
the output can be pasted into the README as it is.

:func:`annotate` links suites measured in the same run: each Aiki throughput row gets its
per-task cost (median) as a multiple of one single-row commit of the same store (the
``baseline`` suite, or, for the rows that measured one beside each repetition, the median of
those per-pair multiples), and its throughput as a ratio to the DBOS row with the same store and
concurrency; > 1 means Aiki is faster. Rows the throughput suite measured interleaved with
DBOS (``extra["pair_ratios"]``: Aiki's runs/s over DBOS's in adjacent repetitions) get the
median of those ratios, with min and max; only those are read by the target lines. Other rows
(``ws, 2 workers``) get the ratio of the two rows' medians, marked "unpaired".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.suite import Row


def fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def annotate(rows: Sequence[Row]) -> None:
    """Add the commit multiple and the Aiki/DBOS ratio to every throughput row."""
    commit_ms = {r.extra.get("store"): 1000.0 / r.median
                 for r in rows if r.suite == "baseline" and r.samples}
    dbos = {(r.extra.get("store"), r.extra.get("concurrency")): r
            for r in rows if r.suite == "dbos"}
    for row in rows:
        _targets(row)
        if row.suite == "dbos" and row.samples:
            ratios = row.extra.setdefault("ratios", {})
            per_task = _median(row.extra.get("per_task_ms", []))
            ratios["ms/task (median)"] = fmt(per_task)
            base = commit_ms.get(row.extra.get("store"))
            if base:
                row.extra["commit_multiple"] = per_task / base
                ratios["× one commit"] = fmt(per_task / base)
        if row.suite != "throughput" or row.extra.get("system") != "aiki":
            continue
        ratios = row.extra.setdefault("ratios", {})
        per_task = _median(row.extra.get("per_task_ms", []))
        ratios["ms/task (median)"] = fmt(per_task)
        base = commit_ms.get(row.extra.get("store"))
        multiples = row.extra.get("pair_commit_multiples", [])
        if multiples:
            # One commit measured next to each Aiki repetition: the median of the multiples.
            row.extra["commit_multiple"] = statistics.median(multiples)
            row.extra["commit_multiple_pairs"] = len(multiples)
            ratios["× one commit"] = (f"{fmt(statistics.median(multiples))} "
                                      f"({len(multiples)} pair{'s' if len(multiples) > 1 else ''})")
        elif base and row.samples:
            row.extra["commit_multiple"] = per_task / base
            ratios["× one commit"] = fmt(per_task / base)
        else:
            ratios["× one commit"] = "–"
        pair_ratios = [r for r in row.extra.get("pair_ratios", [])
                       if r is not None and math.isfinite(r)]
        peer = dbos.get((row.extra.get("store"), row.extra.get("concurrency")))
        if pair_ratios:
            # Interleaved with DBOS (see benchmarks/throughput.py): the median of the ratios
            # of adjacent repetitions, with their range; the only ratios targets read.
            row.extra["aiki_over_dbos"] = statistics.median(pair_ratios)
            row.extra["aiki_over_dbos_min"] = min(pair_ratios)
            row.extra["aiki_over_dbos_max"] = max(pair_ratios)
            row.extra["aiki_over_dbos_pairs"] = len(pair_ratios)
            row.extra["aiki_over_dbos_paired"] = True
            ratios["Aiki/DBOS"] = (f"{statistics.median(pair_ratios):.2f}× "
                                   f"({min(pair_ratios):.2f}–{max(pair_ratios):.2f}, "
                                   f"{len(pair_ratios)} pair{'s' if len(pair_ratios) > 1 else ''})")
        elif peer is not None and peer.samples and row.samples:
            # Not measured beside DBOS (ws, 2 workers; or the two suites run apart): medians
            # of rows measured at other times, shown, never read by a target.
            row.extra["aiki_over_dbos"] = row.median / peer.median
            row.extra["aiki_over_dbos_paired"] = False
            ratios["Aiki/DBOS"] = f"{row.median / peer.median:.2f}× unpaired"
        else:
            ratios["Aiki/DBOS"] = "–"


def _targets(row: Row) -> None:
    """Show what the latency, scale, idle and memory suites keep in ``extra``: the target
    and whether this run met it, the ratio to an empty store, the replay cost per task."""
    extra = row.extra
    ratios = extra.setdefault("ratios", {}) if row.suite in ("latency", "scale", "idle",
                                                                "memory") else None
    if ratios is None:
        return
    if "ratio_vs_empty" in extra:
        ratios["× empty store"] = f"{extra['ratio_vs_empty']:.2f}"
    if "replay_per_task_ms" in extra:
        ratios["replay µs/task"] = fmt(extra["replay_per_task_ms"] * 1000.0)
    if "linear" in extra:
        ratios["× 10× fewer tasks"] = f"{extra.get('replay_ratio_vs_10x_fewer', math.nan):.1f}"
    if "met" in extra:
        target = extra.get("target") or (f"<= {fmt(extra['target_ms'])} ms"
                                         if "target_ms" in extra else "")
        ratios["target"] = f"{'met' if extra['met'] else 'missed'} ({target})"


def table(rows: Sequence[Row]) -> str:
    if not rows:
        return "(no rows)"
    pre = _keys(r.extra.get("columns", {}) for r in rows)
    post = _keys(r.extra.get("ratios", {}) for r in rows)
    metric = rows[0].metric if len({r.metric for r in rows}) == 1 else "value"
    header = ["", *pre, f"{metric} min", "median", "max", "reps", *post]
    lines = []
    for r in rows:
        cols: dict[str, Any] = r.extra.get("columns", {})
        ratios: dict[str, Any] = r.extra.get("ratios", {})
        stats = [fmt(r.min), fmt(r.median), fmt(r.max)] if r.samples else ["FAILED", "", ""]
        label = r.label if metric != "value" else f"{r.label} ({r.metric}, {r.unit})"
        lines.append([label, *(str(cols.get(k, "")) for k in pre), *stats,
                      str(len(r.samples)), *(str(ratios.get(k, "")) for k in post)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _keys(dicts: Iterable[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        for k in d:
            if k not in keys:
                keys.append(k)
    return keys


def errors(rows: Sequence[Row]) -> list[str]:
    return [f"{r.label}: {e}" for r in rows for e in r.extra.get("errors", [])]


# -- issue 10's targets: one line each, from the rows of this run --------------------------
# (name, what it compares, goal, "min" (at least) or "max" (at most))
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("sqlite-100-vs-dbos", "SQLite, embedded, 100 concurrent: Aiki/DBOS", 10.0, "min"),
    ("sqlite-100-ws-vs-dbos", "SQLite, ws 1 worker, 100 concurrent: Aiki/DBOS", 10.0, "min"),
    ("postgres-100-vs-dbos", "PostgreSQL, embedded, 100 concurrent: Aiki/DBOS", 10.0, "min"),
    ("postgres-100-ws-vs-dbos", "PostgreSQL, ws 1 worker, 100 concurrent: Aiki/DBOS", 10.0,
     "min"),
    ("sqlite-1-vs-dbos", "SQLite, embedded, one at a time: Aiki/DBOS", 2.0, "min"),
    ("postgres-1-vs-dbos", "PostgreSQL, embedded, one at a time: Aiki/DBOS", 2.0, "min"),
    ("sqlite-1-task-vs-commit", "SQLite, embedded, one at a time: ms/task over one commit",
     2.5, "max"),
    ("postgres-1-task-vs-commit",
     "PostgreSQL, embedded, one at a time: ms/task over one commit", 3.0, "max"),
    ("sqlite-dispatch-p50", "SQLite, ws: enqueue -> first task start p50 (ms)", 3.0, "max"),
    ("sqlite-dispatch-p99", "SQLite, ws: enqueue -> first task start p99 (ms)", 10.0, "max"),
    ("postgres-dispatch-p50", "PostgreSQL, ws: enqueue -> first task start p50 (ms)", 5.0,
     "max"),
)


def _target_values(rows: Sequence[Row]) -> dict[str, tuple[float, int, str]]:
    """Each target's measured value, how many repetitions (or pairs) it comes from and how it
    was measured, for the targets this run has rows for. An Aiki/DBOS ratio counts only when
    measured in interleaved pairs."""
    values: dict[str, tuple[float, int, str]] = {}
    deployments = {"embedded": "", "ws1": "-ws"}
    for row in rows:
        extra = row.extra
        if row.suite == "throughput" and extra.get("system") == "aiki":
            store, concurrency = extra.get("store"), extra.get("concurrency")
            tag = deployments.get(str(extra.get("deployment")))
            if tag is None:
                continue
            if "aiki_over_dbos" in extra and extra.get("aiki_over_dbos_paired"):
                n = extra["aiki_over_dbos_pairs"]
                values[f"{store}-{concurrency}{tag}-vs-dbos"] = (
                    extra["aiki_over_dbos"], n,
                    f"median of {n} interleaved pair{'s' if n > 1 else ''}, "
                    f"{extra['aiki_over_dbos_min']:.2f}-{extra['aiki_over_dbos_max']:.2f}")
            if "commit_multiple" in extra and tag == "" and concurrency == 1:
                n = extra.get("commit_multiple_pairs")
                values[f"{store}-1-task-vs-commit"] = (
                    (extra["commit_multiple"], n,
                     f"median of {n} interleaved pair{'s' if n > 1 else ''}") if n else
                    (extra["commit_multiple"], len(row.samples),
                     f"median of {len(row.samples)} rep(s) over the baseline suite's median"))
        elif row.suite == "latency" and row.samples and row.metric in (
                "dispatch p50", "dispatch p99"):
            store = row.label.split(",")[0]
            values[f"{store}-dispatch-{row.metric.split()[-1]}"] = (
                _median(row.samples), len(row.samples), f"median of {len(row.samples)} rep(s)")
    return values


MIN_REPS = 3  # issue 10: target ratios come from at least 3 repetitions


def target_lines(rows: Sequence[Row], quick: bool) -> list[str]:
    """``target NAME: VALUE (goal >= G) met|missed`` for every target this run measured,
    marked when it is a smoke run (``--quick``) or has fewer than 3 repetitions or pairs."""
    values = _target_values(rows)
    lines = []
    for name, what, goal, kind in TARGETS:
        value, counted, how = values.get(name, (math.nan, 0, ""))
        if not math.isfinite(value):
            continue
        met = value >= goal if kind == "min" else value <= goal
        unit = " ms" if "dispatch" in name else "x"
        if quick:
            mark = " [--quick: a smoke run, not a measurement]"
        elif counted < MIN_REPS:
            mark = f" [{counted} rep(s): a target needs at least {MIN_REPS}]"
        else:
            mark = ""
        lines.append(f"target {name}: {value:.2f}{unit} (goal {'>=' if kind == 'min' else '<='} "
                     f"{goal:g}{unit}) {'met' if met else 'missed'}{mark}"
                     f"  -- {what} ({how})")
    return lines
