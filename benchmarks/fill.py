"""Fill a store with many finished runs, fast, by bulk-inserting rows of the store's schema.

What one filled run looks like (what the engine itself would have written for a 3-task
workflow that completed on its first lease): a ``completed`` run with its payload and result,
three ``completed`` task steps (position ``0``..``2``, content hash as ``aiki.protocol``
computes it) and nine history events (``run.queued``, ``run.running``, then
``task.running``/``task.completed`` per step, ``run.completed``). Runs are spread over
:data:`WORKFLOWS` round-robin; every third has an idempotency key; ids come from the engine's
own ``Sources.new_id`` (seeded, so a fill is reproducible; time-ordered, each made at its
run's creation time), created a few ms apart in the past.

The schema comes from the store itself: the database is created by the store's own
migrations, and the column lists are the record classes' fields, so the rows stay in step
with ``aiki/store``. SQLite: ``executemany`` in large transactions with ``synchronous=OFF``
(the fill is a fixture, not under test), no ``ANALYZE`` (the store never runs it).
PostgreSQL: ``COPY`` (asyncpg ``copy_records_to_table``), then ``ANALYZE`` and ``CHECKPOINT``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from aiki.protocol import content_hash
from aiki.records import HistoryEvent, RunRecord, StepRecord
from aiki.sources import Sources

WORKFLOWS: tuple[str, ...] = ("orders", "emails", "billing", "reports", "sync")
VERSION = "1"
STEP_NAME = "fill-step"
STEPS_PER_RUN = 3
HISTORY_PER_RUN = 3 + 2 * STEPS_PER_RUN
FILL_FORMAT = 1  # bump when what a filled run looks like changes (invalidates caches)

RUN_FIELDS = tuple(f.name for f in attrs.fields(RunRecord))
STEP_FIELDS = tuple(f.name for f in attrs.fields(StepRecord))
HISTORY_FIELDS = tuple(f.name for f in attrs.fields(HistoryEvent) if f.name != "seq")

class SetClock:
    """A wall clock that says what it is told: ids made "at" a filled run's creation time."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


class RealClock:
    def now(self) -> float:
        return time.time()


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def _step_io(i: int, position: int) -> tuple[str, str, str]:
    input_json = json.dumps({"order": i, "part": position}, separators=(",", ":"))
    return input_json, content_hash(STEP_NAME, input_json), str(i * 10 + position)


def generate(start: int, count: int, seed: int = 6, *, base_time: float | None = None,
             with_step_seq: bool = True) -> Rows:
    """Rows for runs ``start .. start+count``: (runs, steps, history), in table column order
    (``RUN_FIELDS``; ``run_id, [seq,] STEP_FIELDS``; ``HISTORY_FIELDS``)."""
    clock = SetClock()
    sources = Sources(clock, random.Random(f"{seed}:{start}"))  # the engine's own run ids
    t0 = (time.time() - 30 * 86400) if base_time is None else base_time
    runs: list[tuple[Any, ...]] = []
    steps: list[tuple[Any, ...]] = []
    history: list[tuple[Any, ...]] = []
    for i in range(start, start + count):
        workflow = WORKFLOWS[i % len(WORKFLOWS)]
        worker = f"worker-{i % 7}"
        created = t0 + i * 0.002
        clock.t = created
        run_id = sources.new_id()
        at = created + 0.001
        finished = at + 0.004 * (STEPS_PER_RUN + 1)
        key = f"fill-{i}" if i % 3 == 0 else None
        total = 0
        history.append((run_id, created, "run.queued", 0, None, None, None, f"version {VERSION}"))
        history.append((run_id, at, "run.running", 1, worker, None, None, "lease epoch 1"))
        for position in range(STEPS_PER_RUN):
            input_json, input_hash, output = _step_io(i, position)
            total += int(output)
            step = attrs.astuple(StepRecord(str(position), "task", STEP_NAME, input_hash,
                                            input_json, None, "completed", 1, output=output))
            steps.append((run_id, position + 1, *step) if with_step_seq else (run_id, *step))
            t = at + 0.004 * position
            history.append((run_id, t, "task.running", 1, worker, str(position), STEP_NAME, None))
            history.append((run_id, t + 0.003, "task.completed", 1, worker, str(position),
                            STEP_NAME, None))
        history.append((run_id, finished, "run.completed", 1, worker, None, None, None))
        payload = json.dumps({"order": i, "amount_cents": 100 + i % 9000}, separators=(",", ":"))
        record = RunRecord(
            id=run_id, workflow=workflow, version=VERSION, payload=payload, state="completed",
            idempotency_key=key, attempts=1, lease_epoch=1, lease_owner=None,
            lease_expires_at=None, result=str(total), error_type=None,
            error_message=None, created_at=created, updated_at=finished, finished_at=finished,
        )
        runs.append(attrs.astuple(record))
    return runs, steps, history


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


# -- SQLite ---------------------------------------------------------------------------------
def schema_fingerprint() -> str:
    """Changes when the stores' schemas or what a filled run looks like change."""
    from aiki.store import sqlite as s

    parts = [repr(s.MIGRATIONS), repr(RUN_FIELDS), repr(STEP_FIELDS), repr(HISTORY_FIELDS),
             str(FILL_FORMAT), inspect.getsource(Sources)]
    try:
        from aiki.store.postgres import _schema

        parts.append(repr(_schema.MIGRATIONS))
    except ImportError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def create_sqlite(path: Path) -> sqlite3.Connection:
    """An empty store at ``path``, made as the store makes it (WAL, then its migrations);
    the open connection."""
    from aiki.store.sqlite import migrate

    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    migrate(db)
    return db


def fill_sqlite(path: Path, runs: int, *, chunk: int = 50_000,
                base_time: float | None = None) -> None:
    """Create the store at ``path`` and add ``runs`` finished runs to it, the first created at
    ``base_time`` (default: 30 days ago)."""
    db = create_sqlite(path)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -2000000")  # 2 GB: the random-id indexes stay in RAM
        run_sql = (f"INSERT INTO runs ({', '.join(RUN_FIELDS)}) "
                   f"VALUES ({', '.join('?' for _ in RUN_FIELDS)})")
        step_cols = ("run_id", "seq", *STEP_FIELDS)
        step_sql = (f"INSERT INTO steps ({', '.join(step_cols)}) "
                    f"VALUES ({', '.join('?' for _ in step_cols)})")
        hist_sql = (f"INSERT INTO history ({', '.join(HISTORY_FIELDS)}) "
                    f"VALUES ({', '.join('?' for _ in HISTORY_FIELDS)})")
        base = time.time() - 30 * 86400 if base_time is None else base_time
        for start, count in chunks(runs, chunk):
            r, s, h = generate(start, count, base_time=base)
            db.execute("BEGIN")
            db.executemany(run_sql, r)
            db.executemany(step_sql, s)
            db.executemany(hist_sql, h)
            db.execute("COMMIT")
        # No ANALYZE: the store never runs it, so a store grown by real use has no statistics
        # and the planner works without them here too.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def cached_sqlite(runs: int, cache_dir: Path | None = None) -> Path:
    """A filled SQLite file for ``runs``, made once per schema and kept in a cache directory
    (``$AIKI_BENCH_CACHE`` or the system temp dir); copy it before use, never write to it."""
    directory = cache_dir or Path(os.environ.get("AIKI_BENCH_CACHE")
                                  or Path(os.environ.get("TMPDIR", "/tmp")) / "aiki-bench-cache")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"filled-{runs}-{schema_fingerprint()}.db"
    if not path.exists():
        partial = path.with_suffix(f".partial{os.getpid()}.db")
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
        fill_sqlite(partial, runs)
        os.replace(partial, path)
    return path


# -- PostgreSQL -----------------------------------------------------------------------------
def create_postgres(url: str) -> None:
    """Migrate an empty database ``url`` names (schema ``aiki``) by opening the store."""
    import trio

    from aiki.store.postgres import PostgresStore

    async def create() -> None:
        async with PostgresStore.open(url):
            pass

    trio.run(create)


def fill_postgres(url: str, runs: int, *, chunk: int = 100_000, schema: str = "aiki") -> None:
    """Create the store in the (empty) database ``url`` and COPY ``runs`` finished runs in."""
    import asyncio

    import asyncpg

    create_postgres(url)

    async def copy() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET synchronous_commit = off")
            base = time.time() - 30 * 86400
            for start, count in chunks(runs, chunk):
                r, s, h = generate(start, count, base_time=base, with_step_seq=False)
                async with conn.transaction():
                    await conn.copy_records_to_table("runs", records=r, columns=RUN_FIELDS,
                                                     schema_name=schema)
                    await conn.copy_records_to_table("steps", records=s,
                                                     columns=("run_id", *STEP_FIELDS),
                                                     schema_name=schema)
                    await conn.copy_records_to_table("history", records=h,
                                                     columns=HISTORY_FIELDS, schema_name=schema)
            await conn.execute(f'ANALYZE "{schema}".runs, "{schema}".steps, "{schema}".history')
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    asyncio.run(copy())
