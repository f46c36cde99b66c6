"""The Store interface that every store (memory, SQLite, PostgreSQL) implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from aiki.errors import AikiError
from aiki.records import (
    EventRecord,
    HistoryEvent,
    RunCount,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitRecord,
)
from aiki.store.ops import Op

T = TypeVar("T")


class Store(Protocol):
    """Durable state of runs. Writes are :mod:`aiki.store.ops` operations applied in batches.

    ``apply`` runs all ``ops`` in one transaction and returns one outcome per op, in order:
    the op's result, or the :class:`~aiki.errors.AikiError` that refused it (that op wrote
    nothing; the others are unaffected). An unexpected failure (the database is gone) raises
    :class:`~aiki.errors.StoreUnavailable` for the whole batch, and nothing of it is kept.
    """

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]: ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]: ...

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]: ...

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        """What a waiting run waits for (empty unless it is ``waiting``)."""
        ...

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        """The child runs it started (``wf.start_child``), in the order it started them."""
        ...

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        """Every event sent to the run, in send order, delivered or buffered."""
        ...

    async def list_runs(
        self, *, workflow: str | None = None, state: str | None = None, limit: int = 100
    ) -> tuple[RunRecord, ...]:
        """Newest first."""
        ...

    async def run_counts(self) -> tuple[RunCount, ...]:
        """Unfinished runs (every state but the terminal ones) counted by workflow, version
        and state, sorted by those: what the ``aiki_runs`` gauges and readiness read."""
        ...

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None: ...

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        """Every schedule, by id."""
        ...

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        """What became of a schedule's occurrences, the newest first."""
        ...

    async def next_due(self) -> float | None:
        """The earliest time the timer has work: a wait's due time, a lease's expiry, or an
        unpaused schedule's next occurrence."""
        ...

    async def aclose(self) -> None: ...


async def execute(store: Store, op: Op[T]) -> T:
    """Apply one op on its own and return its outcome, raising it if it was refused."""
    [outcome] = await store.apply([op])
    if isinstance(outcome, AikiError):
        raise outcome
    return outcome  # type: ignore[no-any-return]
