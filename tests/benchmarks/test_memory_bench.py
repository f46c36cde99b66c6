"""The memory suite, tiny: its runs reach the states it measures, and it reads finite
figures a table shows with their target."""

from __future__ import annotations

import math
from pathlib import Path

import trio

from benchmarks import memory, report
from benchmarks.suite import Row


def test_the_memory_suite_measures_waiting_and_queued_runs(tmp_path: Path) -> None:
    result = trio.run(memory.measure, f"sqlite:///{tmp_path / 'm.db'}", 30, 30, 0.05)
    # (measure returns only once WARM + 30 runs are waiting and WARM + 30 queued.)
    assert all(math.isfinite(result[k]) for k in ("waiting_b", "queued_b", "base_mb"))
    assert result["base_mb"] > 0
    row = Row("memory", "sqlite, 30 runs waiting", "memory per run", "B",
              [result["waiting_b"]], {"goal": memory.GOAL_BYTES, "met": True,
                                      "target": f"<= {memory.GOAL_BYTES} B a run"})
    report.annotate([row])
    assert "met (<= 512 B a run)" in report.table([row])
