"""The stores under test. The conformance suite runs against every kind in ``STORE_KINDS``.

To add a store, add its name to ``STORE_KINDS`` and one branch to ``open_test_store`` that
opens a fresh, empty instance of it. PostgreSQL stores each get a schema of their own on the
session's server (``postgres`` in ``tests/conftest.py``), so every one starts empty.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from aiki.store import MemoryStore, SqliteStore, Store
from tests.conftest import TestPostgres

STORE_KINDS = ["memory", "sqlite", "postgres"]

_fresh = itertools.count()


@asynccontextmanager
async def open_test_store(
    kind: str, directory: Path, postgres: TestPostgres | None = None
) -> AsyncIterator[Store]:
    """A fresh, empty store of ``kind``, closed on exit."""
    store: Store
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = await SqliteStore.open(str(directory / f"store-{next(_fresh)}.db"))
    elif kind == "postgres":
        from aiki.store.postgres import PostgresStore

        assert postgres is not None, "the postgres kind needs the session's server"
        store = await PostgresStore.open(postgres.dsn, schema=postgres.fresh_schema())
    else:
        raise ValueError(f"unknown store kind {kind!r}")
    try:
        yield store
    finally:
        await store.aclose()


StoreFactory = Callable[[], AbstractAsyncContextManager[Store]]


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def store_factory(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> StoreFactory:
    """Opens fresh stores of the kind under test (for Hypothesis: one per example)."""
    # The server starts only when a PostgreSQL test first asks for it.
    postgres = request.getfixturevalue("postgres") if store_kind == "postgres" else None
    return lambda: open_test_store(store_kind, tmp_path, postgres)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    async with store_factory() as opened:
        yield opened
