"""``aiki demo``: the order-processing workflow surviving a worker crash, on embedded SQLite.

validate order → process payment (fails twice, then succeeds, under exponential retry) → ship.
Worker A is killed while shipping; worker B takes the run over once A's lease expires and
finishes it from the checkpoints: validation and payment are not executed again.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import attrs
import trio

import aiki


@attrs.frozen
class Order:
    id: str
    amount_cents: int
    address: str


@attrs.frozen
class Receipt:
    payment_id: str
    amount_cents: int


@attrs.frozen
class OrderResult:
    order_id: str
    payment_id: str
    tracking: str


executions: Counter[str] = Counter()
shipping_started = trio.Event()


@aiki.task(name="validate-order")
async def validate_order(order: Order) -> Order:
    executions["validate-order"] += 1
    if order.amount_cents <= 0:
        raise aiki.NonRetryableError(f"order {order.id} has no amount")
    return order


@aiki.task(name="process-payment",
           retry=aiki.Retry.exponential(max_attempts=4, base_delay=0.2, max_delay=2.0))
async def process_payment(order: Order) -> Receipt:
    executions["process-payment"] += 1
    if executions["process-payment"] <= 2:
        raise ConnectionError("payment gateway timed out")
    return Receipt(payment_id=f"pay-{order.id}", amount_cents=order.amount_cents)


@aiki.task(name="ship-order")
async def ship_order(order: Order) -> str:
    executions["ship-order"] += 1
    shipping_started.set()
    await trio.sleep(1.0)  # the courier takes a while: worker A dies in here
    return f"TRACK-{order.id}"


@aiki.workflow(name="order-processing", version="1.0.0")
async def process_order(run: aiki.WorkflowRun, order: Order) -> OrderResult:
    valid = await validate_order.run(run, order)
    receipt = await process_payment.run(run, valid)
    tracking = await ship_order.run(run, valid)
    return OrderResult(valid.id, receipt.payment_id, tracking)


def say(text: str) -> None:
    print(text, flush=True)


async def main(store_path: str | None = None) -> OrderResult:
    path = store_path or os.path.join(tempfile.mkdtemp(prefix="aiki-demo-"), "aiki.db")
    say(f"Store: SQLite file {path}")
    async with aiki.embedded(store=f"sqlite:///{path}", lease_ttl=2.0, poll_interval=0.2) as client:
        handle = await process_order.enqueue(
            client, Order("A-1001", 4_999, "1 Trio Lane"), idempotency_key="order-A-1001")
        say(f"Enqueued run {handle.id} of order-processing 1.0.0")

        with trio.CancelScope() as worker_a:
            async with aiki.worker(client, workflows=[process_order], id="worker-a"):
                say("worker-a: started")
                await shipping_started.wait()
                say("worker-a: payment is checkpointed, shipping started... killing worker-a")
                worker_a.cancel()
        before = dict(executions)
        status = await handle.status()
        say(f"Run is {status.state!r}, tasks: "
            + ", ".join(f"{t.name}={t.state}" for t in status.tasks))

        say("worker-b: started; it takes the run over once worker-a's lease (2 s) expires")
        async with aiki.worker(client, workflows=[process_order], id="worker-b"):
            result = await handle.wait_for_completion(timeout=30)

        say("")
        say(f"Result: {result}")
        say("")
        say(f"{'task':<18}{'ran before the crash':>22}{'ran after':>12}")
        for name in ("validate-order", "process-payment", "ship-order"):
            b = before.get(name, 0)
            say(f"{name:<18}{b:>22}{executions[name] - b:>12}")
        say("(process-payment's 3 executions are 2 transient failures and one success, all "
            "before the crash; nothing that finished ran again)")
        say("")
        say("History:")
        events = await handle.history()
        start = events[0].at
        for e in events:
            what = e.event + (f" {e.name}" if e.name else "")
            who = e.worker_id or "server"
            detail = f"  {e.detail}" if e.detail else ""
            say(f"  +{e.at - start:6.2f}s  {what:<32} attempt {e.attempt}  {who:<9}{detail}")
        return result


if __name__ == "__main__":
    trio.run(main)
