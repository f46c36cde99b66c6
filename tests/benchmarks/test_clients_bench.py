"""The clients benchmark, tiny: every client kind makes its round trips against a real server
and worker, and each row carries its ratio to the Trio client (no timing is judged)."""

from __future__ import annotations

import math

from benchmarks import clients


def test_every_client_kind_is_measured_with_its_ratio_to_trio() -> None:
    samples = clients.measure(runs=6, concurrency=3, reps=1)
    assert set(samples) == {"trio", "asyncio", "sync"}
    for kind, values in samples.items():
        assert len(values) == 1 and all(math.isfinite(v) and v > 0 for v in values), kind
    assert clients.split_evenly(7, 3) == [3, 2, 2]


def test_every_task_style_is_measured_with_its_ratio_to_trio() -> None:
    from benchmarks import task_styles
    from benchmarks.suite import Options

    rows = task_styles.run(Options(quick=True, reps=1))
    assert [r.extra["style"] for r in rows] == ["trio", "thread", "asyncio"]
    assert all(len(r.samples) == 1 and math.isfinite(r.median) and r.median > 0 for r in rows)
    assert rows[0].extra["over_trio"] == 1.0
