"""Aiki beside DBOS: repetitions alternate which side goes first, each pair gives one ratio,
the report takes their median (with min and max), and only paired ratios make target lines.
Fake sides stand in for the measurements (no DBOS, no store): what is checked is the order
and the arithmetic, not timings."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import report, throughput
from benchmarks.suite import Row, selected, unknown_only_words


def _sample(runs_per_second: float, runs: int = 100) -> throughput.Sample:
    return throughput.Sample(elapsed=runs / runs_per_second, runs=runs, completed=runs)


def _dbos(runs_per_second: float, runs: int = 100) -> dict[str, Any]:
    return {"elapsed": runs / runs_per_second, "runs": runs, "completed": runs,
            "dbos_version": "9.9", "journal_mode": "wal"}


def test_sides_alternate_which_goes_first_and_each_pair_has_its_ratio() -> None:
    calls: list[str] = []
    aiki = {0: 400.0, 1: 200.0, 2: 300.0, 3: 100.0}
    dbos = {0: 100.0, 1: 80.0, 2: 50.0, 3: 100.0}

    def aiki_once(rep: int) -> throughput.Sample:
        calls.append(f"aiki{rep}")
        return _sample(aiki[rep])

    def dbos_once(rep: int) -> dict[str, Any]:
        calls.append(f"dbos{rep}")
        return _dbos(dbos[rep])

    errors: dict[str, list[str]] = {"aiki": [], "dbos": []}
    pairs = throughput.alternate(4, aiki_once, dbos_once, errors)

    assert calls == ["aiki0", "dbos0", "dbos1", "aiki1", "aiki2", "dbos2", "dbos3", "aiki3"]
    assert [p.first for p in pairs] == ["aiki", "dbos", "aiki", "dbos"]
    assert [p.ratio for p in pairs] == pytest.approx([4.0, 2.5, 6.0, 1.0])
    assert errors == {"aiki": [], "dbos": []}


def test_a_failed_side_leaves_its_pair_without_a_ratio_and_its_error_kept() -> None:
    def aiki_once(rep: int) -> throughput.Sample:
        return _sample(300.0)

    def dbos_once(rep: int) -> dict[str, Any]:
        if rep == 1:
            raise RuntimeError("DBOS subprocess failed")
        return _dbos(100.0)

    errors: dict[str, list[str]] = {"aiki": [], "dbos": []}
    pairs = throughput.alternate(3, aiki_once, dbos_once, errors)

    assert [p.ratio for p in pairs] == pytest.approx([3.0, None, 3.0])
    assert pairs[1].aiki is not None and pairs[1].dbos is None
    assert errors["dbos"] == ["RuntimeError: DBOS subprocess failed"] and errors["aiki"] == []


def _rows(pair_ratios: list[tuple[float, float]], deployment: str = "embedded",
          concurrency: int = 100) -> list[Row]:
    """An Aiki row with pairs (aiki runs/s, dbos runs/s), and the pooled DBOS row, as the
    throughput suite makes them."""
    config = throughput.Config("sqlite", deployment, concurrency, 100)
    pairs = [throughput.Pair(i, "aiki" if i % 2 == 0 else "dbos", _sample(a), _dbos(d))
             for i, (a, d) in enumerate(pair_ratios)]
    aiki = throughput.aiki_row(config, [p.aiki for p in pairs if p.aiki], [], pairs=pairs)
    from benchmarks import dbos_side

    dbos = dbos_side.row("sqlite", concurrency, 100, [p.dbos for p in pairs if p.dbos], [],
                         [deployment] * len(pairs))
    return [aiki, dbos]


def test_the_ratio_is_the_median_of_pair_ratios_not_a_ratio_of_medians() -> None:
    # Load drifts: the pairs are 4x, 5x and 2x; the medians' ratio would be 300/100 = 3x.
    aiki, dbos = _rows([(400.0, 100.0), (300.0, 60.0), (100.0, 50.0)])
    report.annotate([aiki, dbos])

    assert aiki.extra["aiki_over_dbos"] == pytest.approx(4.0)
    assert aiki.extra["aiki_over_dbos_min"] == pytest.approx(2.0)
    assert aiki.extra["aiki_over_dbos_max"] == pytest.approx(5.0)
    assert aiki.extra["aiki_over_dbos_pairs"] == 3 and aiki.extra["aiki_over_dbos_paired"]
    assert aiki.extra["ratios"]["Aiki/DBOS"] == "4.00× (2.00–5.00, 3 pairs)"
    # The DBOS row states DBOS's configuration and what it was measured beside.
    assert dbos.extra["columns"]["DBOS settings"] == "journal WAL, synchronous FULL"
    assert dbos.extra["columns"]["measured beside"] == "embedded"
    assert dbos.samples == pytest.approx([100.0, 60.0, 50.0])

    lines = report.target_lines([aiki, dbos], quick=False)
    assert lines == [
        "target sqlite-100-vs-dbos: 4.00x (goal >= 10x) missed  -- SQLite, embedded, 100 "
        "concurrent: Aiki/DBOS (median of 3 interleaved pairs, 2.00-5.00)"]
    assert report.target_lines([aiki, dbos], quick=True)[0].startswith(
        "target sqlite-100-vs-dbos: 4.00x (goal >= 10x) missed [--quick: a smoke run")


def test_fewer_than_three_pairs_is_said_on_the_target_line() -> None:
    aiki, dbos = _rows([(400.0, 100.0), (300.0, 100.0)])
    report.annotate([aiki, dbos])
    (line,) = report.target_lines([aiki, dbos], quick=False)
    assert "3.50x" in line and "[2 rep(s): a target needs at least 3]" in line


def test_an_unpaired_ratio_is_shown_but_makes_no_target_line() -> None:
    # A row measured apart from DBOS (no pairs): the ratio of medians, marked, no target.
    config = throughput.Config("sqlite", "embedded", 100, 100)
    aiki = throughput.aiki_row(config, [_sample(300.0)], [])
    dbos = Row("dbos", "DBOS", "runs/s", "1/s", [100.0],
               extra={"system": "dbos", "store": "sqlite", "concurrency": 100})
    report.annotate([aiki, dbos])
    assert aiki.extra["aiki_over_dbos"] == pytest.approx(3.0)
    assert aiki.extra["aiki_over_dbos_paired"] is False
    assert aiki.extra["ratios"]["Aiki/DBOS"] == "3.00× unpaired"
    assert report.target_lines([aiki, dbos], quick=False) == []


def test_ws_one_worker_pairs_make_the_ws_target() -> None:
    aiki, dbos = _rows([(200.0, 100.0), (300.0, 100.0), (250.0, 100.0)], deployment="ws1")
    report.annotate([aiki, dbos])
    (line,) = report.target_lines([aiki, dbos], quick=False)
    assert line.startswith("target sqlite-100-ws-vs-dbos: 2.50x (goal >= 10x) missed  --")
    assert math.isfinite(aiki.extra["aiki_over_dbos"])


def test_only_words_select_rows_by_store_deployment_and_concurrency() -> None:
    assert selected((), store="sqlite", deployment="ws2", concurrency=1000)
    only = ("sqlite", "embedded", "100")
    assert selected(only, store="sqlite", deployment="embedded", concurrency=100)
    assert not selected(only, store="postgres", deployment="embedded", concurrency=100)
    assert not selected(only, store="sqlite", deployment="ws1", concurrency=100)
    assert not selected(only, store="sqlite", deployment="embedded", concurrency=1)
    # DBOS rows have no deployment: a deployment word does not leave them out.
    assert selected(only, store="sqlite", concurrency=100)
    # Words of one kind are alternatives.
    assert selected(("sqlite", "postgres"), store="postgres", concurrency=1)
    assert unknown_only_words(["sqlite", "mysql", "10"]) == ["mysql", "10"]


def test_an_unknown_only_word_is_refused_by_name_before_anything_runs(
        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["throughput", "--only", "sqlite,mysql"])
    assert exited.value.code == 2
    assert "unknown --only word(s) mysql" in capsys.readouterr().err


def test_the_suite_pairs_embedded_and_ws1_rows_measures_embedded_first_and_pools_dbos(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import dbos_side
    from benchmarks.suite import Options

    measured: list[str] = []

    def fake_paired(config: throughput.Config, options: Options
                    ) -> tuple[Row, list[dict[str, Any]], list[str]]:
        measured.append(f"{config.store} {config.deployment} paired")
        pairs = [throughput.Pair(0, "aiki", _sample(200.0), _dbos(100.0))]
        return (throughput.aiki_row(config, [_sample(200.0)], [], pairs=pairs),
                [_dbos(100.0)], [])

    def fake_row(config: throughput.Config, options: Options) -> Row:
        measured.append(f"{config.store} {config.deployment} alone")
        return throughput.aiki_row(config, [_sample(200.0)], [])

    monkeypatch.setattr(throughput, "measure_paired", fake_paired)
    monkeypatch.setattr(throughput, "measure_row", fake_row)
    monkeypatch.setattr(dbos_side, "available", lambda: True)
    server: Any = object()  # stands for the PostgreSQL server: nothing here connects to it
    rows = throughput.run(Options(quick=True, reps=1, postgres=server, only=("100",)))

    # Every embedded row first (an Aiki hang follows aiki.connect otherwise); ws2 unpaired.
    assert measured == ["sqlite embedded paired", "postgres embedded paired",
                        "sqlite ws1 paired", "sqlite ws2 alone",
                        "postgres ws1 paired", "postgres ws2 alone"]
    # The table keeps its order; one DBOS row per store and mode, pooling both pairings.
    assert [r.label for r in rows] == [
        "SQLite · embedded · 100 concurrent", "SQLite · ws, 1 worker · 100 concurrent",
        "SQLite · ws, 2 workers · 100 concurrent", "PostgreSQL · embedded · 100 concurrent",
        "PostgreSQL · ws, 1 worker · 100 concurrent",
        "PostgreSQL · ws, 2 workers · 100 concurrent",
        "DBOS 9.9 · SQLite · 100 concurrent", "DBOS 9.9 · PostgreSQL · 100 concurrent"]
    assert all(r.suite == "dbos" and r.extra["paired_with"] == ["embedded", "ws1"]
               and len(r.samples) == 2 for r in rows[-2:])


def test_one_commit_beside_each_aiki_repetition_gives_the_cost_per_task_target() -> None:
    calls: list[str] = []

    def aiki_once(rep: int) -> throughput.Sample:
        calls.append(f"aiki{rep}")
        return _sample(100.0, runs=50)  # 10 ms per run: 3.33 ms per task

    def commit_once(rep: int) -> float:
        calls.append(f"commit{rep}")
        return [2.0, 4.0, 1.0][rep]

    def dbos_once(rep: int) -> dict[str, Any]:
        calls.append(f"dbos{rep}")
        return _dbos(50.0, runs=50)

    errors: dict[str, list[str]] = {"aiki": [], "dbos": []}
    pairs = throughput.alternate(3, aiki_once, dbos_once, errors, commit_once)
    # The commit is next to Aiki whichever side goes first.
    assert calls == ["aiki0", "commit0", "dbos0", "dbos1", "commit1", "aiki1",
                     "aiki2", "commit2", "dbos2"]
    assert [p.task_over_commit for p in pairs] == pytest.approx(
        [10 / 3 / 2.0, 10 / 3 / 4.0, 10 / 3 / 1.0])

    config = throughput.Config("sqlite", "embedded", 1, 50)
    aiki = throughput.aiki_row(config, [p.aiki for p in pairs if p.aiki], [], pairs=pairs)
    # A baseline suite row measured at another time is not what the target reads.
    baseline = Row("baseline", "SQLite", "commits/s", "1/s", [10.0], extra={"store": "sqlite"})
    report.annotate([baseline, aiki])
    assert aiki.extra["commit_multiple"] == pytest.approx(10 / 3 / 2.0)
    assert aiki.extra["ratios"]["× one commit"] == "1.67 (3 pairs)"
    lines = report.target_lines([baseline, aiki], quick=False)
    assert lines == [
        "target sqlite-1-vs-dbos: 2.00x (goal >= 2x) met  -- SQLite, embedded, one at a time: "
        "Aiki/DBOS (median of 3 interleaved pairs, 2.00-2.00)",
        "target sqlite-1-task-vs-commit: 1.67x (goal <= 2.5x) met  -- SQLite, embedded, one "
        "at a time: ms/task over one commit (median of 3 interleaved pairs)"]
