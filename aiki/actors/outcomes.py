"""Task outcomes that ride with the run's next write, and the one task that flushes strays.

A completed task's outcome need not cost a round trip and a transaction of its own: the
run's next write (the next task's start, a ``run.now()``, the run's completion) carries it,
and the server commits both in one transaction, outcome first. That takes a run of three
tasks from nine transactions to six and from eight worker requests to five.

What it may not do is let anything the outcome decided reach the store before the outcome:
so every write of the run carries it or flushes it first, and the next task's start, which
carries it, is still committed (fenced by the lease) before that task runs. A crash before
the ride loses the outcome, as a crash during the task would have: the task runs again, and
nothing committed depended on it. A run whose next step does not come soon (a long stretch
of workflow code, a step that ends the run's lease in some other way) has its outcomes sent
on their own after ``bound`` seconds, by one :class:`Flusher` per worker.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

DEFAULT_BOUND = 0.05  # seconds an outcome may wait for a ride


class HasPending(Protocol):
    """A run with outcomes waiting: :meth:`flush` sends them on their own."""

    async def flush(self) -> None: ...


@attrs.define(eq=False)
class Flusher:
    """Sends the outcomes that waited ``bound`` seconds without a ride. One per worker: it
    sleeps until the oldest waiting outcome is due, so an idle worker never wakes for it."""

    bound: float = DEFAULT_BOUND
    _since: dict[HasPending, float] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def waiting(self, run: HasPending) -> None:
        """``run`` has an outcome waiting (from now, unless it already had one)."""
        if run not in self._since:
            if not self._since:
                self._changed.set()
            self._since[run] = trio.current_time()

    def done(self, run: HasPending) -> None:
        """``run`` has nothing waiting any more (it rode along, or the run ended)."""
        self._since.pop(run, None)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                if not self._since:  # idle: woken by the first outcome that waits
                    self._changed = trio.Event()
                    await self._changed.wait()
                    continue
                # Busy, it wakes at most once per ``bound``, however many outcomes come
                # and go meanwhile (most ride before they are due).
                await trio.sleep_until(min(self._since.values()) + self.bound)
                now = trio.current_time()
                for run, since in list(self._since.items()):
                    if since + self.bound <= now:
                        del self._since[run]
                        nursery.start_soon(run.flush)
