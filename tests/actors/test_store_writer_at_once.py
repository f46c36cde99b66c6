"""A write applied at once, in its asker's task, when the writer has nothing before it.

SQLite applies a batch on Trio's thread when no other task is runnable; then a write the
StoreWriter would have batched alone, a scheduler round and two task switches later, is
applied by its asker. Only when nothing was handed to the writer before it: writes are
applied in the order they were given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from aiki.actors.store_writer import StoreWriter
from aiki.errors import StoreUnavailable
from aiki.metrics import STORE_TRANSACTIONS, Metrics
from aiki.store import SqliteStore
from aiki.store import ops as o
from aiki.store.ops import Op


class Counted(SqliteStore):
    """A SQLite store that notes which batches went through ``apply`` (the writer's task)
    and which were applied at once; ``held`` holds ``apply``."""

    queued: list[list[str]]
    at_once: list[list[str]]
    held: trio.Event | None

    async def apply(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.queued.append([getattr(op, "run_id", "") for op in ops])
        if self.held is not None:
            await self.held.wait()
        return await super().apply(ops)

    def apply_at_once(self, ops: list[Op[Any]]) -> list[Any] | None:
        done = super().apply_at_once(ops)
        if done is not None:
            self.at_once.append([getattr(op, "run_id", "") for op in ops])
        return done


def enqueue(run_id: str) -> o.Enqueue:
    return o.Enqueue(run_id, "wf", "1", "{}", None, 1.0)


@asynccontextmanager
async def writing(tmp_path: Path) -> AsyncIterator[tuple[Counted, StoreWriter]]:
    store = await Counted.open(str(tmp_path / "a.db"))
    assert isinstance(store, Counted)
    store.queued, store.at_once, store.held = [], [], None
    writer = StoreWriter(store, Metrics())  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            yield store, writer
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_lone_write_is_applied_by_its_asker_and_counted(tmp_path: Path) -> None:
    async with writing(tmp_path) as (store, writer):
        outcome = await writer.write(enqueue("r1"))
        assert outcome.created
        assert store.at_once == [["r1"]] and store.queued == []
        assert writer.metrics.value(STORE_TRANSACTIONS, ("committed",)) == 1
        assert (await store.get_run("r1")) is not None


async def test_a_write_given_after_one_handed_to_the_writer_waits_its_turn(
    tmp_path: Path,
) -> None:
    async with writing(tmp_path) as (store, writer):
        store._threaded = 1  # the next batch goes through the writer (as after a slow one)
        store.held = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.write, enqueue("first"))
            await trio.testing.wait_all_tasks_blocked()
            assert store.queued == [["first"]]
            nursery.start_soon(writer.write, enqueue("second"))  # would be at once, idle
            await trio.testing.wait_all_tasks_blocked()
            assert store.at_once == []
            store.held.set()
            store.held = None
        assert store.queued == [["first"], ["second"]]
        runs = await store.list_runs()
        assert [r.id for r in runs] == ["second", "first"]  # (newest first)


async def test_a_bug_in_a_write_applied_at_once_is_a_store_failure_to_its_asker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    async with writing(tmp_path) as (store, writer):
        def broken(ops: list[Op[Any]]) -> list[Any] | None:
            raise KeyError("a bug")

        monkeypatch.setattr(writer, "_inline", broken)
        with pytest.raises(StoreUnavailable, match="store write failed: KeyError"):
            await writer.write(enqueue("r1"))
        assert "a write applied at once failed" in caplog.text
        assert writer.metrics.value(STORE_TRANSACTIONS, ("failed",)) == 1
        monkeypatch.undo()
        assert (await writer.write(enqueue("r2"))).created  # it goes on


async def test_a_write_given_while_one_is_handed_over_goes_to_the_writer_too(
    tmp_path: Path,
) -> None:
    # The moment between a write handed to the waiting writer (the mailbox is empty
    # again) and the writer's next step (it is not applying yet): another write applied at
    # once then would overtake it. Simulated: one write asked and not answered.
    async with writing(tmp_path) as (store, writer):
        writer._asked = 1
        assert (await writer.write(enqueue("r1"))).created
        writer._asked = 0
        assert store.queued == [["r1"]] and store.at_once == []
