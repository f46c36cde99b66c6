"""StoreWriter: the one actor that writes to the store, committing many writes at once.

Messages: :class:`Write` (an op and the reply to answer). It owns nothing but its mailbox:
every outcome goes back to the asker, so a crash loses only the batch in flight, whose askers
time out and may retry (every op is safe to retry: see :mod:`aiki.store.ops`).

Group commit: it takes the first write, then whatever else is already waiting (up to
``max_batch``), and applies them all in one store transaction. Under load one commit carries
many runs' checkpoints; when idle a lone write is committed at once.
"""

from __future__ import annotations

from typing import Any, TypeVar

import attrs
import trio

from aiki.actors.mailbox import Mailbox, Reply
from aiki.errors import AikiError, StoreUnavailable
from aiki.store.base import Store
from aiki.store.ops import Op

T = TypeVar("T")


@attrs.frozen
class Write:
    op: Op[Any]
    reply: Reply[Any]


@attrs.define(eq=False)
class StoreWriter:
    store: Store
    max_batch: int = 256
    timeout: float = 30.0
    mailbox: Mailbox[Write] = attrs.field(factory=lambda: Mailbox[Write](4096, "store-writer"))
    commits: int = 0
    writes: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            batch = [await self.mailbox.receive()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                outcomes = await self.store.apply([w.op for w in batch])
            except StoreUnavailable as exc:
                for w in batch:
                    w.reply.fail(exc)
                continue
            except Exception as exc:
                for w in batch:
                    w.reply.fail(StoreUnavailable(f"store write failed: {exc!r}"))
                raise
            self.commits += 1
            self.writes += len(batch)
            for w, outcome in zip(batch, outcomes, strict=True):
                w.reply.send(outcome)

    async def write(self, op: Op[T]) -> T:
        """Apply ``op`` (batched with others) and return its outcome; raise it if refused."""
        outcome: Any = await self.mailbox.address.ask(lambda r: Write(op, r), self.timeout)
        if isinstance(outcome, AikiError):
            raise outcome
        return outcome  # type: ignore[no-any-return]
