"""The Timer: no store query while nothing is due, and a wake-up on time."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

import aiki
from aiki.store import MemoryStore


class Counting(MemoryStore):
    calls: collections.Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.calls = collections.Counter()

    async def apply(self, ops: Sequence[Any]) -> list[Any]:
        self.calls.update(type(op).__name__ for op in ops)
        return await super().apply(ops)

    async def next_due(self) -> float | None:
        self.calls["next_due"] += 1
        return await super().next_due()

    async def list_runs(self, **kwargs: Any) -> Any:
        self.calls["list_runs"] += 1
        return await super().list_runs(**kwargs)


woke: list[float] = []


@aiki.task(name="mark")
async def mark(x: int) -> int:
    woke.append(trio.current_time())
    return x


@aiki.workflow(name="long-nap", version="1")
async def long_nap(run: aiki.WorkflowRun, seconds: float) -> int:
    await run.sleep(seconds)
    return await mark.run(run, 1)


async def test_an_idle_server_with_sleeping_runs_asks_nothing_of_its_store(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Counting()
    async with aiki.embedded(store, sources=aiki.Sources.seeded(3)) as client:
        async with aiki.worker(client, workflows=[long_nap]):
            handles = [await long_nap.enqueue(client, 86400.0 * (i + 1)) for i in range(50)]
            with trio.fail_after(60):
                while len(await store.list_runs(state="waiting")) < 50:
                    await trio.sleep(1)
            await trio.sleep(31)  # the last lease granted would have expired by now
            store.calls.clear()
            await trio.sleep(86400 - 120)  # nearly a day: nothing is due
            assert store.calls == collections.Counter()
            woke.clear()
            start = trio.current_time()
            assert await handles[0].wait_for_completion(timeout=3600) == 1
            # On time: the Timer slept until the due time (no poll beat to wait for).
            assert woke[0] - start < 121.0
            assert store.calls["WakeDue"] == 1


async def test_the_lease_clock_absorbs_a_step_forward_and_catches_up_slower_than_the_margin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lease must not expire early by real time when the wall clock steps forward: its
    worker cannot see the step, and stops trusting its lease only a margin (10% of the TTL)
    before its end by its own clock."""
    from aiki.actors.timer import CATCH_UP, LeaseClock

    leases = LeaseClock()
    wall = 1000.0
    assert leases.now(wall) == wall
    await trio.sleep(1.0)
    wall += 1.0 + 5.0  # a second passes, and the clock steps 5 s forward
    assert leases.now(wall) == pytest.approx(wall - 5.0)
    await trio.sleep(10.0)
    wall += 10.0
    # Ten seconds later it reads at most 10% more than the real time that passed.
    assert leases.now(wall) == pytest.approx(wall - 5.0 + 10 * CATCH_UP)
    assert CATCH_UP < 0.1
    await trio.sleep(200.0)
    wall += 200.0
    assert leases.now(wall) == wall  # caught up
    wall -= 3.0  # a step back is followed at once (leases then expire late: safe)
    assert leases.now(wall) == wall


async def test_the_lease_clock_credits_no_catch_up_to_the_time_before_a_step_it_sees(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Between two sparse readings (the server paused 35 s), a step forward may have come
    at any moment, the last among them: none of the time before the reading that saw it is
    catch-up. Credited with that time, the clock expired a lease 1.8 s early by real time:
    a worker woke from a pause inside its margin and ran a task another worker had
    completed (seed 6787)."""
    from aiki.actors.timer import CATCH_UP, LeaseClock

    leases = LeaseClock()
    wall = 1000.0
    assert leases.now(wall) == wall
    await trio.sleep(35.0)  # paused; at its end the servers' clock steps 4 s forward
    wall += 35.0 + 4.0
    assert leases.now(wall) == pytest.approx(wall - 4.0)
    await trio.sleep(2.0)  # from here on it catches up
    wall += 2.0
    assert leases.now(wall) == pytest.approx(wall - 4.0 + 2.0 * CATCH_UP)
    # A lag it had before the pause is caught up through it as through any time.
    await trio.sleep(20.0)
    wall += 20.0 + 1.0
    assert leases.now(wall) == pytest.approx(wall - (4.0 - 22.0 * CATCH_UP) - 1.0)


async def test_the_lease_clock_expires_nothing_for_a_ttl_of_real_time_after_its_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A step forward before the first reading (while the server was down) cannot be told
    from time that passed: for the hold (the lease TTL) nothing expires, then the clock
    reads the wall clock less what it absorbed since the start."""
    from aiki.actors.timer import CATCH_UP, LeaseClock

    leases = LeaseClock(hold=10.0)
    wall = 1000.0
    leases.start(wall)
    assert leases.holding() == 10.0
    await trio.sleep(9.9)
    assert leases.now(wall + 9.9 + 500.0) == -math.inf  # and a step of 500 s meanwhile
    await trio.sleep(0.2)
    assert leases.holding() == 0.0
    # (The step absorbed, caught up at CATCH_UP of the 0.2 s since it was seen.)
    assert leases.now(wall + 10.1 + 500.0) == pytest.approx(wall + 10.1 + 0.2 * CATCH_UP)
    leases.start(wall + 1e6)  # a second start (a supervisor restart) holds nothing again
    assert leases.holding() == 0.0


async def test_a_restarted_server_expires_no_lease_for_a_ttl_whatever_its_clock_says(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run leased before the server (re)started, whose lease expiry has passed by the wall
    clock at the start (a step forward while the server was down, or downtime: the server
    cannot tell them apart), is queued again only a lease TTL of real time after the start:
    its holder may have renewed it just before, and trusts it for up to 90% of the TTL by
    its own clock. Then it is, and another worker finishes it."""
    from aiki.records import RunRecord
    from aiki.server import Server
    from aiki.sources import Sources, TrioWallClock
    from aiki.store import ops as o
    from aiki.transport.memory import MemoryTransport

    store = MemoryStore()
    granted = 1_700_000_000.0
    await store.apply([o.Enqueue("r1", "stamp", "1", "null", None, granted)])
    claimed = (await store.apply([o.Claim("old-worker", (("stamp", "1"),), 1, granted,
                                          10.0)]))[0]
    assert [c.run.id for c in claimed] == ["r1"]
    # The server starts 60 s after the grant by its wall clock (its lease TTL is 10 s).
    sources = Sources.seeded(1, TrioWallClock(anchor_wall=granted + 60.0))
    server = Server(store, sources, lease_ttl=10.0)
    transport = MemoryTransport()

    async def state() -> str:
        run: RunRecord | None = await store.get_run("r1")
        assert run is not None
        return run.state

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "embedded")
        start = trio.current_time()
        await trio.sleep(9.5)
        assert await state() == "running"  # still old-worker's
        while await state() == "running":
            await trio.sleep(0.1)
        assert 10.0 <= trio.current_time() - start <= 11.5
        assert await state() == "queued"
        nursery.cancel_scope.cancel()


async def test_the_lease_clock_sees_every_reading_of_the_servers_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A step back, a lease granted on the clock set back, then a step forward as large:
    between two looks of lease expiry the clock moved by nothing, but the lease's expiry
    came early by the second step. The server's clock shows each reading to the lease
    clock (the grant's reading among them), so the step forward is absorbed (seed 180)."""
    from aiki.actors.timer import LeaseClock, ObservedClock
    from aiki.sources import TrioWallClock

    wall = TrioWallClock(anchor_wall=1000.0)
    leases = LeaseClock()
    blind = LeaseClock()  # shown only what lease expiry reads
    clock = ObservedClock(wall, leases)
    assert leases.now(clock.now()) == 1000.0  # expiry looks (the Timer starts)
    assert blind.now(1000.0) == 1000.0
    await trio.sleep(1.0)
    wall.offset -= 4.0  # set back
    granted = clock.now()  # a lease granted: its expiry is granted + TTL, on this clock
    assert granted == 997.0
    await trio.sleep(1.0)
    wall.offset += 4.0  # and forward again
    # Expiry looks: by real time one second has passed since the grant, and so it reads.
    assert leases.now(wall.now()) == pytest.approx(granted + 1.0)
    # Blind to the grant's reading, the clock saw no step: the lease looks 4 s older.
    assert blind.now(wall.now()) == pytest.approx(granted + 5.0)
