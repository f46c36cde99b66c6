"""Retention: deletes finished runs older than the server's ``--retention``.

It wakes every ``interval`` seconds, then deletes finished runs in batches of ``batch``
through the StoreWriter (so each batch is one short transaction among the others, never one
long one that stalls the store), pausing ``pause`` seconds between batches, until a batch
comes back short. Nothing happens unless a retention is configured.
"""

from __future__ import annotations

import logging

import attrs
import trio

from aiki.actors.mailbox import AskTimeout
from aiki.actors.store_writer import StoreWriter
from aiki.errors import StoreUnavailable
from aiki.sources import Sources
from aiki.store.machine import when
from aiki.store.ops import PurgeRuns

log = logging.getLogger("aiki.retention")


@attrs.define(eq=False)
class Retention:
    writer: StoreWriter
    sources: Sources
    keep: float  # seconds a finished run is kept
    interval: float = 600.0
    batch: int = 500
    pause: float = 0.05
    deleted: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.purge_once()
            except (StoreUnavailable, AskTimeout) as exc:
                log.warning("retention: store unavailable, trying again later: %s", exc)
            await trio.sleep(self.interval)

    async def purge_once(self) -> int:
        """Delete every finished run older than the retention, batch by batch."""
        before = self.sources.clock.now() - self.keep
        total = 0
        while True:
            ids = await self.writer.write(PurgeRuns(before, self.batch))
            total += len(ids)
            if len(ids) < self.batch:
                break
            await trio.sleep(self.pause)
        if total:
            self.deleted += total
            log.info("retention: deleted %d runs that finished before %s", total,
                     when(before))
        return total
