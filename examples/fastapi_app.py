"""A FastAPI app whose endpoint starts a checkout run and waits for its result.

    uvicorn --app-dir examples fastapi_app:app      # serve it (AIKI_SERVER, AIKI_TOKEN)
    python examples/fastapi_app.py [ws://127.0.0.1:9090]   # one request, no web server

The app opens one ``aiki.asyncio`` client for its whole life (FastAPI's lifespan) and shares
it between requests; each request enqueues with the order id as idempotency key, so a
retried POST never charges twice, and waits for the run's result. Run a worker for
examples/quickstart.py's workflows first (see the README).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from quickstart import Order, checkout

import aiki
import aiki.asyncio


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("AIKI_SERVER", "ws://127.0.0.1:9090")
    async with aiki.asyncio.connect(url, token=os.environ.get("AIKI_TOKEN")) as client:
        app.state.aiki = client
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/orders/{order_id}")
async def place_order(order_id: str, amount_cents: int, request: Request) -> dict[str, str]:
    client: aiki.asyncio.Client = request.app.state.aiki
    handle = await checkout.enqueue(client, Order(order_id, amount_cents),
                                    idempotency_key=f"order-{order_id}")
    try:
        result = await handle.wait_for_completion(timeout=30)
    except aiki.WorkflowFailed as exc:
        raise HTTPException(502, f"checkout failed: {exc.message}") from exc
    return {"run_id": handle.id, "result": result}


@app.get("/runs/{run_id}")
async def run_status(run_id: str, request: Request) -> dict[str, object]:
    client: aiki.asyncio.Client = request.app.state.aiki
    try:
        status = await client.handle(run_id).status()
    except aiki.RunNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    return {"state": status.state, "tasks": [[t.name, t.state, t.attempts]
                                             for t in status.tasks]}


async def one_request(url: str) -> None:
    """POST one order through the app in this process (httpx's ASGI transport)."""
    import httpx

    os.environ["AIKI_SERVER"] = url
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            placed = await http.post("/orders/o-web-1", params={"amount_cents": 4200})
            placed.raise_for_status()
            print(placed.json()["result"])
            status = await http.get(f"/runs/{placed.json()['run_id']}")
            print(status.json()["state"])


if __name__ == "__main__":
    asyncio.run(one_request(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:9090"))
