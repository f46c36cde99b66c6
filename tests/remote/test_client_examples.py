"""examples/sync_client.py and examples/fastapi_app.py against a real ``aiki server`` with a
worker for examples/quickstart.py's workflows, as the README says to run them; and the
FastAPI app's endpoints through httpx's ASGI transport, in this process."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.remote.processes import REPO, Cluster, eventually


async def quickstart_cluster(cluster: Cluster, tmp_path: Path) -> str:
    server, url = await cluster.server(tmp_path / "aiki.db")
    worker = await cluster.spawn("worker", "worker", "--server", url, "--app",
                                 "examples.quickstart:workflows", "--id", "quickstart")

    async def connected() -> bool:
        import aiki

        async with aiki.connect(url) as client:
            return "quickstart" in {w.id for w in await client.list_workers()}

    await eventually(connected, 30, "the worker to connect", worker, server)
    return url


async def run_example(cluster: Cluster, *args: str) -> list[str]:
    result = await trio.run_process([sys.executable, *args], cwd=str(REPO),
                                    capture_stdout=True, capture_stderr=True,
                                    env=cluster.env(), check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def test_both_client_examples_run_against_aiki_server(
    cluster: Cluster, tmp_path: Path,
) -> None:
    url = await quickstart_cluster(cluster, tmp_path)
    lines = await run_example(cluster, "examples/sync_client.py", url)
    assert lines[:4] == [f"emailed receipt for o-sync-{n}" for n in range(3)] + [
        "emailed receipt for o-sync-json"]
    assert lines[-1] == "quickstart: 0 of 8 slots in use"
    assert await run_example(cluster, "examples/fastapi_app.py", url) == [
        "emailed receipt for o-web-1", "completed"]


async def test_the_fastapi_endpoint_enqueues_and_waits_through_httpx(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    httpx = pytest.importorskip("httpx")
    url = await quickstart_cluster(cluster, tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    monkeypatch.setenv("AIKI_SERVER", url)
    example = importlib.import_module("fastapi_app")

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with example.lifespan(example.app):
            transport = httpx.ASGITransport(app=example.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                # Ten requests at once on the app's one client, one of them twice.
                posts = await asyncio.gather(*(
                    http.post(f"/orders/o-{n % 9}", params={"amount_cents": 100 + n % 9})
                    for n in range(10)))
                out["codes"] = {r.status_code for r in posts}
                out["results"] = sorted(r.json()["result"] for r in posts)
                out["twice"] = posts[0].json()["run_id"] == posts[9].json()["run_id"]
                shown = await http.get(f"/runs/{posts[0].json()['run_id']}")
                out["shown"] = shown.json()
                out["missing"] = (await http.get("/runs/no-such-run")).status_code
        return out

    from tests.remote.test_asyncio_client import asyncio_run

    out = await trio.to_thread.run_sync(asyncio_run, main())
    assert out["codes"] == {200}
    assert out["results"] == sorted(f"emailed receipt for o-{n % 9}" for n in range(10))
    assert out["twice"], "the same order id is the same run (idempotency key)"
    assert out["shown"]["state"] == "completed"
    assert [name for name, _, _ in out["shown"]["tasks"]] == ["charge-card", "send-email"]
    assert out["missing"] == 404
