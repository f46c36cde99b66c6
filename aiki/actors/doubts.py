"""Doubts: after a batch whose commit is unknown, look again once the store answers.

The StoreWriter acts on what a committed batch did beyond its outcomes (``Outcomes``: the
runs it ended, a parent it woke, a run it queued) at the commit, whoever asked for it. A
batch the store failed may have committed all the same (its connection lost at the
COMMIT): the writer saw a failure and acted on nothing. The askers send their writes again,
if they are still there, and learn then what became of them; one that is gone (a worker
crashed while its run's end was written) never does, and a client waiting for that run
would hear nothing, ever (simulation seed 695). So each failed batch is a doubt: once the
store answers reads again, every run watched on this server is read again (its watchers
hear of those that ended), and the Dispatcher and the Timer look again (a run queued).
Doubts that come meanwhile are served by one more pass; passes are at least
``min_interval`` apart, so a store that answers reads and fails every write (a full disk)
is not asked in a busy loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from aiki.actors.watchers import RunWatchers
from aiki.errors import AikiError
from aiki.store.base import Store

log = logging.getLogger("aiki.server")


@attrs.define(eq=False)
class Doubts:
    store: Store
    watchers: RunWatchers
    look_again: Callable[[], None]  # the Dispatcher and the Timer read the store again
    min_interval: float = 1.0
    max_pause: float = 5.0  # between two reads of a store that does not answer
    _doubted: bool = False
    _wake: trio.Event | None = None

    def doubt(self) -> None:
        """A batch failed: what it may have committed is acted on once the store answers
        (and no run is known unfinished any more: it may have ended some)."""
        self.watchers.forget()
        self._doubted = True
        if self._wake is not None:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._doubted:
                self._wake = trio.Event()
                await self._wake.wait()
            self._doubted = False
            try:
                await self._read_again()
            except BaseException:  # (a crash, a restart: the doubt stays for the next run)
                self._doubted = True
                raise
            self.look_again()
            await trio.sleep(self.min_interval)

    async def _read_again(self) -> None:
        watched = self.watchers.watched_runs()
        if not watched:  # (nobody to tell: the store answering is enough)
            await self._read(self.store.next_due)
        for run_id in watched:
            if self.watchers.watched(run_id):  # (not heard meanwhile)
                run = await self._read(self.store.get_run, run_id)
                if run is not None:
                    self.watchers.ended(run)  # (if it has ended)

    async def _read(self, read: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``read(*args)``, asked again, less and less often, until the store answers."""
        pause = 0.1
        while True:
            try:
                return await read(*args)
            except AikiError as exc:
                log.debug("store still not answering after a failed write: %r", exc)
                await trio.sleep(pause)
                pause = min(pause * 2, self.max_pause)
