"""A client of a running ``aiki server`` (the README's quick start, terminal 3).

    python examples/remote_client.py [ws://127.0.0.1:9090]

Enqueues a checkout (at most once, by its idempotency key), waits for its result (the
server pushes it), and lists the newest runs and the connected workers.
"""

from __future__ import annotations

import os
import sys

import trio
from quickstart import Order, checkout

import aiki


async def main(url: str) -> None:
    async with aiki.connect(url, token=os.environ.get("AIKI_TOKEN")) as client:
        handle = await checkout.enqueue(client, Order("o-43", 2500),
                                        idempotency_key="order-o-43")
        print(await handle.wait_for_completion(timeout=30))
        for run in await client.list_runs(limit=5):
            print(f"{run.id}  {run.workflow:<10} {run.state}")
        for worker in await client.list_workers():
            print(f"{worker.id}: {worker.in_use} of {worker.slots} slots in use")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:9090")
