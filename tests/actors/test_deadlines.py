"""The DeadlineQueue's sweep: one task times out many waits, each at its own deadline."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from aiki.actors.deadlines import DeadlineQueue


class Wait:
    def __init__(self) -> None:
        self.ended: BaseException | None = None
        self.at: float | None = None
        self.answered = False

    def is_done(self) -> bool:
        return self.answered or self.ended is not None

    def expire(self, exc: BaseException) -> None:
        if not self.is_done():
            self.ended, self.at = exc, trio.current_time()


async def test_a_wait_added_while_the_sweep_sleeps_for_a_later_one_expires_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The sweep sleeps until the first wait's deadline (or for ever, with none left); that
    # wait is answered; a new one with an earlier deadline must still expire at its own.
    queue: DeadlineQueue[Wait] = DeadlineQueue()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.sweep, lambda timeout: TimeoutError(timeout), "test")
        await trio.sleep(0)
        for first in (30.0, math.inf):
            start = trio.current_time()
            answered = Wait()
            if math.isfinite(first):
                queue.add(start + first, first, answered)
            await trio.sleep(0.5)  # the sweep sleeps until then (or for ever)
            answered.answered = True
            queue.trim()
            wait = Wait()
            assert queue.fits(trio.current_time() + 2.0)
            queue.add(trio.current_time() + 2.0, 2.0, wait)
            await trio.sleep(10)
            assert isinstance(wait.ended, TimeoutError)
            assert wait.at == pytest.approx(start + 2.5)
            assert not queue.queue
        # Waits of one timeout expire in order, each at its deadline; answered ones never.
        start = trio.current_time()
        waits = [Wait() for _ in range(4)]
        for i, w in enumerate(waits):
            queue.add(start + 1.0 + i, 1.0, w)
        waits[1].answered = True
        await trio.sleep(10)
        assert [w.at for w in waits] == [
            pytest.approx(start + 1.0), None, pytest.approx(start + 3.0),
            pytest.approx(start + 4.0)]
        assert not queue.queue  # every wait ended and left it
        nursery.cancel_scope.cancel()
