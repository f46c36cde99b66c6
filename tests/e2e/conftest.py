"""End-to-end fixtures: an embedded engine on each store, in virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiki.sources import Sources
from aiki.store import MemoryStore, SqliteStore, Store


@pytest.fixture(params=["memory", "sqlite"])
async def engine_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store; SQLite runs inline so virtual time cannot jump during a write."""
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    else:
        store = await SqliteStore.open(str(tmp_path / "e2e.db"), offload=False)
    yield store
    await store.aclose()


@pytest.fixture
def sources() -> Sources:
    return Sources.seeded(1234)
