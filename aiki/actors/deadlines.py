"""One task that times out many waits, instead of a cancel scope per wait.

A Trio cancel scope with a deadline costs the Trio thread about 10 µs to enter and leave; at
100 concurrent runs the scopes of the requests and asks on the hot path were a tenth of its
time. Where every wait of a kind has the same timeout, their deadlines come in order, so a
deque holds them and one :meth:`DeadlineQueue.sweep` task fails each wait still open when
its time is up. Used by the StoreWriter's asks (:meth:`aiki.actors.mailbox.Mailbox.expire_asks`)
and by a Link's requests (:class:`aiki.actors.link.Link`).

A wait whose deadline is earlier than the last one queued (a shorter timeout) does not fit
(:meth:`DeadlineQueue.fits`): its caller keeps a cancel scope of its own, as it does while
no sweep runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio


class Expiring(Protocol):
    """A wait the sweep can end: done once answered, failed, or given up."""

    def is_done(self) -> bool: ...

    def expire(self, exc: BaseException) -> None:
        """End the wait with ``exc`` (nothing if it is done already)."""
        ...


E = TypeVar("E", bound=Expiring)


class DeadlineQueue(Generic[E]):
    """The waits in flight, in deadline order. An ended wait is dropped from the front as
    soon as every wait before it has ended too, so the queue holds about the waits in
    flight, not every wait of the last timeout's length."""

    def __init__(self) -> None:
        self.queue: deque[tuple[float, float, E]] = deque()
        self.sweeping = False
        self._wake = trio.Event()  # set when a wait is due before the sweep's next look
        self._next_look = -math.inf  # when the sleeping sweep looks next

    def fits(self, deadline: float) -> bool:
        """Whether a wait ending at ``deadline`` can be timed out by the sweep."""
        return self.sweeping and (not self.queue or self.queue[-1][0] <= deadline)

    def add(self, deadline: float, timeout: float, wait: E) -> None:
        self.queue.append((deadline, timeout, wait))
        if deadline < self._next_look:  # (the waits it slept for may have ended meanwhile)
            self._wake.set()

    def trim(self) -> None:
        queue = self.queue
        while queue and queue[0][2].is_done():
            queue.popleft()

    async def sweep(self, error: Callable[[float], BaseException], name: str) -> None:
        """Expire each wait with ``error(its timeout)`` when its deadline passes. Runs until
        cancelled; one at a time per queue (``name`` says whose, in the error otherwise)."""
        if self.sweeping:
            raise RuntimeError(f"{name}: the sweep of its deadlines is already running")
        self.sweeping = True
        try:
            while True:
                self.trim()
                first = self.queue[0][0] if self.queue else math.inf
                if first > trio.current_time():
                    self._wake, self._next_look = trio.Event(), first
                    with trio.move_on_at(first):  # (one scope per look, not per wait)
                        await self._wake.wait()
                    self._next_look = -math.inf
                    continue
                _, timeout, wait = self.queue.popleft()
                wait.expire(error(timeout))
        finally:
            self.sweeping = False


__all__ = ["DeadlineQueue", "Expiring"]
