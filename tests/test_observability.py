"""The metrics sink, the exposition page, log formats, and what importing Aiki costs."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiki import logs
from aiki.metrics import (
    CATALOG,
    LEASES_EXPIRED,
    RUNS,
    STORE_COMMIT_SECONDS,
    Metrics,
    NoMetrics,
    metric,
)
from aiki.observability import render

REPO = Path(__file__).resolve().parents[1]


def test_counters_gauges_and_histograms_read_back_exactly() -> None:
    m = Metrics()
    m.inc(RUNS, ("wf", "1", "enqueued"))
    m.inc(RUNS, ("wf", "1", "enqueued"), by=2)
    m.inc(RUNS, ("wf", "2", "completed"))
    assert m.value(RUNS, ("wf", "1", "enqueued")) == 3
    assert m.total(RUNS, event="enqueued") == 3 and m.total(RUNS, workflow="wf") == 4
    for seconds in (0.0005, 0.002, 0.002, 7200.0):
        m.observe(STORE_COMMIT_SECONDS, seconds)
    hist = m.histogram(STORE_COMMIT_SECONDS)
    assert hist is not None and hist.count == 4 and hist.sum == pytest.approx(7200.0045)
    cumulative = dict(hist.cumulative())
    assert cumulative[0.001] == 1 and cumulative[0.0025] == 3 and cumulative[3600.0] == 3
    assert cumulative[float("inf")] == 4
    with pytest.raises(TypeError, match="histogram"):
        m.value(STORE_COMMIT_SECONDS)
    with pytest.raises(KeyError, match="no metric 'aiki_nope'"):
        metric("aiki_nope")


def test_no_metrics_counts_nothing() -> None:
    m = NoMetrics()
    m.inc(RUNS, ("wf", "1", "enqueued"))
    m.observe(STORE_COMMIT_SECONDS, 1.0)
    assert m.value(RUNS, ("wf", "1", "enqueued")) == 0 and not m.enabled


def test_the_page_is_valid_prometheus_text_and_openmetrics() -> None:
    m = Metrics()
    m.inc(RUNS, ('we"ird\nname', "1", "completed"))
    m.observe(STORE_COMMIT_SECONDS, 0.003)
    body, content_type = render(m, None, sides=("server",))
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    [sample] = families["aiki_runs"].samples  # (the parser drops the _total of a counter)
    assert sample.labels == {"workflow": 'we"ird\nname', "version": "1", "event": "completed"}
    assert families["aiki_leases_expired"].samples[0].value == 0  # label-less: there from 0
    assert "aiki_worker_task_duration_seconds" not in families  # a worker's, not the server's
    open_body, open_type = render(m, "application/openmetrics-text; version=1.0.0",
                                  sides=("server",))
    assert open_type.startswith("application/openmetrics-text")
    assert open_body.rstrip().endswith(b"# EOF")
    assert LEASES_EXPIRED in CATALOG


def test_metric_names_follow_prometheus_conventions() -> None:
    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    for m in CATALOG:
        assert re.fullmatch(r"aiki_[a-z_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        if m.kind == "histogram":
            assert m.buckets == tuple(sorted(m.buckets)) and m.buckets, m.name
        assert "_total" not in m.name[:-6], m.name


def test_the_readme_table_lists_every_metric() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Operating Aiki"):]
    rows = re.findall(r"^\| `(aiki_[a-z_]+)` \| (\w+) \| ([^|]*) \|", section, re.M)
    assert {name: kind for name, kind, _ in rows} == {m.name: m.kind for m in CATALOG}
    for name, _, labels in rows:
        declared = metric(name).labels
        assert [label.strip(" `") for label in labels.split(",") if label.strip()] == list(
            declared), name


def test_json_logs_carry_the_run_and_parse_line_by_line() -> None:
    stream = io.StringIO()
    assert logs.setup("info", "json", stream) == "json"
    try:
        log = logging.getLogger("aiki.test")
        log.info("plain %s", "line")
        logs.bind_run("r-1", "checkout", "2", 3, "w-1")
        log.warning("about a run")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        log.info("explicit", extra=logs.run_fields("r-2", "other", "1", 1, None))
    finally:
        logs._RUN.set(None)
        logs.setup("warning", "text", sys.stderr)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["plain line", "about a run", "it failed",
                                                   "explicit"]
    assert "run_id" not in lines[0]
    assert {k: lines[1][k] for k in logs.RUN_KEYS} == {
        "run_id": "r-1", "workflow": "checkout", "version": "2", "attempt": 3,
        "worker_id": "w-1"}
    assert "ValueError: boom" in lines[2]["exception"]
    assert lines[3]["run_id"] == "r-2" and lines[3]["worker_id"] is None


def test_text_logs_append_the_run_and_auto_picks_by_terminal() -> None:
    stream = io.StringIO()
    assert logs.setup("info", "auto", stream) == "json"  # not a terminal
    assert logs.setup("info", "text", stream) == "text"
    try:
        logging.getLogger("aiki.test").info("hello", extra=logs.run_fields(
            "r-1", "wf", "1", 2, "w"))
    finally:
        logs.setup("warning", "text", sys.stderr)
    assert stream.getvalue().rstrip().endswith(
        "aiki.test: hello [run_id=r-1 workflow=wf version=1 attempt=2 worker_id=w]")
    with pytest.raises(ValueError, match="log format must be one of"):
        logs.setup("info", "yaml", stream)


def test_without_opentelemetry_nothing_is_imported_and_runs_work() -> None:
    """With OpenTelemetry unimportable, a run goes through and no tracing module is loaded;
    importing Aiki loads neither OpenTelemetry nor prometheus-client."""
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed
import aiki, trio
assert "prometheus_client" not in sys.modules

@aiki.task(name="double")
async def double(n: int) -> int:
    return 2 * n

@aiki.workflow(name="doubling", version="1")
async def doubling(run: aiki.WorkflowRun, n: int) -> int:
    return await double.run(run, n)

async def main() -> None:
    async with aiki.embedded("memory") as client, aiki.worker(client, workflows=[doubling]):
        assert await (await doubling.enqueue(client, 21)).wait_for_completion(timeout=10) == 42

trio.run(main)
loaded = [m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m]]
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
