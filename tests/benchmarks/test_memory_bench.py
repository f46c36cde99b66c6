"""The memory suite, tiny: its runs reach the states it measures, it reads finite figures,
and its rows are judged against the goal by what they measured."""

from __future__ import annotations

import math
from pathlib import Path

import trio

from benchmarks import memory, report


def test_the_memory_suite_measures_waiting_and_queued_runs(tmp_path: Path) -> None:
    result = trio.run(memory.measure, f"sqlite:///{tmp_path / 'm.db'}", 30, 30, 0.05)
    # (measure returns only once WARM + 30 runs are waiting and WARM + 30 queued.)
    assert all(math.isfinite(result[k]) for k in ("waiting_b", "queued_b", "base_mb"))
    assert result["base_mb"] > 0
    rows = memory.rows_of("sqlite", 30, result)
    report.annotate(rows)
    assert [r.label for r in rows] == ["sqlite, 30 runs waiting", "sqlite, 30 runs queued"]
    text = report.table(rows)
    for row in rows:
        assert row.extra["met"] == (row.samples[0] <= memory.GOAL_BYTES)
    # One row over the goal reads missed.
    over = memory.rows_of("sqlite", 30, {**result, "waiting_b": memory.GOAL_BYTES + 1.0})
    report.annotate(over)
    assert "missed (<= 512 B a run)" in report.table(over)
    assert "(<= 512 B a run)" in text
