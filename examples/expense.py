"""An expense approval that waits for a manager's decision: a reminder after a day without
one, and escalation to finance after three.

``python examples/expense.py`` runs two claims on the embedded engine in virtual time (a
Trio MockClock: three days pass in a few seconds): one approved within the day, one
that nobody answers. With a server, ``aiki worker --app examples.expense:workflows`` runs
it, and ``aiki runs send ID decision --payload '{"approved": true, "by": "ann"}'`` decides.
"""

from __future__ import annotations

from datetime import timedelta

import attrs
import trio
import trio.testing

import aiki


@attrs.frozen
class Claim:
    id: str
    employee: str
    manager: str
    amount_cents: int


@attrs.frozen
class Decision:
    approved: bool
    by: str


@attrs.frozen
class Message:
    to: str
    text: str


decision = aiki.event("decision", Decision)
outbox: list[Message] = []


@aiki.task(name="notify", retry=aiki.Retry.exponential(max_attempts=5, base_delay=1.0))
async def notify(message: Message) -> str:
    outbox.append(message)  # send the mail or the chat message here
    return f"notified {message.to}"


@aiki.workflow(name="expense", version="1", events=[decision])
async def expense(run: aiki.WorkflowRun, claim: Claim) -> str:
    await notify.run(run, Message(claim.manager, f"please review expense {claim.id}"))
    try:
        # Waiting frees the worker's slot; the decision wakes the run by push.
        answer = await decision.wait(run, timeout=timedelta(days=1))
    except aiki.EventTimeout:
        await notify.run(run, Message(claim.manager, f"reminder: expense {claim.id} waits"))
        try:
            answer = await decision.wait(run, timeout=timedelta(days=2))
        except aiki.EventTimeout:
            await notify.run(run, Message("finance", f"expense {claim.id}: no decision in "
                                                     "3 days"))
            return "escalated"
    verdict = "approved" if answer.approved else "rejected"
    await notify.run(run, Message(claim.employee, f"expense {claim.id} {verdict}"))
    return f"{verdict} by {answer.by}"


# What `aiki worker --app examples.expense:workflows` runs.
workflows = [expense]


async def main() -> None:
    async with aiki.embedded(store="memory") as client:
        async with aiki.worker(client, workflows=[expense]):
            quick = await expense.enqueue(client, Claim("e-1", "bob", "ann", 4200),
                                          idempotency_key="expense-e-1")
            silent = await expense.enqueue(client, Claim("e-2", "cy", "dee", 9900))
            await trio.sleep(3600)  # an hour later, ann decides
            await quick.send(decision, Decision(approved=True, by="ann"))
            print("e-1:", await quick.wait_for_completion())
            print("e-2:", await silent.wait_for_completion())  # three days on
            for message in outbox:
                print(f"  to {message.to}: {message.text}")


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
