"""The SQLite store: the embedded default, on the standard library's ``sqlite3``.

It behaves exactly like :class:`~aiki.store.memory.MemoryStore` (the conformance suite holds
it to that): same outcomes, same records, same history events.

- One connection, WAL journal, ``busy_timeout``, foreign keys on. Numbered migrations
  (``MIGRATIONS``, tracked in ``PRAGMA user_version``) are applied in order at open, each in
  its own transaction.
- ``apply`` runs a whole batch in one ``BEGIN IMMEDIATE ... COMMIT``. Every op checks before
  it writes, so an op refused on purpose (``StaleLease``, ``StepConflict``) writes nothing and
  the rest of the batch goes on. Any ``sqlite3`` error rolls the whole batch back and raises
  :class:`~aiki.errors.StoreUnavailable` naming the cause.
- Idempotent enqueue relies on the unique index on ``runs(workflow, idempotency_key)``:
  ``INSERT ... ON CONFLICT DO NOTHING``, then a select; never a read-then-insert.
- Blocking calls stay off the Trio thread: by default each call runs in a worker thread via
  ``trio.to_thread.run_sync``, one at a time (a ``CapacityLimiter(1)`` guards the one
  connection). ``offload=False`` runs them inline, for tests under ``MockClock`` and the
  simulation, where real threads are not welcome.

``synchronous``: ``FULL`` (the default) syncs the WAL at every commit, so an acknowledged
enqueue or checkpoint survives an OS crash or power loss too (durability rule 1), for one
fsync per transaction, which ``StoreWriter``'s group commit amortizes over many writes.
``NORMAL`` syncs only at WAL checkpoints: still safe against a crash of the process and never
corrupt, but power loss may roll back the last commits. Choose it knowingly.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import attrs
import trio

from aiki.errors import AikiError, StaleLease, StoreUnavailable
from aiki.records import (
    ClaimedRun,
    HistoryEvent,
    Lease,
    RunRecord,
    StepRecord,
)
from aiki.store import ops as o
from aiki.store.memory import (
    history_event_for_step,
    key_conflict_error,
    stale_lease_error,
    step_write_changes,
)

T = TypeVar("T")

# Each migration is a list of statements, applied in one transaction; never edit one that has
# shipped, append a new one. ``runs.seq`` is the enqueue order (FIFO claims, newest-first
# listing); ``steps.seq`` keeps a run's steps in the order they were first recorded.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            workflow TEXT NOT NULL, version TEXT NOT NULL, payload TEXT NOT NULL,
            state TEXT NOT NULL, idempotency_key TEXT,
            attempts INTEGER NOT NULL, lease_epoch INTEGER NOT NULL,
            lease_owner TEXT, lease_expires_at REAL, wake_at REAL,
            result TEXT, error_type TEXT, error_message TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL)""",
        """CREATE UNIQUE INDEX runs_idempotency ON runs (workflow, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX runs_claim ON runs (state, workflow, version, seq)",
        "CREATE INDEX runs_wake ON runs (state, wake_at)",
        "CREATE INDEX runs_lease ON runs (state, lease_expires_at)",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (id), position TEXT NOT NULL,
            seq INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
            input_hash TEXT NOT NULL, input TEXT NOT NULL, idempotency_key TEXT,
            state TEXT NOT NULL, attempts INTEGER NOT NULL,
            output TEXT, error_type TEXT, error_message TEXT, next_attempt_at REAL,
            PRIMARY KEY (run_id, position))""",
        """CREATE UNIQUE INDEX steps_idempotency ON steps (run_id, name, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        """CREATE TABLE history (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs (id),
            at REAL NOT NULL, event TEXT NOT NULL, attempt INTEGER NOT NULL,
            worker_id TEXT, position TEXT, name TEXT, detail TEXT)""",
        "CREATE INDEX history_run ON history (run_id, seq)",
    ),
)

RUN_COLUMNS = ", ".join(f.name for f in attrs.fields(RunRecord))
STEP_COLUMNS = ", ".join(f.name for f in attrs.fields(StepRecord))
HISTORY_COLUMNS = ", ".join(f.name for f in attrs.fields(HistoryEvent))
NO_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}

Db = sqlite3.Connection


# -- opening ------------------------------------------------------------------------------
def _connect(path: str, synchronous: str, busy_timeout: float) -> Db:
    if path != ":memory:":
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StoreUnavailable(
                f"cannot open the SQLite store {path!r}: directory {parent!r} does not exist "
                "(create it first)"
            )
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: Db) -> int:
    """Apply the migrations this database lacks, each in its own transaction; the version.

    The last transaction always writes (the version, even if unchanged), so a read-only file
    fails here, when the store opens, rather than at its first write.
    """
    for number, statements in enumerate(MIGRATIONS, start=1):
        db.execute("BEGIN IMMEDIATE")  # the write lock: concurrent openers take turns
        try:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"the database schema is at version {current}, newer than this version "
                    f"of aiki knows ({len(MIGRATIONS)})"
                )
            if current < number:
                for statement in statements:
                    db.execute(statement)
            if current < number or number == len(MIGRATIONS):
                db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
    return len(MIGRATIONS)


def _rollback(db: Db) -> None:
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite may already have rolled back (disk full, I/O error)


# -- rows ---------------------------------------------------------------------------------
def _get_run(db: Db, run_id: str) -> RunRecord | None:
    row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return None if row is None else RunRecord(*row)


def _runs_where(
    db: Db, where: str, params: Sequence[Any] | dict[str, Any], tail: str = ""
) -> list[RunRecord]:
    sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE {where} {tail}"
    return [RunRecord(*row) for row in db.execute(sql, params)]


def _get_steps(db: Db, run_id: str) -> tuple[StepRecord, ...]:
    sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq"
    return tuple(StepRecord(*row) for row in db.execute(sql, (run_id,)))


def _get_step(db: Db, run_id: str, position: str) -> StepRecord | None:
    sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND position = ?"
    row = db.execute(sql, (run_id, position)).fetchone()
    return None if row is None else StepRecord(*row)


def _update_run(db: Db, run: RunRecord, now: float, **changes: Any) -> RunRecord:
    """Write ``changes`` (column names chosen by this module, never by callers' data)."""
    changes["updated_at"] = now
    assignments = ", ".join(f"{column} = ?" for column in changes)
    db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*changes.values(), run.id))
    return attrs.evolve(run, **changes)


def _log(
    db: Db, run_id: str, now: float, event: str, attempt: int, worker_id: str | None, *,
    position: str | None = None, name: str | None = None, detail: str | None = None,
) -> None:
    db.execute(
        "INSERT INTO history (run_id, at, event, attempt, worker_id, position, name, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, now, event, attempt, worker_id, position, name, detail),
    )


def _fenced(db: Db, lease: Lease) -> RunRecord:
    run = _get_run(db, lease.run_id)
    if (run is None or run.state != "running" or run.lease_epoch != lease.epoch
            or run.lease_owner != lease.worker_id):
        raise stale_lease_error(lease, run)
    return run


# -- operations: each checks everything before its first write -----------------------------
def _enqueue(db: Db, op: o.Enqueue) -> o.EnqueueOutcome:
    inserted = db.execute(
        "INSERT INTO runs (id, workflow, version, payload, state, idempotency_key, attempts,"
        " lease_epoch, created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, 0, 0, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (op.run_id, op.workflow, op.version, op.payload, op.idempotency_key, op.now, op.now),
    ).rowcount
    if inserted:
        _log(db, op.run_id, op.now, "run.queued", 0, None, detail=f"version {op.version}")
        return o.EnqueueOutcome(op.run_id, created=True)
    if op.idempotency_key is not None:
        row = db.execute(
            "SELECT id FROM runs WHERE workflow = ? AND idempotency_key = ?",
            (op.workflow, op.idempotency_key),
        ).fetchone()
        if row is not None:
            return o.EnqueueOutcome(row[0], created=False)
    return o.EnqueueOutcome(op.run_id, created=False)  # this run id exists: a retried enqueue


def _claim(db: Db, op: o.Claim) -> tuple[ClaimedRun, ...]:
    if not op.workflows or op.limit <= 0:
        return ()
    pairs = " OR ".join("(workflow = ? AND version = ?)" for _ in op.workflows)
    params = [value for pair in op.workflows for value in pair]
    queued = _runs_where(db, f"state = 'queued' AND ({pairs})", [*params, op.limit],
                         "ORDER BY seq LIMIT ?")
    claimed = []
    for run in queued:
        run = _update_run(
            db, run, op.now, state="running", attempts=run.attempts + 1,
            lease_epoch=run.lease_epoch + 1, lease_owner=op.worker_id,
            lease_expires_at=op.now + op.lease_ttl,
        )
        _log(db, run.id, op.now, "run.running", run.attempts, op.worker_id,
             detail=f"lease epoch {run.lease_epoch}")
        claimed.append(ClaimedRun(run, _get_steps(db, run.id)))
    return tuple(claimed)


def _renew(db: Db, op: o.Renew) -> tuple[str, ...]:
    lost = []
    for lease in op.leases:
        try:
            run = _fenced(db, lease)
        except StaleLease:
            lost.append(lease.run_id)
            continue
        _update_run(db, run, op.now, lease_expires_at=op.now + op.lease_ttl)
    return tuple(lost)


def _expire(db: Db, op: o.ExpireLeases) -> tuple[str, ...]:
    expired = _runs_where(
        db, "state = 'running' AND lease_expires_at IS NOT NULL AND lease_expires_at <= ?",
        (op.now,), "ORDER BY seq",
    )
    for run in expired:
        owner = run.lease_owner
        _update_run(db, run, op.now, state="queued", **NO_LEASE)
        _log(db, run.id, op.now, "run.queued", run.attempts, owner,
             detail=f"lease epoch {run.lease_epoch} of worker {owner!r} expired")
    return tuple(run.id for run in expired)


def _save_step(db: Db, op: o.StartStep | o.SaveStep) -> None:
    run = _fenced(db, op.lease)
    new = op.step
    old = _get_step(db, run.id, new.position)
    if not step_write_changes(run.id, old, new, save=isinstance(op, o.SaveStep)):
        return None
    if new.idempotency_key is not None:
        other = db.execute(
            "SELECT position FROM steps WHERE run_id = ? AND name = ? AND idempotency_key = ?"
            " AND position != ? ORDER BY seq LIMIT 1",
            (run.id, new.name, new.idempotency_key, new.position),
        ).fetchone()
        if other is not None:
            raise key_conflict_error(run.id, new, other[0])
    if isinstance(op, o.StartStep):
        new = attrs.evolve(new, state="running")
        event, detail = "task.running", None
    else:
        event, detail = history_event_for_step(new)
    values = attrs.astuple(new)
    db.execute(
        f"INSERT INTO steps (run_id, seq, {STEP_COLUMNS}) VALUES (?,"
        " (SELECT coalesce(max(seq), 0) + 1 FROM steps WHERE run_id = ?),"
        f" {', '.join('?' for _ in values)})"
        " ON CONFLICT (run_id, position) DO UPDATE SET "
        + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(StepRecord)),
        (run.id, run.id, *values),
    )
    _update_run(db, run, op.now)
    _log(db, run.id, op.now, event, new.attempts, op.lease.worker_id,
         position=new.position, name=new.name, detail=detail)
    return None


def _finish(db: Db, lease: Lease, now: float, state: str, result: str | None = None,
            error: tuple[str, str] | None = None) -> RunRecord:
    run = _fenced(db, lease)
    error_type, error_message = error if error else (None, None)
    run = _update_run(db, run, now, state=state, result=result, error_type=error_type,
                      error_message=error_message, finished_at=now, **NO_LEASE)
    _log(db, run.id, now, f"run.{state}", run.attempts, lease.worker_id,
         detail=None if error is None else f"{error_type}: {error_message}")
    return run


def _suspend(db: Db, op: o.SuspendRun) -> None:
    run = _fenced(db, op.lease)
    _update_run(db, run, op.now, state="sleeping", wake_at=op.wake_at, **NO_LEASE)
    _log(db, run.id, op.now, "run.sleeping", run.attempts, op.lease.worker_id,
         detail=f"{op.reason}; wakes at {op.wake_at}")


def _release(db: Db, op: o.ReleaseRun) -> None:
    run = _fenced(db, op.lease)
    _update_run(db, run, op.now, state="queued", **NO_LEASE)
    _log(db, run.id, op.now, "run.queued", run.attempts, op.lease.worker_id,
         detail=op.reason)


def _wake_due(db: Db, op: o.WakeDue) -> tuple[str, ...]:
    due = _runs_where(db, "state = 'sleeping' AND wake_at IS NOT NULL AND wake_at <= ?",
                      (op.now,), "ORDER BY seq")
    for run in due:
        _update_run(db, run, op.now, state="queued", wake_at=None)
        _log(db, run.id, op.now, "run.queued", run.attempts, None, detail="woke up")
    return tuple(run.id for run in due)


def _apply_one(db: Db, op: o.Op[Any]) -> Any:
    if isinstance(op, o.Enqueue):
        return _enqueue(db, op)
    if isinstance(op, o.Claim):
        return _claim(db, op)
    if isinstance(op, o.Renew):
        return _renew(db, op)
    if isinstance(op, o.ExpireLeases):
        return _expire(db, op)
    if isinstance(op, (o.StartStep, o.SaveStep)):
        return _save_step(db, op)
    if isinstance(op, o.CompleteRun):
        return _finish(db, op.lease, op.now, "completed", result=op.result)
    if isinstance(op, o.FailRun):
        return _finish(db, op.lease, op.now, "failed", error=(op.error_type, op.error_message))
    if isinstance(op, o.SuspendRun):
        return _suspend(db, op)
    if isinstance(op, o.ReleaseRun):
        return _release(db, op)
    if isinstance(op, o.WakeDue):
        return _wake_due(db, op)
    raise TypeError(f"unknown store operation {type(op).__name__}")


def _apply_batch(db: Db, ops: Sequence[o.Op[Any]]) -> list[Any]:
    db.execute("BEGIN IMMEDIATE")
    try:
        outcomes: list[Any] = []
        for op in ops:
            try:
                outcomes.append(_apply_one(db, op))
            except AikiError as exc:  # refused on purpose; it wrote nothing
                outcomes.append(exc)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return outcomes


# -- the store ----------------------------------------------------------------------------
class SqliteStore:
    """A store in one SQLite file (or ``":memory:"``). Open it with :meth:`open`."""

    def __init__(self, path: str, db: Db, *, offload: bool) -> None:
        self.path = path
        self._db: Db | None = db
        self._offload = offload
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(
        cls, path: str, *, offload: bool = True,
        synchronous: Literal["NORMAL", "FULL"] = "FULL", busy_timeout: float = 5.0,
    ) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        The directory must exist. Raises :class:`StoreUnavailable` if the file cannot be
        opened or written, is not a database, or has a schema newer than this code.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        db = await _call(offload, trio.CapacityLimiter(1), path,
                         lambda: _connect(path, synchronous, busy_timeout))
        return cls(path, db, offload=offload)

    async def _run(self, fn: Callable[[Db], T]) -> T:
        def with_db() -> T:
            if self._db is None:
                raise StoreUnavailable(f"the SQLite store {self.path!r} is closed")
            return fn(self._db)

        return await _call(self._offload, self._limiter, self.path, with_db)

    # -- reads --------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._run(lambda db: _get_run(db, run_id))

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self._run(lambda db: _get_steps(db, run_id))

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        sql = f"SELECT {HISTORY_COLUMNS} FROM history WHERE run_id = ? ORDER BY seq"
        return await self._run(
            lambda db: tuple(HistoryEvent(*row) for row in db.execute(sql, (run_id,)))
        )

    async def list_runs(
        self, *, workflow: str | None = None, state: str | None = None, limit: int = 100
    ) -> tuple[RunRecord, ...]:
        where = "(:workflow IS NULL OR workflow = :workflow) AND (:state IS NULL OR state = :state)"
        params = {"workflow": workflow, "state": state, "limit": max(limit, 0)}
        return await self._run(
            lambda db: tuple(_runs_where(db, where, params, "ORDER BY seq DESC LIMIT :limit"))
        )

    async def next_wake_at(self) -> float | None:
        sql = "SELECT min(wake_at) FROM runs WHERE state = 'sleeping' AND wake_at IS NOT NULL"
        wake_at: float | None = await self._run(lambda db: db.execute(sql).fetchone()[0])
        return wake_at

    # -- writes -------------------------------------------------------------------------
    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        ops = list(ops)
        return await self._run(lambda db: _apply_batch(db, ops))

    async def aclose(self) -> None:
        def close() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        await _call(self._offload, self._limiter, self.path, close)


async def _call(offload: bool, limiter: trio.CapacityLimiter, path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread (or inline), turning sqlite3 errors into StoreUnavailable."""

    def guarded() -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorname", None)
            cause = f"{type(exc).__name__}{f' ({code})' if code else ''}: {exc}"
            raise StoreUnavailable(f"the SQLite store {path!r} failed: {cause}") from exc

    if offload:
        return await trio.to_thread.run_sync(guarded, limiter=limiter)
    await trio.lowlevel.checkpoint()
    return guarded()
