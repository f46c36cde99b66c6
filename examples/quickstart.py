"""The README's example: a typed workflow with a retried task, on the embedded engine."""

from __future__ import annotations

import attrs
import trio

import aiki


@attrs.frozen
class Order:
    id: str
    amount_cents: int


@attrs.frozen
class Receipt:
    order_id: str
    charged_cents: int


attempts = {"charge": 0}


@aiki.task(name="charge-card", retry=aiki.Retry.exponential(max_attempts=3, base_delay=0.1))
async def charge_card(order: Order) -> Receipt:
    attempts["charge"] += 1
    if attempts["charge"] == 1:
        raise ConnectionError("card network timed out")  # retried after 0.1 s
    return Receipt(order.id, order.amount_cents)


@aiki.task(name="send-email")
async def send_email(receipt: Receipt) -> str:
    return f"emailed receipt for {receipt.order_id}"


@aiki.workflow(name="checkout", version="1")
async def checkout(run: aiki.WorkflowRun, order: Order) -> str:
    receipt = await charge_card.run(run, order)  # checkpointed: never charged twice
    return await send_email.run(run, receipt)


# What `aiki worker --app examples.quickstart:workflows` runs (see the README's quick start).
workflows = [checkout]


async def main() -> None:
    async with aiki.embedded(store="sqlite:///quickstart.db") as client:
        async with aiki.worker(client, workflows=[checkout], max_concurrent_runs=5):
            handle = await checkout.enqueue(client, Order("o-42", 1999),
                                            idempotency_key="order-o-42")
            print(await handle.wait_for_completion(timeout=30))
            status = await handle.status()
            print(status.state, [(t.name, t.state, t.attempts) for t in status.tasks])


if __name__ == "__main__":
    trio.run(main)
