"""The server's wall clock as a worker knows it: the clock durable deadlines are kept on.

A deadline scope's deadline is recorded once and judged again on whichever worker replays
the run, and by the server's timer when the run waits past it. Judged on each worker's own
wall clock, a deadline recorded on one and replayed on another would fire early by their
skew. So the deadline is kept on the servers' clock (the servers sharing a store keep one
time, as their leases already require), which a worker learns from the replies that carry
it (the welcome and each heartbeat's ack): a request sent at local time ``t0`` whose reply,
received at ``t1``, says the server's clock read ``s`` bounds the server's clock at a later
local time ``t`` to ``[s + (t - t1), s + (t - t0)]``, widened by the rate at which the two
clocks may drift apart. A deadline is recorded from the upper bound and judged on the lower
one: it never fires early on the server's clock, and fires at most a round trip late.
"""

from __future__ import annotations

import attrs
import trio

from aiki.sources import WallClock

# How fast the local monotonic clock and the server's wall clock may drift apart (1000 ppm,
# far above a quartz oscillator's): the bounds widen by it as the last reading ages.
DRIFT = 1e-3


@attrs.define
class ServerTime:
    """The last reading of the server's clock: ``reading`` (epoch seconds), taken between
    ``sent`` and ``received`` (this process's ``trio.current_time()``). Until one comes,
    this worker's own wall clock stands in for the server's."""

    local: WallClock
    reading: float | None = None
    sent: float = 0.0
    received: float = 0.0

    def heard(self, reading: float | None, sent: float, received: float) -> None:
        """A reply of a request sent at ``sent``, received at ``received``, said the
        server's clock read ``reading`` (None: a server that does not say)."""
        if reading is not None:
            self.reading, self.sent, self.received = reading, sent, received

    def bounds(self) -> tuple[float, float]:
        """The server's clock now: (at least, at most)."""
        if self.reading is None:
            now = self.local.now()
            return now, now
        t = trio.current_time()
        return (self.reading + (t - self.received) * (1 - DRIFT),
                self.reading + (t - self.sent) * (1 + DRIFT))


__all__ = ["DRIFT", "ServerTime"]
