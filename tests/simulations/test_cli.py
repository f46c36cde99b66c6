"""The sweep's command line: which seeds it runs, and at what length."""

from __future__ import annotations

import pytest

from simulations import cli


def test_a_regression_seed_keeps_the_length_that_found_its_bug() -> None:
    text = ("# header\n"
            "1  # a bug\n"
            "\n"
            "2073 minutes=20  # found only in a 20-minute run\n")
    assert cli.regression_seeds(text) == [(1, None), (2073, 1200.0)]


@pytest.mark.parametrize("line", ["x  # no seed", "7 hours=2  # unknown key",
                                  "7 minutes=  # empty"])
def test_a_malformed_regression_line_is_named(line: str) -> None:
    with pytest.raises(ValueError, match="line 2: expected 'SEED' or 'SEED minutes=M'") as err:
        cli.regression_seeds("1\n" + line + "\n")
    assert repr(line) in str(err.value)


def test_the_regressions_file_parses() -> None:
    seeds = cli.regression_seeds()
    assert len(seeds) >= 40
    assert (2073, 1200.0) in seeds


def test_a_sweep_runs_a_seed_of_its_own_length_at_that_length(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[tuple[int, float]] = []

    def fake(seed: int, faults: tuple[str, ...], safety: float, runs: int) -> cli.SeedReport:
        ran.append((seed, safety))
        violations = ["boom"] if safety == 1200.0 else []
        return cli.SeedReport(seed, "h", safety, {}, {}, violations, 0.0, safety)

    class InProcess:
        def __init__(self, max_workers: int) -> None:
            pass

        def __enter__(self) -> InProcess:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def submit(self, fn, *args):  # type: ignore[no-untyped-def]
            import concurrent.futures
            future: concurrent.futures.Future[cli.SeedReport] = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    monkeypatch.setattr(cli, "run_one", fake)
    monkeypatch.setattr(cli.concurrent.futures, "ProcessPoolExecutor", InProcess)
    status = cli.sweep([5, 2073], ("crash",), 1, 600.0, 24, [(2073, 1200.0)])
    assert sorted(ran) == [(5, 600.0), (2073, 600.0), (2073, 1200.0)]
    assert status == 1
    out = capsys.readouterr().out
    assert "seed 2073 FAILED: boom" in out and "--seed 2073 --faults crash --minutes 20" in out
