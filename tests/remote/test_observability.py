"""A running ``aiki server`` and ``aiki worker`` as an operator sees them: the quick start's
workload on /metrics (both processes), /health and /ready for probes, plain HTTP on the
protocol's port, and every line of ``--log-format json`` a JSON object."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.remote.processes import REPO, SIGTERM, Cluster, Proc, eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(url: str, **headers: str) -> httpx.Response:
    return await trio.to_thread.run_sync(lambda: httpx.get(url, headers=headers, timeout=10))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return page.get((name, frozenset(labels.items())))


def json_lines(proc: Proc) -> list[dict[str, object]]:
    """Every line the process logged, each parsed as JSON (a line that is not fails)."""
    lines = proc.log().splitlines()
    assert lines, f"{proc.name} logged nothing"
    return [json.loads(line) for line in lines]


async def aiki_cli(cluster: Cluster, url: str, *args: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "aiki", *args], cwd=str(REPO), capture_stdout=True,
        capture_stderr=True, env=cluster.env(AIKI_SERVER=url), check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_metrics_health_and_json_logs_of_the_quick_start(
    cluster: Cluster, tmp_path: Path,
) -> None:
    server_metrics, worker_metrics = free_port(), free_port()
    server, url = await cluster.server(
        tmp_path / "aiki.db", "--metrics-listen", f"127.0.0.1:{server_metrics}",
        "--log-format", "json", "--log-level", "info")
    worker = await cluster.spawn(
        "worker", "worker", "--server", url, "--app", "examples.quickstart:workflows",
        "--id", "quickstart", "--metrics-listen", f"127.0.0.1:{worker_metrics}",
        "--log-format", "json")

    async def ready() -> bool:
        try:
            return (await get(f"http://127.0.0.1:{worker_metrics}/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(ready, 30, "the worker to be ready", worker, server)
    out = await aiki_cli(cluster, url, "enqueue", "checkout", "--payload",
                         '{"id": "o-1", "amount_cents": 1999}', "--wait")
    run_id = out.splitlines()[0].split()[-1]
    await aiki_cli(cluster, url, "runs", "list")  # a routine request: not an INFO line

    page = samples((await get(f"http://127.0.0.1:{server_metrics}/metrics")).text)
    for event in ("enqueued", "started", "completed"):
        assert value(page, "aiki_runs_total", workflow="checkout", version="1",
                     event=event) == 1, event
    assert value(page, "aiki_runs_total", workflow="checkout", version="1",
                 event="failed") is None
    # The quick start's card charge fails once and is retried.
    assert value(page, "aiki_task_attempts_total", task="charge-card", outcome="retrying") == 1
    assert value(page, "aiki_task_attempts_total", task="charge-card", outcome="completed") == 1
    assert value(page, "aiki_task_attempts_total", task="send-email", outcome="completed") == 1
    assert value(page, "aiki_dispatch_latency_seconds_count", workflow="checkout",
                 version="1") == 1
    assert value(page, "aiki_workers_connected") == 1
    assert value(page, "aiki_worker_slots", state="free") == 8
    assert value(page, "aiki_leases_expired_total") == 0

    worker_page = samples((await get(f"http://127.0.0.1:{worker_metrics}/metrics")).text)
    assert value(worker_page, "aiki_worker_task_duration_seconds_count", task="charge-card",
                 outcome="failed") == 1
    assert value(worker_page, "aiki_worker_task_duration_seconds_count", task="charge-card",
                 outcome="completed") == 1
    assert value(worker_page, "aiki_worker_slots_max", worker="quickstart") == 8
    assert value(worker_page, "aiki_worker_slots_in_use", worker="quickstart") == 0
    assert not [k for k in worker_page if k[0].startswith("aiki_runs")]

    # Probes and curl, on the protocol's own port too.
    port = url.rsplit(":", 1)[1]
    health = await get(f"http://127.0.0.1:{port}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert (await get(f"http://127.0.0.1:{port}/ready")).status_code == 200
    assert (await get(f"http://127.0.0.1:{server_metrics}/ready")).status_code == 200
    root = await get(f"http://127.0.0.1:{port}/")
    assert root.status_code == 426 and "This is an Aiki server" in root.text
    on_port = samples((await get(f"http://127.0.0.1:{port}/metrics")).text)
    assert value(on_port, "aiki_runs_total", workflow="checkout", version="1",
                 event="completed") == 1

    server.signal(SIGTERM)
    worker.signal(SIGTERM)
    assert await server.wait(30) == 0 and await worker.wait(60) == 0
    server_lines, worker_lines = json_lines(server), json_lines(worker)
    for line in server_lines + worker_lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    # Three CLI calls came and went; each session's end is routine (DEBUG), not INFO.
    assert not [line for line in server_lines if line["level"] == "info"
                and re.search(r"session \d+ \(.*\) ended", str(line["message"]))], server_lines
    about_run = [line for line in worker_lines if line.get("run_id") == run_id]
    assert about_run, worker_lines
    for line in about_run:
        assert (line["workflow"], line["version"], line["attempt"], line["worker_id"]) == (
            "checkout", "1", 1, "quickstart"), line
