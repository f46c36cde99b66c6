"""End-to-end fixtures: an embedded engine on each store, in virtual time."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from aiki.records import HistoryEvent, RunRecord, StepRecord
from aiki.sources import Sources
from aiki.store import MemoryStore, SqliteStore, Store
from aiki.store import ops as o

T = TypeVar("T")


class ClockHonestStore:
    """A store whose calls hold virtual time still while they wait on a real database.

    Under ``MockClock(autojump_threshold=0)``, a real round trip to PostgreSQL leaves every
    Trio task blocked, which the clock takes as leave to jump to the next deadline: leases
    would expire and timeouts fire during one query. While any call is in flight this turns
    autojump off (public ``MockClock.autojump_threshold``), so the clock stands still for
    the database the way it does for the inline SQLite store, and jumps again once the
    engine is idle.
    """

    store: Store

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self._clock = clock
        self._in_flight = 0
        self._threshold = clock.autojump_threshold

    async def _hold(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._in_flight == 0:
            self._threshold = self._clock.autojump_threshold
            self._clock.autojump_threshold = math.inf
        self._in_flight += 1
        try:
            return await call()
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._clock.autojump_threshold = self._threshold

    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        return await self._hold(lambda: self.store.apply(ops))

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._hold(lambda: self.store.get_run(run_id))

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self._hold(lambda: self.store.get_steps(run_id))

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        return await self._hold(lambda: self.store.get_history(run_id))

    async def list_runs(
        self, *, workflow: str | None = None, state: str | None = None, limit: int = 100
    ) -> tuple[RunRecord, ...]:
        return await self._hold(
            lambda: self.store.list_runs(workflow=workflow, state=state, limit=limit)
        )

    async def next_due(self) -> float | None:
        return await self._hold(self.store.next_due)

    async def run_counts(self) -> Any:
        return await self._hold(self.store.run_counts)

    async def get_waits(self, run_id: str) -> Any:
        return await self._hold(lambda: self.store.get_waits(run_id))

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        return await self._hold(lambda: self.store.get_children(run_id))

    async def get_events(self, run_id: str) -> Any:
        return await self._hold(lambda: self.store.get_events(run_id))

    async def get_schedule(self, schedule_id: str) -> Any:
        return await self._hold(lambda: self.store.get_schedule(schedule_id))

    async def list_schedules(self) -> Any:
        return await self._hold(self.store.list_schedules)

    async def get_firings(self, schedule_id: str, limit: int = 20) -> Any:
        return await self._hold(lambda: self.store.get_firings(schedule_id, limit))

    async def aclose(self) -> None:
        await self._hold(self.store.aclose)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def engine_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store; SQLite runs inline so virtual time cannot jump during a write, and
    PostgreSQL (a fresh schema on the session's server) holds the mock clock still while a
    query is in flight."""
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = await SqliteStore.open(str(tmp_path / "e2e.db"), offload=False)
    else:
        from aiki.store.postgres import PostgresStore

        postgres = request.getfixturevalue("postgres")
        clock = trio.lowlevel.current_clock()
        opening = PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema())
        if isinstance(clock, trio.testing.MockClock):
            honest = ClockHonestStore(clock)
            honest.store = await honest._hold(lambda: opening)  # opening is real I/O too
            store = honest
        else:
            store = await opening
    yield store
    await store.aclose()


@pytest.fixture
def sources() -> Sources:
    return Sources.seeded(1234)
