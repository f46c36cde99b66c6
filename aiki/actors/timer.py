"""Timer: wakes runs whose time has come (retry delays now; durable sleeps and schedules next).

Messages: a float, the wall time of a new wake-up (a hint; it re-reads the store anyway).
It owns no state: the next wake-up always comes from the store, so a restart loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from aiki.actors.mailbox import AskTimeout, Mailbox
from aiki.actors.store_writer import StoreWriter
from aiki.errors import StoreUnavailable
from aiki.sources import Sources
from aiki.store.base import Store
from aiki.store.ops import WakeDue

log = logging.getLogger("aiki.timer")


@attrs.define(eq=False)
class Timer:
    store: Store
    writer: StoreWriter
    sources: Sources
    on_wake: Callable[[], None]
    poll_interval: float = 5.0
    mailbox: Mailbox[float] = attrs.field(factory=lambda: Mailbox[float](64, "timer"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                next_at = await self.store.next_wake_at()
                now = self.sources.clock.now()
                if next_at is not None and next_at <= now:
                    if await self.writer.write(WakeDue(now)):
                        self.on_wake()
                    continue
            except (StoreUnavailable, AskTimeout) as exc:
                log.warning("timer: store unavailable, retrying: %s", exc)
                await trio.sleep(min(self.poll_interval, 1.0))
                continue
            wait = self.poll_interval if next_at is None else min(next_at - now, self.poll_interval)
            with trio.move_on_after(wait):
                await self.mailbox.receive()

    def hint(self, wake_at: float) -> None:
        self.mailbox.address.tell_nowait(wake_at)
