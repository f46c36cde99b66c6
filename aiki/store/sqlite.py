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
- A batch's task starts and outcomes, and the completions of runs whose end writes no other
  run (the bulk of a busy batch), are decided one by one on the rows as the batch left them
  and written together, a statement per table for them all (``_Pending``), before any other
  op reads the store.
- Idempotent enqueue relies on the unique index on ``runs(workflow, idempotency_key)``:
  ``INSERT ... ON CONFLICT DO NOTHING``, then a select; never a read-then-insert.
- Blocking calls stay off the Trio thread: by default each call runs in a worker thread via
  ``trio.to_thread.run_sync``, one at a time (a ``CapacityLimiter(1)`` guards the one
  connection). ``offload=False`` runs them inline, for tests under ``MockClock`` and the
  simulation, where real threads are not welcome.
- Except a write batch when no other task is runnable (one run at a time, a quiet server):
  it runs inline, where the hop would cost more than the batch; never waiting for a lock
  held elsewhere, and not after an inline batch that took long (``SqliteStore._inline_batch``).
- Except point reads (a run, its steps, its waits, a schedule by id): in a file, with the
  writer in a thread, they run inline on a second, query-only connection. WAL readers never
  wait for the writer, and a lookup by key takes a few microseconds, where the hop to a
  thread and back costs the Trio thread tens and queued them behind a whole write batch
  (its fsync included). That connection never waits (``busy_timeout`` 0): in the rare case
  it is refused (the WAL being recovered), the read takes the thread like any other.

``synchronous``: ``FULL`` (the default) syncs the WAL at every commit, so an acknowledged
enqueue or checkpoint survives an OS crash or power loss too (durability rule 1), for one
fsync per transaction, which ``StoreWriter``'s group commit amortizes over many writes.
``NORMAL`` syncs only at WAL checkpoints: still safe against a crash of the process and never
corrupt, but power loss may roll back the last commits. Choose it knowingly.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import attrs
import trio

from aiki.errors import AikiError, StoreUnavailable
from aiki.records import (
    TERMINAL_RUN_STATES,
    ClaimedRun,
    EventRecord,
    HistoryEvent,
    RunCount,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitRecord,
    row_of,
)
from aiki.store import machine as m
from aiki.store import ops as o

T = TypeVar("T")

# Each migration is a list of statements, applied in one transaction; never edit one that has
# shipped, append a new one. ``runs.seq`` is the enqueue order (FIFO claims, newest-first
# listing); ``steps.seq`` keeps a run's steps in the order they were first recorded.
# The terminal run states, as an SQL list (``aiki_runs`` counts every other state).
_TERMINAL = ", ".join(f"'{state}'" for state in sorted(TERMINAL_RUN_STATES))

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
    # Waiting is one state with its conditions in one table (``waits``), and events sent to
    # runs are kept in ``events``. A run that was ``sleeping`` (a long retry delay, the only
    # kind of sleep before) waits for its wake-up time instead.
    (
        """CREATE TABLE waits (
            run_id TEXT NOT NULL REFERENCES runs (id), position TEXT NOT NULL,
            kind TEXT NOT NULL, name TEXT, due_at REAL, since REAL NOT NULL,
            PRIMARY KEY (run_id, position))""",
        "CREATE INDEX waits_due ON waits (due_at) WHERE due_at IS NOT NULL",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs (id),
            name TEXT NOT NULL, payload TEXT NOT NULL, idempotency_key TEXT,
            sent_at REAL NOT NULL, position TEXT)""",
        """CREATE UNIQUE INDEX events_idempotency ON events (run_id, name, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX events_of_run ON events (run_id, name, seq)",
        """INSERT INTO waits (run_id, position, kind, name, due_at, since)
            SELECT id, '', 'retry', NULL, coalesce(wake_at, updated_at), updated_at
            FROM runs WHERE state = 'sleeping'""",
        "UPDATE runs SET state = 'waiting' WHERE state = 'sleeping'",
        "DROP INDEX runs_wake",
        "ALTER TABLE runs DROP COLUMN wake_at",
    ),
    # Failures carry the worker's Python traceback (at most 16 KiB, cut by the server).
    (
        "ALTER TABLE runs ADD COLUMN error_traceback TEXT",
        "ALTER TABLE steps ADD COLUMN error_traceback TEXT",
        # Retention deletes finished runs oldest first.
        "CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL",
    ),
    # Schedules (cron or interval) and what became of each occurrence. A firing's key is
    # unique per schedule: an occurrence is decided once.
    (
        """CREATE TABLE schedules (
            id TEXT PRIMARY KEY, workflow TEXT NOT NULL, version TEXT NOT NULL,
            payload TEXT NOT NULL, cron TEXT, timezone TEXT NOT NULL, every REAL,
            overlap TEXT NOT NULL, catchup_window REAL NOT NULL, paused INTEGER NOT NULL,
            next_fire_at REAL NOT NULL, last_run_id TEXT, buffered_at REAL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, buffered_key TEXT)""",
        "CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0",
        "CREATE INDEX schedules_last_run ON schedules (last_run_id)",
        """CREATE TABLE schedule_firings (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, schedule_id TEXT NOT NULL,
            key TEXT NOT NULL, occurrence REAL NOT NULL, outcome TEXT NOT NULL,
            reason TEXT NOT NULL, run_id TEXT, at REAL NOT NULL, detail TEXT, last REAL,
            count INTEGER NOT NULL, UNIQUE (schedule_id, key))""",
        "CREATE INDEX schedule_firings_at ON schedule_firings (schedule_id, at, seq)",
    ),
    # Run controls: a fork records the run it was copied from and how many steps it got; a
    # run, the last control applied to it (a repeated request is answered as done).
    # (A ``paused`` run needs no column: the state is text, its waits stay in ``waits``.)
    (
        "ALTER TABLE runs ADD COLUMN forked_from TEXT",
        "ALTER TABLE runs ADD COLUMN forked_steps INTEGER",
        "ALTER TABLE runs ADD COLUMN control_id TEXT",
    ),
    # OpenTelemetry: the trace context of the span that enqueued the run (issue 17).
    (
        "ALTER TABLE runs ADD COLUMN trace_context TEXT",
    ),
    # Cancellation: a cancel asked for (when, why) and the end of its grace period, which
    # the timer enforces.
    (
        "ALTER TABLE runs ADD COLUMN cancel_requested_at REAL",
        "ALTER TABLE runs ADD COLUMN cancel_reason TEXT",
        "ALTER TABLE runs ADD COLUMN cancel_deadline REAL",
        "CREATE INDEX runs_cancel_deadline ON runs (cancel_deadline)"
        " WHERE cancel_deadline IS NOT NULL",
    ),
    # Child runs: each knows its parent (a run's children are found by it), and whether it
    # was detached.
    (
        "ALTER TABLE runs ADD COLUMN parent_id TEXT",
        "ALTER TABLE runs ADD COLUMN detached INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX runs_parent ON runs (parent_id, seq) WHERE parent_id IS NOT NULL",
    ),
)

RUN_COLUMNS = ", ".join(f.name for f in attrs.fields(RunRecord))
STEP_COLUMNS = ", ".join(f.name for f in attrs.fields(StepRecord))
HISTORY_COLUMNS = ", ".join(f.name for f in attrs.fields(HistoryEvent))
WAIT_COLUMNS = ", ".join(f.name for f in attrs.fields(WaitRecord))
EVENT_COLUMNS = ", ".join(f.name for f in attrs.fields(EventRecord))
SCHEDULE_COLUMNS = ", ".join(f.name for f in attrs.fields(ScheduleRecord))
FIRING_COLUMNS = ", ".join(f.name for f in attrs.fields(ScheduleFiring))
SCHEDULE_UPSERT = (
    f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES"
    f" ({', '.join('?' for _ in attrs.fields(ScheduleRecord))}) ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(ScheduleRecord)
                if f.name != "id"))
FIRING_UPSERT = (
    f"INSERT INTO schedule_firings ({FIRING_COLUMNS}) VALUES"
    f" ({', '.join('?' for _ in attrs.fields(ScheduleFiring))})"
    " ON CONFLICT (schedule_id, key) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(ScheduleFiring)
                if f.name not in ("schedule_id", "key")))
HISTORY_INSERT = ("INSERT INTO history (run_id, at, event, attempt, worker_id, position, name,"
                  " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
RUN_UPDATE = ", ".join(f"{f.name} = ?" for f in attrs.fields(RunRecord) if f.name != "id")
RUN_INSERT = (f"INSERT INTO runs ({RUN_COLUMNS}) VALUES"
              f" ({', '.join('?' for _ in attrs.fields(RunRecord))}) ON CONFLICT DO NOTHING")
STEP_UPSERT = (
    f"INSERT INTO steps (run_id, seq, {STEP_COLUMNS}) VALUES (?,"
    " (SELECT coalesce(max(seq), 0) + 1 FROM steps WHERE run_id = ?),"
    f" {', '.join('?' for _ in attrs.fields(StepRecord))})"
    " ON CONFLICT (run_id, position) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(StepRecord))
)

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


def _connect_reader(path: str) -> Db:
    """The query-only connection of inline point reads: it never waits for a lock."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA query_only = ON")
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
_DETACHED = [f.name for f in attrs.fields(RunRecord)].index("detached")


def _record(row: Sequence[Any]) -> RunRecord:
    values = list(row)
    values[_DETACHED] = bool(values[_DETACHED])  # (stored as 0 or 1)
    return RunRecord(*values)


def _get_run(db: Db, run_id: str) -> RunRecord | None:
    row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return None if row is None else _record(row)


def _runs_where(
    db: Db, where: str, params: Sequence[Any] | dict[str, Any], tail: str = ""
) -> list[RunRecord]:
    sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE {where} {tail}"
    return [_record(row) for row in db.execute(sql, params)]


def _get_steps(db: Db, run_id: str) -> tuple[StepRecord, ...]:
    sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq"
    return tuple(StepRecord(*row) for row in db.execute(sql, (run_id,)))


def _get_step(db: Db, run_id: str, position: str) -> StepRecord | None:
    sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND position = ?"
    row = db.execute(sql, (run_id, position)).fetchone()
    return None if row is None else StepRecord(*row)


def _write(db: Db, run_id: str, change: m.Change) -> None:
    """Write what the state machine decided (see :class:`aiki.store.machine.Change`)."""
    run = change.run
    if run is not None:
        row = row_of(run)
        db.execute(f"UPDATE runs SET {RUN_UPDATE} WHERE id = ?", (*row[1:], run.id))
    if change.dropped:
        db.executemany("DELETE FROM steps WHERE run_id = ? AND position = ?",
                       [(run_id, position) for position in change.dropped])
    for step in change.steps:
        db.execute(STEP_UPSERT, (run_id, run_id, *row_of(step)))
    if change.waits is not None:
        db.execute("DELETE FROM waits WHERE run_id = ?", (run_id,))
        db.executemany(f"INSERT INTO waits ({WAIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       [row_of(w) for w in change.waits])
    for seq, position in change.consumed:
        db.execute("UPDATE events SET position = ? WHERE seq = ?", (position, seq))
    sent = change.sent
    if sent is not None:
        db.execute("INSERT INTO events (run_id, name, payload, idempotency_key, sent_at,"
                   " position) VALUES (?, ?, ?, ?, ?, ?)",
                   (run_id, sent.name, sent.payload, sent.idempotency_key, sent.sent_at,
                    sent.position))
    if change.history:
        db.executemany(HISTORY_INSERT, [(run_id, *row_of(e)) for e in change.history])


def _get_waits(db: Db, run_id: str) -> tuple[WaitRecord, ...]:
    sql = f"SELECT {WAIT_COLUMNS} FROM waits WHERE run_id = ? ORDER BY position"
    return tuple(WaitRecord(*row) for row in db.execute(sql, (run_id,)))


def _buffered(db: Db, run_id: str, name: str) -> EventRecord | None:
    row = db.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND name = ?"
                     " AND position IS NULL ORDER BY seq LIMIT 1", (run_id, name)).fetchone()
    return None if row is None else EventRecord(*row)


# -- operations: the state machine decides, this writes ------------------------------------
def _enqueue(db: Db, op: o.Enqueue) -> o.EnqueueOutcome:
    run, entry = m.enqueue(op)
    if db.execute(RUN_INSERT, row_of(run)).rowcount:
        _write(db, run.id, m.Change(history=(entry,)))
        return o.EnqueueOutcome(op.run_id, created=True)
    if op.idempotency_key is not None:
        row = db.execute(
            "SELECT id, payload FROM runs WHERE workflow = ? AND idempotency_key = ?",
            (op.workflow, op.idempotency_key),
        ).fetchone()
        if row is not None:
            return m.existing_for_key(op, row[0], row[1])
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
        change = m.claim(run, op.worker_id, op.now, op.lease_ttl)
        _write(db, run.id, change)
        assert change.run is not None
        claimed.append(ClaimedRun(change.run, _get_steps(db, run.id)))
    return tuple(claimed)


def _renew(db: Db, op: o.Renew) -> tuple[str, ...]:
    lost = []
    for lease in op.leases:
        run = m.renew(_get_run(db, lease.run_id), lease, op.now, op.lease_ttl)
        if run is None:
            lost.append(lease.run_id)
        else:
            db.execute("UPDATE runs SET lease_expires_at = ?, updated_at = ? WHERE id = ?",
                       (run.lease_expires_at, run.updated_at, run.id))
    return tuple(lost)


def _expire(db: Db, op: o.ExpireLeases) -> tuple[str, ...]:
    expired = _runs_where(
        db, "state IN ('running', 'paused') AND lease_owner IS NOT NULL"
        " AND lease_expires_at IS NOT NULL AND lease_expires_at <= ?",
        (op.now,), "ORDER BY seq",
    )
    for run in expired:
        _write(db, run.id, m.expire(run, op.now))
    return tuple(run.id for run in expired)


def _save_step(db: Db, op: o.StartStep | o.SaveStep) -> bool:
    run_id, new = op.lease.run_id, op.step
    keyed = None
    if new.idempotency_key is not None:
        row = db.execute(
            "SELECT position FROM steps WHERE run_id = ? AND name = ? AND idempotency_key = ?"
            " AND position != ? ORDER BY seq LIMIT 1",
            (run_id, new.name, new.idempotency_key, new.position),
        ).fetchone()
        keyed = None if row is None else row[0]
    change = m.decide_step(op, _get_run(db, run_id), _get_step(db, run_id, new.position),
                           keyed)
    _write(db, run_id, change)
    return bool(change.history)


# -- children and cancels: the machine decides each run's change; these walk the tree -------
_UNFINISHED = "state NOT IN ('completed', 'failed', 'cancelled')"


def _descendants(db: Db, run_id: str) -> list[RunRecord]:
    """The unfinished children it did not detach, theirs, and so on, in enqueue order."""
    rows = db.execute(
        f"WITH RECURSIVE tree (id) AS (SELECT id FROM runs WHERE parent_id = ? AND NOT detached"
        f" AND {_UNFINISHED} UNION ALL SELECT r.id FROM runs r JOIN tree ON r.parent_id ="
        f" tree.id WHERE NOT r.detached AND r.{_UNFINISHED})"
        f" SELECT {RUN_COLUMNS} FROM runs WHERE id IN (SELECT id FROM tree) ORDER BY seq",
        (run_id,))
    return [_record(row) for row in rows]


def _unfinished(db: Db, run_id: str) -> int:
    count: int = db.execute(f"SELECT count(*) FROM runs WHERE parent_id = ? AND NOT detached"
                            f" AND {_UNFINISHED}", (run_id,)).fetchone()[0]
    return count


def _awaits_children(db: Db, run: RunRecord) -> bool:
    return m.awaits_children(run, _get_waits(db, run.id))


def _ended(db: Db, run: RunRecord, now: float, ended: list[RunRecord]) -> None:
    """``run`` has ended: note it, start an occurrence buffered behind it, and tell its
    parent (recursively up the tree)."""
    ended.append(run)
    o.note_ended(run)
    _release_buffered(db, run, now)
    parent = _get_run(db, run.parent_id) if run.parent_id is not None else None
    if parent is None or parent.state in TERMINAL_RUN_STATES:
        return
    joins = [StepRecord(*row) for row in db.execute(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND kind = 'join' AND name = ?"
        " AND state = 'running' ORDER BY seq", (parent.id, run.id))]
    change = m.child_ended(parent, joins, _get_waits(db, parent.id), run,
                           _unfinished(db, parent.id), now)
    _write(db, parent.id, change)
    if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
        _ended(db, change.run, now, ended)


def _cascade(db: Db, run_id: str, reason: str | None, grace: float, who: str, now: float,
             revoked: list[tuple[str, int]], ended: list[RunRecord]) -> int:
    """Cancel ``run_id``'s unfinished, not detached descendants, the deepest first; how
    many."""
    descendants = _descendants(db, run_id)
    for d in reversed(descendants):
        run = _get_run(db, d.id)
        assert run is not None
        change, out = m.cancel(run, run.id, reason, grace, who, now,
                               awaiting_children=_awaits_children(db, run), cascade=run_id,
                               children=_unfinished(db, run.id))
        _write(db, run.id, change)
        if out.holder is not None:
            revoked.append((run.id, run.lease_epoch))
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            _ended(db, change.run, now, ended)
    return len(descendants)


def _finish(db: Db, op: o.CompleteRun | o.FailRun) -> RunRecord | None:
    run_id = op.lease.run_id
    run = m.fenced(op.lease, m.unpaused(op.lease, _get_run(db, run_id)))
    ended: list[RunRecord] = []
    now_run: RunRecord | None = run
    if isinstance(op, o.FailRun) and run.cancel_requested_at is None:
        why = f"its parent run {run_id} failed"
        revoked: list[tuple[str, int]] = []
        if _cascade(db, run_id, why, m.CASCADE_GRACE, "the engine", op.now, revoked, ended):
            o.note_cancel(o.CancelOutcome(True, None, None, tuple(revoked)), why,
                          op.now + m.CASCADE_GRACE)
        now_run = _get_run(db, run_id)  # (the cascade may have written it)
    children = _unfinished(db, run_id)
    if isinstance(op, o.CompleteRun):
        change = m.finish(now_run, op.lease, op.now, result=op.result, children=children)
    else:
        change = m.finish(now_run, op.lease, op.now, error=(op.error_type, op.error_message),
                          traceback=op.traceback, children=children)
    _write(db, run_id, change)
    if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
        _ended(db, change.run, op.now, ended)  # (writes other runs, never this one)
    return change.run if change.run is not None else _get_run(db, run_id)


def _abandon(db: Db, op: o.AbandonSteps) -> None:
    run_id = op.lease.run_id
    steps = [s for q in op.positions if (s := _get_step(db, run_id, q)) is not None]
    _write(db, run_id, m.abandon(_get_run(db, run_id), op.lease, steps, op.scope, op.now,
                                 _get_step(db, run_id, op.scope), op.positions, op.starts,
                                 op.after))


def _start_child(db: Db, op: o.StartChild) -> StepRecord:
    run_id = op.lease.run_id
    change, child, first = m.start_child(_get_run(db, run_id), op.lease,
                                         _get_step(db, run_id, op.step.position), op.step, op)
    _write(db, run_id, change)
    if child is not None:
        db.execute(RUN_INSERT, row_of(child))
        _write(db, child.id, m.Change(history=(first,)))
    step = _get_step(db, run_id, op.step.position)
    assert step is not None
    return step


def _await_step(db: Db, op: o.AwaitStep) -> StepRecord:
    run_id = op.lease.run_id
    change, step = m.await_step(_get_run(db, run_id), op.lease,
                                _get_step(db, run_id, op.step.position),
                                _buffered(db, run_id, op.step.name), op.step, op.now,
                                _get_run(db, op.step.name) if op.step.kind == "join" else None)
    _write(db, run_id, change)
    return step


def _wait(db: Db, op: o.WaitRun) -> None:
    run_id = op.lease.run_id
    steps = {c.position: step for c in op.conditions
             if (step := _get_step(db, run_id, c.position)) is not None}
    buffered = {row[0] for row in db.execute(
        "SELECT DISTINCT name FROM events WHERE run_id = ? AND position IS NULL", (run_id,))}
    _write(db, run_id, m.wait(_get_run(db, run_id), op.lease, op.conditions, steps, buffered,
                              op.now, op.reason))


def _wake_due(db: Db, op: o.WakeDue) -> tuple[str, ...]:
    due = _runs_where(db, "state = 'waiting' AND id IN (SELECT run_id FROM waits"
                      " WHERE due_at IS NOT NULL AND due_at <= ?)", (op.now,), "ORDER BY seq")
    for run in due:
        steps = {s.position: s for s in _get_steps(db, run.id)}
        _write(db, run.id, m.wake_due(run, _get_waits(db, run.id), steps, op.now))
    woke = tuple(run.id for run in due)
    # Cancels whose grace period is over end too (their ids follow).
    return o.WakeOutcome(woke, _end_cancels(db, o.EndCancels(op.now)))


def _end_cancels(db: Db, op: o.EndCancels) -> tuple[RunRecord, ...]:
    """Overdue cancels end, and with each the descendants its end waits for."""
    overdue = _runs_where(db, "cancel_deadline IS NOT NULL AND cancel_deadline <= ?"
                          " AND state NOT IN ('completed', 'failed', 'cancelled')", (op.now,),
                          "ORDER BY seq")
    ancestor: dict[str, str | None] = {r.id: None for r in overdue}
    for r in overdue:
        for d in _descendants(db, r.id):
            ancestor.setdefault(d.id, r.id)
    seqs = dict(db.execute(f"SELECT id, seq FROM runs WHERE id IN"
                           f" ({', '.join('?' for _ in ancestor)})", list(ancestor))
                ) if ancestor else {}
    ended: list[RunRecord] = []
    for run_id in sorted(ancestor, key=lambda r: seqs[r], reverse=True):
        run = _get_run(db, run_id)
        if run is None or run.state in TERMINAL_RUN_STATES:
            continue
        change = m.end_cancel(run, op.now, ancestor[run_id])
        _write(db, run_id, change)
        assert change.run is not None
        _ended(db, change.run, op.now, ended)
    return tuple(ended)


def _cancel(db: Db, op: o.CancelRun) -> o.CancelOutcome:
    run = _get_run(db, op.run_id)
    if run is None or run.state in TERMINAL_RUN_STATES or run.cancel_requested_at:
        return m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now)[1]
    revoked: list[tuple[str, int]] = []
    ended: list[RunRecord] = []
    first = _awaits_children(db, run)  # marked first, so its children's ends wait on it
    out = o.CancelOutcome(True, None, None)
    if first:
        change, out = m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now,
                               awaiting_children=True, children=_unfinished(db, op.run_id))
        _write(db, op.run_id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            _ended(db, change.run, op.now, ended)
    _cascade(db, op.run_id, op.reason, op.grace, op.who, op.now, revoked, ended)
    if not first:
        change, out = m.cancel(_get_run(db, op.run_id), op.run_id, op.reason, op.grace,
                               op.who, op.now, children=_unfinished(db, op.run_id))
        _write(db, op.run_id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            _ended(db, change.run, op.now, ended)
    cancelled = o.CancelOutcome(True, _get_run(db, op.run_id), out.holder, tuple(revoked))
    o.note_cancel(cancelled, op.reason, op.now + op.grace)
    return cancelled


def _purge(db: Db, op: o.PurgeRuns) -> tuple[str, ...]:
    ids = [row[0] for row in db.execute(
        "SELECT id FROM runs WHERE state IN ('completed', 'failed', 'cancelled')"
        " AND finished_at < ? ORDER BY finished_at, seq LIMIT ?",
        (op.before, max(op.limit, 0)))]
    for table in ("events", "waits", "history", "steps"):
        db.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in ids])
    db.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in ids])
    return tuple(ids)


def _wakeup(db: Db, op: o.Wakeup) -> bool:
    sleeping = [s for s in _get_steps(db, op.run_id)
                if s.kind == "sleep" and s.state == "running"]
    change, woken = m.wakeup(_get_run(db, op.run_id), op.run_id, sleeping, op.now)
    _write(db, op.run_id, change)
    return woken


def _send(db: Db, op: o.SendEvent) -> o.SendOutcome:
    duplicate = op.idempotency_key is not None and db.execute(
        "SELECT 1 FROM events WHERE run_id = ? AND name = ? AND idempotency_key = ?",
        (op.run_id, op.name, op.idempotency_key)).fetchone() is not None
    row = db.execute(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND kind = 'event' AND name = ?"
        " AND state = 'running' ORDER BY seq LIMIT 1", (op.run_id, op.name)).fetchone()
    change, outcome = m.send(_get_run(db, op.run_id), op, duplicate,
                             None if row is None else StepRecord(*row),
                             None if row is None else _buffered(db, op.run_id, op.name))
    _write(db, op.run_id, change)
    return outcome


def _retry(db: Db, op: o.RetryRun) -> o.ControlOutcome:
    change = m.retry(_get_run(db, op.run_id), op.run_id, _get_steps(db, op.run_id),
                     op.version, op.who, op.now, op.control_id)
    _write(db, op.run_id, change)
    return m.controlled(change)


# -- schedules ----------------------------------------------------------------------------
def _schedule(row: Sequence[Any]) -> ScheduleRecord:
    values = list(row)
    values[9] = bool(values[9])  # paused
    return ScheduleRecord(*values)


def _get_schedule(db: Db, schedule_id: str) -> ScheduleRecord | None:
    row = db.execute(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?",
                     (schedule_id,)).fetchone()
    return None if row is None else _schedule(row)


def _get_firings(db: Db, schedule_id: str, limit: int) -> tuple[ScheduleFiring, ...]:
    sql = (f"SELECT {FIRING_COLUMNS} FROM schedule_firings WHERE schedule_id = ?"
           " ORDER BY at DESC, seq DESC LIMIT ?")
    return tuple(ScheduleFiring(*row) for row in db.execute(sql, (schedule_id, max(limit, 0))))


def _write_schedule(db: Db, change: m.ScheduleChange) -> list[str]:
    if change.cancel is not None:  # (cancel_previous: the previous run first)
        _cancel(db, change.cancel)
    started = []
    for enqueue in change.enqueues:
        outcome = _enqueue(db, enqueue)
        if outcome.created:
            started.append(outcome.run_id)
    if change.schedule is not None:
        values = list(attrs.astuple(change.schedule))
        values[9] = int(values[9])
        db.execute(SCHEDULE_UPSERT, values)
    for firing in change.firings:
        db.execute(FIRING_UPSERT, attrs.astuple(firing))
    return started


def _last_run(db: Db, s: ScheduleRecord | None) -> RunRecord | None:
    return None if s is None or s.last_run_id is None else _get_run(db, s.last_run_id)


def _define_schedule(db: Db, op: o.DefineSchedule) -> o.DefineOutcome:
    change, outcome = m.define_schedule(_get_schedule(db, op.schedule.id), op)
    _write_schedule(db, change)
    return outcome


def _pause_schedule(db: Db, op: o.PauseSchedule) -> ScheduleRecord:
    change, record = m.pause_schedule(_get_schedule(db, op.schedule_id), op)
    _write_schedule(db, change)
    return record


def _trigger_schedule(db: Db, op: o.TriggerSchedule) -> ScheduleFiring:
    s = _get_schedule(db, op.schedule_id)
    row = db.execute(f"SELECT {FIRING_COLUMNS} FROM schedule_firings WHERE schedule_id = ?"
                     " AND key = ?", (op.schedule_id, f"trigger:{op.trigger_id}")).fetchone()
    change, firing = m.trigger(s, op, _last_run(db, s),
                               None if row is None else ScheduleFiring(*row))
    _write_schedule(db, change)
    return firing


def _backfill_schedule(db: Db, op: o.BackfillSchedule) -> tuple[ScheduleFiring, ...]:
    s = _get_schedule(db, op.schedule_id)
    handled = {row[0] for row in db.execute(
        "SELECT key FROM schedule_firings WHERE schedule_id = ?", (op.schedule_id,))}
    change, firings = m.backfill(s, op, _last_run(db, s), handled)
    _write_schedule(db, change)
    return firings


def _delete_schedule(db: Db, op: o.DeleteSchedule) -> bool:
    db.execute("DELETE FROM schedule_firings WHERE schedule_id = ?", (op.schedule_id,))
    return bool(db.execute("DELETE FROM schedules WHERE id = ?", (op.schedule_id,)).rowcount)


def _fire_schedules(db: Db, op: o.FireSchedules) -> tuple[str, ...]:
    rows = db.execute(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE paused = 0"
                      " AND next_fire_at <= ? ORDER BY next_fire_at, id LIMIT ?",
                      (op.now, max(op.limit, 0))).fetchall()
    started: list[str] = []
    for row in rows:
        s = _schedule(row)
        started += _write_schedule(db, m.fire(s, _last_run(db, s), op.now))
    return tuple(started)


def _release_buffered(db: Db, run: RunRecord | None, now: float) -> None:
    """A run ended: an occurrence buffered behind it starts (``buffer_one``)."""
    if run is None or not m.started_by_a_schedule(run):
        return
    rows = db.execute(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE last_run_id = ?"
                      " AND buffered_at IS NOT NULL ORDER BY id", (run.id,)).fetchall()
    for row in rows:
        _write_schedule(db, m.release_buffered(_schedule(row), run, now))


def _pause(db: Db, op: o.PauseRun) -> o.ControlOutcome:
    change = m.pause(_get_run(db, op.run_id), op.run_id, op.who, op.now, op.control_id)
    _write(db, op.run_id, change)
    return m.controlled(change)


def _resume(db: Db, op: o.ResumeRun) -> o.ControlOutcome:
    steps = {s.position: s for s in _get_steps(db, op.run_id)}
    buffered = dict(db.execute(
        "SELECT name, min(sent_at) FROM events WHERE run_id = ? AND position IS NULL"
        " GROUP BY name", (op.run_id,)).fetchall())
    change = m.resume(_get_run(db, op.run_id), op.run_id, _get_waits(db, op.run_id), steps,
                      buffered, op.who, op.now, op.control_id,
                      children=_unfinished(db, op.run_id))
    _write(db, op.run_id, change)
    if change.history and change.run is not None and (  # (not a repeat)
            change.run.state in TERMINAL_RUN_STATES):
        _ended(db, change.run, op.now, [])
    return m.controlled(change)


def _fork(db: Db, op: o.ForkRun) -> o.ControlOutcome:
    existing = _get_run(db, op.new_run_id)
    if existing is not None:
        return m.fork_again(existing, op)
    new, made, noted = m.fork(_get_run(db, op.run_id), op, _get_steps(db, op.run_id))
    db.execute(RUN_INSERT, row_of(new))
    _write(db, new.id, attrs.evolve(made, run=None))
    _write(db, op.run_id, noted)
    return o.ControlOutcome(new, applied=True)


def _release(db: Db, op: o.ReleaseRun) -> None:
    run = _get_run(db, op.lease.run_id)
    _write(db, op.lease.run_id, m.release(run, op.lease, op.now, op.reason))


_OPS: dict[type[Any], Callable[[Db, Any], Any]] = {
    o.Enqueue: _enqueue, o.Claim: _claim, o.Renew: _renew, o.ExpireLeases: _expire,
    o.StartStep: _save_step, o.SaveStep: _save_step, o.CompleteRun: _finish,
    o.FailRun: _finish, o.ReleaseRun: _release, o.AwaitStep: _await_step, o.WaitRun: _wait,
    o.WakeDue: _wake_due, o.PurgeRuns: _purge, o.Wakeup: _wakeup, o.SendEvent: _send,
    o.RetryRun: _retry, o.CancelRun: _cancel, o.EndCancels: _end_cancels,
    o.StartChild: _start_child, o.AbandonSteps: _abandon, o.DefineSchedule: _define_schedule,
    o.PauseSchedule: _pause_schedule, o.TriggerSchedule: _trigger_schedule,
    o.BackfillSchedule: _backfill_schedule, o.DeleteSchedule: _delete_schedule,
    o.FireSchedules: _fire_schedules, o.PauseRun: _pause, o.ResumeRun: _resume, o.ForkRun: _fork,
}


def _apply_one(db: Db, op: o.Op[Any]) -> Any:
    apply = _OPS.get(type(op))
    if apply is None:
        raise TypeError(f"unknown store operation {type(op).__name__}")
    return apply(db, op)


# -- task starts and outcomes: decided one by one, written together -------------------------
class _Pending:
    """The writes that a batch's task starts and outcomes, and the ends of runs that write
    no other run, decided and did not write yet: the next such ops of the batch read them
    back (the run and the step they touch), and they are written together, a statement
    per table for them all, before any other op reads the store, and before COMMIT.

    Per op, a start or an outcome read its run and its step and wrote three rows (the run,
    the step, a history event): five statements, each paying the sqlite3 module's own cost
    in Python on top of SQLite's. The decisions are the state machine's, in the batch's
    order, on exactly the rows the store would hold: nothing else reads or writes between
    them (any other op first writes what is pending).

    Measured and left out (embedded, 100 concurrent, 10 interleaved pairs each): reading
    ahead the runs and steps of all the batch's next such ops, one statement each (0.96x
    against this), and enqueues and claims kept pending too (a batch of 75 ops then
    written in one go instead of four: 0.99x)."""

    def __init__(self) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.steps: dict[tuple[str, str], StepRecord] = {}  # in the order first written
        self.history: list[tuple[Any, ...]] = []
        self.cleared: list[str] = []  # runs whose waits end (none are written here)

    def run(self, db: Db, run_id: str) -> RunRecord | None:
        run = self.runs.get(run_id)
        return run if run is not None else _get_run(db, run_id)

    def step(self, db: Db, run_id: str, position: str) -> StepRecord | None:
        step = self.steps.get((run_id, position))
        return step if step is not None else _get_step(db, run_id, position)

    def write(self, db: Db, run_id: str, change: m.Change) -> None:
        """Keep ``change`` to write with the others; one they cannot hold (steps dropped,
        events, waits begun) is written now, after them."""
        if not m.rows_only(change):
            self.flush(db)
            _write(db, run_id, change)
            return
        if change.run is not None:
            self.runs[run_id] = change.run
        for step in change.steps:
            self.steps[run_id, step.position] = step
        if change.waits is not None:
            self.cleared.append(run_id)
        self.history += [(run_id, *row_of(e)) for e in change.history]

    def flush(self, db: Db) -> None:
        if self.runs:
            db.executemany(f"UPDATE runs SET {RUN_UPDATE} WHERE id = ?",
                           [(*row_of(run)[1:], run.id) for run in self.runs.values()])
            self.runs = {}
        if self.cleared:
            db.executemany("DELETE FROM waits WHERE run_id = ?", [(i,) for i in self.cleared])
            self.cleared = []
        if self.steps:
            db.executemany(STEP_UPSERT, [(run_id, run_id, *row_of(step))
                                         for (run_id, _), step in self.steps.items()])
            self.steps = {}
        if self.history:
            db.executemany(HISTORY_INSERT, self.history)
            self.history = []


def _pending_op(db: Db, op: o.Op[Any], pending: _Pending) -> tuple[bool, Any]:
    """``op`` decided with ``pending`` if it is a task start or outcome (with no idempotency
    key: a key looks at the run's other steps) or the completion of a run whose end writes
    no other run: (True, its outcome). Else (False, None): nothing read or written."""
    if isinstance(op, (o.StartStep, o.SaveStep)):
        if op.step.idempotency_key is not None:
            return False, None
        run_id = op.lease.run_id
        change = m.decide_step(op, pending.run(db, run_id),
                               pending.step(db, run_id, op.step.position), None)
        pending.write(db, run_id, change)
        return True, bool(change.history)
    if isinstance(op, o.CompleteRun):
        run_id = op.lease.run_id
        run = pending.run(db, run_id)
        if run is None or not m.ends_alone(run):
            return False, None
        run = m.fenced(op.lease, m.unpaused(op.lease, run))
        change = m.finish(run, op.lease, op.now, result=op.result,
                          children=_unfinished(db, run_id))
        pending.write(db, run_id, change)
        if change.run is None:
            return True, run
        if change.run.state in TERMINAL_RUN_STATES:
            o.note_ended(change.run)  # (as _ended would: it has no parent, no schedule)
        return True, change.run
    return False, None


def _apply_batch(db: Db, ops: Sequence[o.Op[Any]]) -> list[Any]:
    db.execute("BEGIN IMMEDIATE")
    try:
        outcomes: list[Any] = []
        pending = _Pending()
        with o.noting_ends() as ended:
            for op in ops:
                try:
                    done, outcome = _pending_op(db, op, pending)
                    if not done:
                        pending.flush(db)
                        outcome = _apply_one(db, op)
                    outcomes.append(outcome)
                except AikiError as exc:  # refused on purpose; it wrote nothing
                    outcomes.append(exc)
            pending.flush(db)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return o.outcomes_of(outcomes, ended)


# -- the store ----------------------------------------------------------------------------
# An inline batch that takes longer than this sends the next 64 to the thread.
INLINE_BUDGET = 0.005
_BUSY = (sqlite3.SQLITE_BUSY, getattr(sqlite3, "SQLITE_BUSY_RECOVERY", 261),
         getattr(sqlite3, "SQLITE_BUSY_SNAPSHOT", 517), sqlite3.SQLITE_LOCKED)


class SqliteStore:
    """A store in one SQLite file (or ``":memory:"``). Open it with :meth:`open`."""

    def __init__(self, path: str, db: Db, *, offload: bool, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._db: Db | None = db
        self._offload = offload
        self._limiter = trio.CapacityLimiter(1)
        # Point reads and idle batches inline (see the module's docstring): only for a
        # file, and only when the writer is in a thread (else everything runs inline).
        self._inline = offload and path != ":memory:" and not path.startswith("file:")
        self._reader: Db | None = None
        self._busy_timeout = busy_timeout
        self._waits = True  # the writer's connection waits busy_timeout for a lock
        self._threaded = 0  # batches still to send to the thread after a slow inline one

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
        return cls(path, db, offload=offload, busy_timeout=busy_timeout)

    async def _run(self, fn: Callable[[Db], T]) -> T:
        def with_db() -> T:
            if self._db is None:
                raise StoreUnavailable(f"the SQLite store {self.path!r} is closed")
            if not self._waits:
                self._db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                self._waits = True
            return fn(self._db)

        return await _call(self._offload, self._limiter, self.path, with_db)

    def _inline_batch(self, ops: list[o.Op[Any]]) -> list[Any] | None:
        """The batch applied on the Trio thread, if that is cheaper and safe now; else None.

        The hop to the writer's thread and back costs the Trio thread more than a small
        batch does, and a wake-up of each thread on the critical path: when no other task
        is runnable (one run at a time, a quiet server), the batch runs inline. ("Runnable"
        as Trio counts it: the tasks queued for its next round; one later in the current
        round waits for the batch, as long as a hop would have taken.) Never if the
        connection is busy in the thread, never waiting for a lock (another process holds
        it: the thread waits instead), and not for the next batches after an inline one
        took long (a slow disk's fsync must not stall the event loop)."""
        db = self._db
        if (db is None or not self._inline or self._threaded
                or self._limiter.borrowed_tokens
                or trio.lowlevel.current_statistics().tasks_runnable):
            self._threaded = max(self._threaded - 1, 0)
            return None
        started = time.perf_counter()
        try:
            if self._waits:
                db.execute("PRAGMA busy_timeout = 0")
                self._waits = False
            return _apply_batch(db, ops)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) in _BUSY:
                return None  # (rolled back, or never begun): the thread's turn
            raise _unavailable(self.path, exc) from exc
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from exc
        finally:
            if time.perf_counter() - started > INLINE_BUDGET:
                self._threaded = 64

    async def _lookup(self, fn: Callable[[Db], T]) -> T:
        """A point read: inline on the query-only connection if there is one, and it is not
        refused; in the writer's thread otherwise."""
        if self._inline and self._db is not None:
            await trio.lowlevel.checkpoint()
            try:
                if self._reader is None:
                    self._reader = _connect_reader(self.path)
                return fn(self._reader)
            except sqlite3.Error:
                pass  # busy, or worse: the writer's connection answers, or names the fault
        return await self._run(fn)

    # -- reads --------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._lookup(lambda db: _get_run(db, run_id))

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self._lookup(lambda db: _get_steps(db, run_id))

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

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        return await self._run(lambda db: tuple(_runs_where(
            db, "parent_id = ?", (run_id,), "ORDER BY seq")))

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        return await self._lookup(lambda db: _get_waits(db, run_id))

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY seq"
        return await self._run(
            lambda db: tuple(EventRecord(*row) for row in db.execute(sql, (run_id,))))

    async def run_counts(self) -> tuple[RunCount, ...]:
        sql = ("SELECT workflow, version, state, count(*), min(updated_at) FROM runs"
               f" WHERE state NOT IN ({_TERMINAL}) GROUP BY workflow, version, state"
               " ORDER BY workflow, version, state")
        return await self._run(lambda db: tuple(RunCount(*row) for row in db.execute(sql)))
    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        return await self._lookup(lambda db: _get_schedule(db, schedule_id))

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        sql = f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY id"
        return await self._run(lambda db: tuple(_schedule(row) for row in db.execute(sql)))

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        return await self._run(lambda db: _get_firings(db, schedule_id, limit))

    async def next_due(self) -> float | None:
        sql = ("SELECT min(t) FROM (SELECT min(due_at) AS t FROM waits WHERE run_id IN"
               " (SELECT id FROM runs WHERE state = 'waiting') UNION ALL"
               " SELECT min(lease_expires_at) FROM runs WHERE state IN ('running', 'paused')"
               " AND lease_owner IS NOT NULL UNION ALL"
               " SELECT min(next_fire_at) FROM schedules WHERE paused = 0 UNION ALL"
               " SELECT min(cancel_deadline) FROM runs WHERE cancel_deadline IS NOT NULL"
               " AND state NOT IN ('completed', 'failed', 'cancelled'))")
        due: float | None = await self._run(lambda db: db.execute(sql).fetchone()[0])
        return due

    # -- writes -------------------------------------------------------------------------
    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        ops = list(ops)
        await trio.lowlevel.checkpoint()
        done = self._inline_batch(ops)
        if done is not None:
            return done
        return await self._run(lambda db: _apply_batch(db, ops))

    async def aclose(self) -> None:
        def close() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

        await _call(self._offload, self._limiter, self.path, close)


def _unavailable(path: str, exc: sqlite3.Error) -> StoreUnavailable:
    code = getattr(exc, "sqlite_errorname", None)
    cause = f"{type(exc).__name__}{f' ({code})' if code else ''}: {exc}"
    return StoreUnavailable(f"the SQLite store {path!r} failed: {cause}")


async def _call(offload: bool, limiter: trio.CapacityLimiter, path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread (or inline), turning sqlite3 errors into StoreUnavailable."""

    def guarded() -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise _unavailable(path, exc) from exc

    if offload:
        return await trio.to_thread.run_sync(guarded, limiter=limiter)
    await trio.lowlevel.checkpoint()
    return guarded()
