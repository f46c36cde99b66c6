"""A blocking client of a running ``aiki server``: no async anywhere (Django, Flask, scripts).

    python examples/sync_client.py [ws://127.0.0.1:9090]

One client is shared by three threads, each of which enqueues a checkout (at most once, by
its idempotency key) and waits for its result; then it lists the newest runs and the
connected workers. Run a worker for examples/quickstart.py's workflows first (README).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from quickstart import Order, checkout

import aiki.sync


def main(url: str) -> None:
    with aiki.sync.connect(url, token=os.environ.get("AIKI_TOKEN")) as client:

        def buy(n: int) -> str:
            handle = checkout.enqueue(client, Order(f"o-sync-{n}", 1000 + n),
                                      idempotency_key=f"order-o-sync-{n}")
            result: str = handle.wait_for_completion(timeout=30)
            return result

        with ThreadPoolExecutor(3) as pool:  # the client is safe to share between threads
            for line in pool.map(buy, range(3)):
                print(line)
        by_name = client.enqueue("checkout", {"id": "o-sync-json", "amount_cents": 5})
        print(by_name.wait_for_completion(timeout=30))
        for run in client.list_runs(limit=5):
            print(f"{run.id}  {run.workflow:<10} {run.state}")
        for worker in client.list_workers():
            print(f"{worker.id}: {worker.in_use} of {worker.slots} slots in use")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:9090")
