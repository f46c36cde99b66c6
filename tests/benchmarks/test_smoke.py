"""The throughput suite's embedded SQLite rows, tiny and quick: they run, every run completes
with the right result, and the numbers are positive and finite (no DBOS, no PostgreSQL)."""

from __future__ import annotations

import math

from benchmarks import report, throughput
from benchmarks.suite import Options, Row
from benchmarks.workload import TASKS_PER_RUN


def test_embedded_sqlite_rows_are_produced_and_every_run_completes() -> None:
    options = Options(quick=True, reps=1, postgres=None)
    configs = [throughput.Config("sqlite", "embedded", 1, 3),
               throughput.Config("sqlite", "embedded", 10, 20)]
    rows = [throughput.measure_row(config, options, warmup=2) for config in configs]

    for config, row in zip(configs, rows, strict=True):
        assert "errors" not in row.extra, row.extra.get("errors")
        assert row.suite == "throughput" and row.metric == "runs/s"
        assert len(row.samples) == 1
        assert all(math.isfinite(s) and s > 0 for s in row.samples)
        assert all(math.isfinite(ms) and ms > 0 for ms in row.extra["per_task_ms"])
        # drive() counts a run only when its result is x + 3, and fails on a wrong one.
        assert row.extra["completed"] == [config.runs]
        assert row.extra["tasks_per_run"] == TASKS_PER_RUN

    baseline = Row("baseline", "SQLite", "commits/s", "1/s", [250.0], extra={"store": "sqlite"})
    dbos = Row("dbos", "DBOS", "runs/s", "1/s", [10.0],
               extra={"system": "dbos", "store": "sqlite", "concurrency": 10})
    everything = [baseline, *rows, dbos]
    report.annotate(everything)
    assert math.isfinite(rows[0].extra["commit_multiple"]) and rows[0].extra["commit_multiple"] > 0
    assert rows[1].extra["aiki_over_dbos"] == rows[1].median / 10.0
    text = report.table(rows)
    assert "SQLite · embedded · one at a time" in text and "Aiki/DBOS" in text
