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
    """One op, or several (a tuple) applied in order in the same transaction; the reply is
    the first refusal among them, or the last one's outcome."""

    op: Op[Any] | tuple[Op[Any], ...]
    reply: Reply[Any]

    @property
    def ops(self) -> tuple[Op[Any], ...]:
        return self.op if isinstance(self.op, tuple) else (self.op,)


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
                outcomes = await self.store.apply([op for w in batch for op in w.ops])
            except StoreUnavailable as exc:
                for w in batch:
                    w.reply.fail(exc)
                continue
            except Exception as exc:
                for w in batch:
                    w.reply.fail(StoreUnavailable(f"store write failed: {exc!r}"))
                raise
            self.commits += 1
            self.writes += len(outcomes)
            answers = iter(outcomes)
            for w in batch:
                mine = [next(answers) for _ in w.ops]
                refused = [o for o in mine if isinstance(o, AikiError)]
                w.reply.send(refused[0] if refused else mine[-1])

    async def write(self, op: Op[T], *before: Op[Any]) -> T:
        """Apply ``op`` (batched with others) and return its outcome; raise it if refused.
        Ops in ``before`` are applied first, in the same transaction; the first refusal
        among them all is raised."""
        chain: Op[Any] | tuple[Op[Any], ...] = (*before, op) if before else op
        outcome: Any = await self.mailbox.address.ask(lambda r: Write(chain, r), self.timeout)
        if isinstance(outcome, AikiError):
            raise outcome
        return outcome  # type: ignore[no-any-return]
