"""An order that fans out to one child run per parcel, and a cancel that refunds.

Run it: ``python examples/parcels.py`` (virtual time: the days pass in a second or two).

- ``order`` charges the customer, then starts a ``ship`` child run per parcel and waits for
  all of them (``run.gather`` of ``ship.call``) under a durable deadline of three days: the
  parcels ship in parallel, on any worker, each a run of its own with its own retries and
  history. Past the deadline the parcels still in flight are cancelled and the order says
  so (``scope.cancelled_caught``).
- The second order is cancelled while its parcels wait in the warehouse. The cancel reaches
  every child (their pickups are cancelled), and the order's workflow sees
  ``aiki.RunCancelled`` where it stands; inside ``run.shield()`` it refunds the customer
  before the run ends ``cancelled``.
"""

from __future__ import annotations

from datetime import timedelta

import attrs
import trio
import trio.testing

import aiki


@attrs.frozen
class Order:
    id: str
    amount_cents: int
    parcels: list[str]


ledger: list[str] = []  # what the outside world saw, in order


@aiki.task(name="charge")
async def charge(order: Order) -> str:
    ledger.append(f"charged {order.id}: {order.amount_cents} cents")
    return f"receipt-{order.id}"


@aiki.task(name="refund")
async def refund(order: Order) -> str:
    ledger.append(f"refunded {order.id}: {order.amount_cents} cents")
    return f"refund-{order.id}"


@aiki.task(name="pick-up", retry=aiki.Retry.exponential(max_attempts=5, base_delay=1.0))
async def pick_up(parcel: str) -> str:
    if parcel.startswith("bulky"):
        await trio.sleep(timedelta(days=2).total_seconds())  # the courier takes its time
    if parcel.startswith("lost"):
        await trio.sleep(timedelta(days=30).total_seconds())  # it never comes
    ledger.append(f"picked up {parcel}")
    return f"tracking-{parcel}"


@aiki.workflow(name="ship", version="1")
async def ship(run: aiki.WorkflowRun, parcel: str) -> str:
    return await pick_up.run(run, parcel)


@aiki.workflow(name="order", version="1")
async def order(run: aiki.WorkflowRun, o: Order) -> list[str]:
    await charge.run(run, o)
    try:
        # A durable deadline: recorded once, it survives crashes and restarts.
        with run.move_on_after(timedelta(days=3)) as scope:
            # One child run per parcel; the order waits for all of them, its slot given back.
            return await run.gather(*(ship.call(run, parcel) for parcel in o.parcels))
        assert scope.cancelled_caught  # the parcels still in flight were cancelled
        return ["late: shipping took more than 3 days"]
    except aiki.RunCancelled:
        with run.shield():  # compensation runs to completion within the cancel's grace
            await refund.run(run, o)
        raise


# What `aiki worker --app examples.parcels:workflows` runs.
workflows = [order, ship]


async def main() -> None:
    async with aiki.embedded(store="memory") as client:
        async with aiki.worker(client, workflows=workflows, max_concurrent_runs=10):
            quick = await order.enqueue(client, Order("o-1", 4200, ["book", "lamp"]))
            print("o-1:", await quick.wait_for_completion())
            slow = await order.enqueue(client, Order("o-2", 9900, ["bulky-sofa", "rug"]))
            await trio.sleep(timedelta(hours=1).total_seconds())
            status = await slow.status()
            print("o-2 children:", ", ".join(f"{c.workflow} {c.state}"
                                               for c in status.children))
            await slow.cancel(reason="customer changed their mind")
            try:
                await slow.wait_for_completion()
            except aiki.WorkflowCancelled as exc:
                print("o-2:", exc)
            status = await slow.status()
            print("o-2 children:", ", ".join(f"{c.workflow} {c.state}"
                                               for c in status.children))
            lost = await order.enqueue(client, Order("o-3", 100, ["pen", "lost-parcel"]))
            print("o-3:", await lost.wait_for_completion())
            status = await lost.status()
            print("o-3 children:", ", ".join(sorted(f"{c.workflow} {c.state}"
                                                      for c in status.children)))
            for line in ledger:
                print(" ", line)


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
