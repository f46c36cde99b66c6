"""The README's repair story: version 1 of ``order`` has a bug, version 2 fixes it.

A worker runs the buggy code (``--app examples.repair:buggy``); a run fails after charging
the card. The fix is deployed as version 2 (``--app examples.repair:fixed``), and
``aiki runs retry ID --version 2`` finishes the run: the card is not charged again, its
recorded result is replayed.
"""

from __future__ import annotations

import attrs

import aiki


@attrs.frozen
class Order:
    id: str
    cents: int
    address: str


@aiki.task(name="charge-card")
async def charge_card(order: Order) -> str:
    return f"charged {order.cents} for {order.id}"


@aiki.task(name="print-label", retry=aiki.Retry.none())
async def print_label(address: str) -> str:
    if not address.strip():
        raise ValueError("a label needs an address")
    return f"label for {address}"


@aiki.workflow(name="order", version="1")
async def order_v1(run: aiki.WorkflowRun, order: Order) -> str:
    receipt = await charge_card.run(run, order)
    label = await print_label.run(run, order.address.split(",")[1])  # the bug: the street
    return f"{receipt}; {label}"


@aiki.workflow(name="order", version="2")
async def order_v2(run: aiki.WorkflowRun, order: Order) -> str:
    receipt = await charge_card.run(run, order)  # the same first step: its result replays
    label = await print_label.run(run, order.address)  # fixed: the whole address
    return f"{receipt}; {label}"


buggy = [order_v1]
fixed = [order_v2]
