"""The sources of time, ids and randomness that engine code uses, injectable for simulation.

This is the one module of ``aiki`` allowed to read the real wall clock, the operating system's
randomness and ``uuid.uuid4``. Everything else takes a :class:`Sources` and asks it, so a
simulation can run a whole cluster from one seed and get the same trace every time.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Protocol

import attrs
import trio

from aiki.metrics import Metrics, NoMetrics


class WallClock(Protocol):
    """Seconds since the Unix epoch, as a float."""

    def now(self) -> float: ...


@attrs.define
class TrioWallClock:
    """Wall time anchored once to the real clock, then advanced by Trio's clock.

    Under ``trio.testing.MockClock`` it moves in virtual time, so leases, retries and
    timestamps all follow the test's clock. It anchors on its first reading, which must be
    inside ``trio.run``.
    """

    anchor_wall: float | None = None
    offset: float = 0.0
    _anchor_trio: float | None = None

    def now(self) -> float:
        if self._anchor_trio is None:
            self._anchor_trio = trio.current_time()
            if self.anchor_wall is None:
                self.anchor_wall = time.time()
        assert self.anchor_wall is not None
        return self.anchor_wall + self.offset + (trio.current_time() - self._anchor_trio)


@attrs.define
class SystemWallClock:
    """The system's wall clock (``time.time``): for code that never runs inside Trio, such as
    the asyncio and blocking clients."""

    def now(self) -> float:
        return time.time()


@attrs.define
class Sources:
    """Clock, id generator, random source and metrics sink handed to every component that
    needs one. ``metrics`` is the one sink of the process (or of one simulated node): every
    actor counts into it, and the server's ``/metrics`` reads it."""

    clock: WallClock
    rng: random.Random
    metrics: Metrics = attrs.field(factory=Metrics)

    def new_id(self) -> str:
        """A time-ordered id for a stored record: a UUIDv7 string (RFC 9562), 48 bits of
        milliseconds from ``clock`` and 74 random bits from ``rng``.

        Ids made close in time sort close together, so inserting runs touches the right-hand
        pages of the primary key and history indexes instead of random ones: with a million
        finished runs stored, a random id made batched enqueues several times slower. The
        random bits alone keep ids unique, also when the clock steps back.
        """
        millis = int(self.clock.now() * 1000) & ((1 << 48) - 1)
        rand_a, rand_b = self.rng.getrandbits(12), self.rng.getrandbits(62)
        value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        return str(uuid.UUID(int=value))

    def uuid4(self) -> str:
        """A random UUID4 string drawn from ``rng`` (seeded in simulation)."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def short_id(self) -> str:
        """Eight random hex digits, for naming a client or worker."""
        return f"{self.rng.getrandbits(32):08x}"

    @classmethod
    def real(cls) -> Sources:
        """Real sources: wall clock via Trio, ids and randomness from the OS; a metrics sink,
        or none that counts when ``$AIKI_METRICS`` is ``off`` (to measure what counting
        costs)."""
        metrics = NoMetrics() if os.environ.get("AIKI_METRICS") == "off" else Metrics()
        return cls(clock=TrioWallClock(), rng=random.Random(uuid.uuid4().int), metrics=metrics)

    @classmethod
    def system(cls) -> Sources:
        """Real sources that need no Trio: the system clock, randomness from the OS."""
        return cls(clock=SystemWallClock(), rng=random.Random(uuid.uuid4().int))

    @classmethod
    def seeded(cls, seed: int, clock: WallClock | None = None) -> Sources:
        """Deterministic sources for tests and simulation."""
        return cls(
            clock=clock if clock is not None else TrioWallClock(anchor_wall=1_700_000_000.0),
            rng=random.Random(seed),
        )
