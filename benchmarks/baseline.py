"""The floor: single-row INSERT + COMMIT per second, per store, one client (issue 6).

One durable checkpoint cannot cost less than one commit, so each Aiki throughput row also
shows its per-task cost as a multiple of one commit measured here, in the same run.

- SQLite: a file opened by the store's own ``_connect`` (WAL, ``synchronous = FULL``,
  ``foreign_keys = ON``, so the pragmas cannot drift from the store's); each commit is one
  auto-committed ``INSERT`` through Python's ``sqlite3``.
- PostgreSQL: the bench run's server (``fsync``, ``synchronous_commit`` and
  ``full_page_writes`` on), one asyncpg connection on plain asyncio (no trio-asyncio bridge:
  the database's own floor), one auto-committed prepared ``INSERT`` per commit.

Each repetition uses a fresh file or database.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from aiki.store import sqlite as sqlite_store
from benchmarks.suite import Options, Row, Suite

PAYLOAD = '{"x": 41, "output": 42, "note": "a checkpoint-sized row of about a hundred bytes"}'


def commits(options: Options) -> int:
    return 300 if options.quick else 2000


def sqlite_commit_rate(path: str, count: int) -> float:
    """Commits per second: ``count`` single-row INSERTs, each its own transaction."""
    # Opened the way the store opens its file (its pragmas, and its schema beside the table).
    db = sqlite_store._connect(path, "FULL", busy_timeout=5.0)
    try:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        for _ in range(20):  # warm-up
            db.execute("INSERT INTO t (v) VALUES (?)", (PAYLOAD,))
        start = time.perf_counter()
        for _ in range(count):
            db.execute("INSERT INTO t (v) VALUES (?)", (PAYLOAD,))
        elapsed = time.perf_counter() - start
    finally:
        db.close()
    return count / elapsed


def postgres_commit_rate(url: str, count: int) -> float:
    import asyncpg

    async def measure() -> float:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE t (id BIGSERIAL PRIMARY KEY, v TEXT NOT NULL)")
            insert = await conn.prepare("INSERT INTO t (v) VALUES ($1)")
            for _ in range(20):  # warm-up
                await insert.fetch(PAYLOAD)
            start = time.perf_counter()
            for _ in range(count):
                await insert.fetch(PAYLOAD)
            return count / (time.perf_counter() - start)
        finally:
            await conn.close()

    return asyncio.run(measure())


def run(options: Options) -> list[Row]:
    count = commits(options)
    rows = []
    samples = []
    with tempfile.TemporaryDirectory(prefix="aiki-bench-baseline-") as directory:
        for rep in range(options.reps):
            samples.append(sqlite_commit_rate(os.path.join(directory, f"{rep}.db"), count))
    rows.append(_row("SQLite WAL, synchronous=FULL", "sqlite", samples, count))
    if options.postgres is None:
        print("baseline: no PostgreSQL server, PostgreSQL row skipped", file=sys.stderr)
        return rows
    samples = []
    for _ in range(options.reps):
        url = options.postgres.fresh_database("baseline")
        try:
            samples.append(postgres_commit_rate(url, count))
        finally:
            options.postgres.drop_database(url)
    rows.append(_row("PostgreSQL, synchronous_commit=on", "postgres", samples, count))
    return rows


def _row(label: str, store: str, samples: list[float], count: int) -> Row:
    return Row("baseline", label, "commits/s", "1/s", samples, extra={
        "store": store, "commits": count, "clients": 1,
        "commit_ms": [1000.0 / s for s in samples],
        "columns": {"commits per rep": str(count), "clients": "1"},
    })


SUITE = Suite(name="baseline", run=run)
