"""What runs on the asyncio loop: one coroutine per store operation, the whole transaction in it.

Plain asyncio and asyncpg code, no Trio: ``_store.PostgresStore`` crosses the bridge once per
call with one of the ``run_*`` coroutines below. They mirror ``aiki/store/sqlite.py`` op for
op, with PostgreSQL's concurrency control on top, because several servers may share the
database:

- every write to a run first locks its row (``SELECT ... FOR UPDATE``), so the fencing check
  and the write are one atomic step whoever else is writing;
- claims, lease expiry and wake-ups pick their rows with ``FOR UPDATE SKIP LOCKED``: a row
  another transaction holds is left for it (or for the next round), never waited on, and a
  run is never claimed by two transactions at once;
- idempotent enqueue is ``INSERT ... ON CONFLICT DO NOTHING`` against the unique index, then a
  select: never a read-then-insert.

Failures are sorted here, where the connection's state is known, into :class:`NotCommitted`
(nothing of the batch was kept: safe to run it again), :class:`CommitUnknown` (the connection
died after COMMIT was sent) and everything else (a bug or a refused statement), which the
caller reports as it is.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg
import attrs

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
from aiki.store.postgres._pool import Connection, ConnectionPool, PoolClosed, connector
from aiki.store.postgres._schema import migrate

T = TypeVar("T")
Conn: TypeAlias = Connection
Pool: TypeAlias = ConnectionPool

RUN_COLUMNS = ", ".join(f.name for f in attrs.fields(RunRecord))
STEP_COLUMNS = ", ".join(f.name for f in attrs.fields(StepRecord))
HISTORY_COLUMNS = ", ".join(f.name for f in attrs.fields(HistoryEvent))
WAIT_COLUMNS = ", ".join(f.name for f in attrs.fields(WaitRecord))
EVENT_COLUMNS = ", ".join(f.name for f in attrs.fields(EventRecord))
SCHEDULE_COLUMNS = ", ".join(f.name for f in attrs.fields(ScheduleRecord))
FIRING_COLUMNS = ", ".join(f.name for f in attrs.fields(ScheduleFiring))
SCHEDULE_UPSERT = (
    f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES"
    f" ({', '.join(f'${i}' for i in range(1, len(attrs.fields(ScheduleRecord)) + 1))})"
    " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(ScheduleRecord)
                if f.name != "id"))
FIRING_UPSERT = (
    f"INSERT INTO schedule_firings ({FIRING_COLUMNS}) VALUES"
    f" ({', '.join(f'${i}' for i in range(1, len(attrs.fields(ScheduleFiring)) + 1))})"
    " ON CONFLICT (schedule_id, key) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(ScheduleFiring)
                if f.name not in ("schedule_id", "key")))
_RUN_FIELDS = [f.name for f in attrs.fields(RunRecord) if f.name != "id"]


def _step_upsert(first: int) -> str:
    """Insert or replace a step: its run id and its fields, numbered from ``$first``."""
    places = range(first, first + len(attrs.fields(StepRecord)) + 1)
    return (f"INSERT INTO steps (run_id, {STEP_COLUMNS}) VALUES"
            f" ({', '.join(f'${i}' for i in places)})"
            " ON CONFLICT (run_id, position) DO UPDATE SET "
            + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(StepRecord)))


STEP_UPSERT = _step_upsert(1)


@functools.cache
def _run_and_history(step: bool, clear_waits: bool) -> str:
    """The usual change in one statement (one round trip): the run row and its first history
    event (the insert's $1-$8, the run's id $9 and fields from $10), with its step (after
    them) and its waits cleared, if it has them."""
    sql = ("WITH changed AS (UPDATE runs SET "
           + ", ".join(f"{c} = ${i}" for i, c in enumerate(_RUN_FIELDS, start=10))
           + " WHERE id = $9)")
    if step:
        sql += f", upserted AS ({_step_upsert(10 + len(_RUN_FIELDS))})"
    if clear_waits:
        sql += ", cleared AS (DELETE FROM waits WHERE run_id = $9)"
    return sql + " " + HISTORY_INSERT


# A run's row changes in every transaction that writes its steps, even when nothing of the
# row itself does: its version (``xmin``) then tells whether the run or any of its steps
# changed since it was read, as ``_fast`` relies on.
TOUCH = "UPDATE runs SET lease_epoch = lease_epoch WHERE id = ANY($1::text[])"

HISTORY_INSERT = (
    "INSERT INTO history (run_id, at, event, attempt, worker_id, position, name, detail)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
History = tuple[str, float, str, int, str | None, str | None, str | None, str | None]


# -- failures -------------------------------------------------------------------------------
class NotCommitted(Exception):
    """Nothing of the call was kept (the database is unreachable, the connection died before
    COMMIT was sent, or PostgreSQL rolled back a deadlock); running it again is safe."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe(cause))
        self.cause = cause


class CommitUnknown(Exception):
    """The connection failed after COMMIT was sent: the batch may or may not be kept.

    ``outcomes`` are what the batch produced if it was committed; ``xid`` is its transaction
    id (``pg_xact_status`` tells its fate), ``pid`` the server process that ran it. A batch
    written by one autocommitted statement (``_fast``) has no id it could learn in time:
    ``receipt`` is the history events it writes, which tell its fate instead.
    """

    def __init__(self, cause: BaseException, outcomes: list[Any], xid: str | None, pid: int,
                 receipt: Sequence[History] = ()) -> None:
        super().__init__(describe(cause))
        self.cause, self.outcomes, self.xid, self.pid = cause, outcomes, xid, pid
        self.receipt = receipt


CONNECT_FAILURES = (
    OSError,  # refused, reset, no such socket, unreachable
    asyncio.TimeoutError,  # connect or command timeout
    asyncpg.PostgresConnectionError,  # class 08: the connection does not exist / failed
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.AdminShutdownError,  # 57P01: terminated by an administrator or a fast shutdown
    asyncpg.CrashShutdownError,  # 57P02: another server process crashed
    asyncpg.TooManyConnectionsError,  # 53300
)
ROLLED_BACK = (
    asyncpg.TransactionRollbackError,  # class 40: deadlock, serialization failure
    asyncpg.QueryCanceledError,  # 57014: cancelled by a timeout or pg_cancel_backend
)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _lost(exc: BaseException, conn: Conn | None) -> bool:
    """Whether ``exc`` means the connection is gone or unusable (not a statement refused).

    ``InternalClientError`` is asyncpg's protocol state machine confused, seen when the
    server's shutdown notice reaches an idle pooled connection just as it is reused: the
    connection is useless, and (COMMIT not yet sent on it) nothing of its transaction is kept.
    """
    return isinstance(exc, (*CONNECT_FAILURES, asyncpg.InternalClientError)) or (
        isinstance(exc, asyncpg.InterfaceError) and conn is not None and conn.is_closed()
    )


async def with_connection(pool: Pool, body: Callable[[Conn], Awaitable[T]]) -> T:
    """``await body(conn)`` on a pooled connection, sorting its failures.

    A connection whose work was interrupted (cancelled, timed out, or lost in the middle) is
    terminated rather than given back: its state on the server is unknown, and terminating
    is instant where a polite cleanup would wait on the network. The pool opens a new one.
    """
    try:
        conn = await pool.acquire()
    except PoolClosed as exc:
        raise StoreUnavailable("the PostgreSQL store is closed") from exc
    except CONNECT_FAILURES as exc:
        raise NotCommitted(exc) from exc
    try:
        result = await body(conn)
    except BaseException as exc:
        lost = isinstance(exc, Exception) and _lost(exc, conn)
        if lost or not isinstance(exc, Exception) or isinstance(exc, CommitUnknown):
            pool.discard(conn)
        else:
            pool.release(conn)  # a refused statement, rolled back: the connection is clean
        if lost or isinstance(exc, ROLLED_BACK):
            raise NotCommitted(exc) from exc
        raise
    pool.release(conn)
    return result


# -- rows -------------------------------------------------------------------------------------
def _run(row: asyncpg.Record) -> RunRecord:
    return RunRecord(*row)


def _step(row: asyncpg.Record) -> StepRecord:
    return StepRecord(*row)


async def get_run(conn: Conn, run_id: str, *, lock: bool = False) -> RunRecord | None:
    sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
    row = await conn.fetchrow(sql + " FOR UPDATE" if lock else sql, run_id)
    return None if row is None else _run(row)


async def get_steps(conn: Conn, run_id: str) -> tuple[StepRecord, ...]:
    rows = await conn.fetch(f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 ORDER BY seq",
                            run_id)
    return tuple(_step(row) for row in rows)


async def get_history(conn: Conn, run_id: str) -> tuple[HistoryEvent, ...]:
    rows = await conn.fetch(
        f"SELECT {HISTORY_COLUMNS} FROM history WHERE run_id = $1 ORDER BY seq", run_id
    )
    return tuple(HistoryEvent(*row) for row in rows)


async def list_runs(
    conn: Conn, workflow: str | None, state: str | None, limit: int
) -> tuple[RunRecord, ...]:
    rows = await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE ($1::text IS NULL OR workflow = $1)"
        " AND ($2::text IS NULL OR state = $2) ORDER BY seq DESC LIMIT $3",
        workflow, state, max(limit, 0),
    )
    return tuple(_run(row) for row in rows)


async def run_counts(conn: Conn) -> tuple[RunCount, ...]:
    rows = await conn.fetch(
        "SELECT workflow, version, state, count(*), min(updated_at) FROM runs"
        " WHERE state <> ALL($1::text[]) GROUP BY workflow, version, state"
        " ORDER BY workflow, version, state", sorted(TERMINAL_RUN_STATES))
    return tuple(RunCount(*row) for row in rows)


async def next_due(conn: Conn) -> float | None:
    due: float | None = await conn.fetchval(
        "SELECT least((SELECT min(due_at) FROM waits JOIN runs ON runs.id = waits.run_id"
        " WHERE runs.state = 'waiting'),"
        " (SELECT min(lease_expires_at) FROM runs WHERE state = 'running'),"
        " (SELECT min(lease_expires_at) FROM runs WHERE state = 'paused'"
        " AND lease_owner IS NOT NULL),"
        " (SELECT min(next_fire_at) FROM schedules WHERE NOT paused),"
        " (SELECT min(cancel_deadline) FROM runs WHERE cancel_deadline IS NOT NULL"
        " AND state NOT IN ('completed', 'failed', 'cancelled')))"
    )
    return due


async def get_children(conn: Conn, run_id: str) -> tuple[RunRecord, ...]:
    rows = await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE parent_id = $1 ORDER BY seq", run_id)
    return tuple(_run(row) for row in rows)


async def get_schedule(conn: Conn, schedule_id: str, *,
                       lock: bool = False) -> ScheduleRecord | None:
    sql = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1"
    row = await conn.fetchrow(sql + " FOR UPDATE" if lock else sql, schedule_id)
    return None if row is None else ScheduleRecord(*row)


async def list_schedules(conn: Conn) -> tuple[ScheduleRecord, ...]:
    rows = await conn.fetch(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY id")
    return tuple(ScheduleRecord(*row) for row in rows)


async def get_firings(conn: Conn, schedule_id: str, limit: int) -> tuple[ScheduleFiring, ...]:
    rows = await conn.fetch(
        f"SELECT {FIRING_COLUMNS} FROM schedule_firings WHERE schedule_id = $1"
        " ORDER BY at DESC, seq DESC LIMIT $2", schedule_id, max(limit, 0))
    return tuple(ScheduleFiring(*row) for row in rows)


async def get_waits(conn: Conn, run_id: str) -> tuple[WaitRecord, ...]:
    rows = await conn.fetch(
        f"SELECT {WAIT_COLUMNS} FROM waits WHERE run_id = $1 ORDER BY position", run_id)
    return tuple(WaitRecord(*row) for row in rows)


async def get_events(conn: Conn, run_id: str) -> tuple[EventRecord, ...]:
    rows = await conn.fetch(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = $1 ORDER BY seq", run_id)
    return tuple(EventRecord(*row) for row in rows)


def _event(
    run_id: str, now: float, event: str, attempt: int, worker_id: str | None, *,
    position: str | None = None, name: str | None = None, detail: str | None = None,
) -> History:
    return (run_id, now, event, attempt, worker_id, position, name, detail)


async def _log(conn: Conn, *events: History) -> None:
    if len(events) == 1:
        await conn.execute(HISTORY_INSERT, *events[0])
    elif events:
        await conn.executemany(HISTORY_INSERT, events)  # in order: seq follows it


async def _write(conn: Conn, run_id: str, change: m.Change) -> None:
    """Write what the state machine decided; the run row and its first history event in one
    statement (one round trip), the rest after it."""
    history = [(run_id, e.at, e.event, e.attempt, e.worker_id, e.position, e.name, e.detail)
               for e in change.history]
    if change.dropped:
        await conn.execute("DELETE FROM steps WHERE run_id = $1 AND position = ANY($2::text[])",
                           run_id, list(change.dropped))
    run = change.run
    steps = change.steps
    if run is None and (steps or change.dropped):
        await conn.execute(TOUCH, [run_id])
    # The usual change (a step, the run, its events, its waits ended) goes in one round
    # trip, below.
    single = run is not None and bool(history)
    last = steps[-1] if steps and single else None
    clear_waits = single and change.waits == ()
    for step in steps[:-1] if last is not None else steps:
        await conn.execute(STEP_UPSERT, run_id, *row_of(step))
    if change.waits is not None and not clear_waits:
        await conn.execute("DELETE FROM waits WHERE run_id = $1", run_id)
        if change.waits:
            await conn.executemany(
                f"INSERT INTO waits ({WAIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
                [row_of(w) for w in change.waits])
    for seq, position in change.consumed:
        await conn.execute("UPDATE events SET position = $1 WHERE seq = $2", position, seq)
    sent = change.sent
    if sent is not None:
        await conn.execute(
            "INSERT INTO events (run_id, name, payload, idempotency_key, sent_at, position)"
            " VALUES ($1, $2, $3, $4, $5, $6)", run_id, sent.name, sent.payload,
            sent.idempotency_key, sent.sent_at, sent.position)
    if run is not None and history:
        values = row_of(run)[1:]
        upserted = () if last is None else (run_id, *row_of(last))
        await conn.execute(_run_and_history(last is not None, clear_waits), *history[0],
                           run.id, *values, *upserted)
        history = history[1:]
    elif run is not None:
        assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(_RUN_FIELDS, start=2))
        await conn.execute(f"UPDATE runs SET {assignments} WHERE id = $1", run.id,
                           *row_of(run)[1:])
    await _log(conn, *history)


async def _get_step(conn: Conn, run_id: str, position: str) -> StepRecord | None:
    row = await conn.fetchrow(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 AND position = $2",
        run_id, position)
    return None if row is None else _step(row)


# -- operations: each checks everything before its first write --------------------------------
async def _enqueue(conn: Conn, op: o.Enqueue) -> o.EnqueueOutcome:
    inserted = await conn.fetchval(  # the run and its first event in one round trip
        "WITH new AS (INSERT INTO runs (id, workflow, version, payload, state, idempotency_key,"
        " attempts, lease_epoch, created_at, updated_at, trace_context)"
        " VALUES ($1, $2, $3, $4, 'queued', $5, 0, 0, $6, $6, $8) ON CONFLICT DO NOTHING"
        " RETURNING id) INSERT INTO history (run_id, at, event, attempt, detail)"
        " SELECT id, $6, 'run.queued', 0, $7 FROM new RETURNING true",
        op.run_id, op.workflow, op.version, op.payload, op.idempotency_key, op.now,
        m.enqueue_detail(op), op.trace_context,
    )
    if inserted:
        return o.EnqueueOutcome(op.run_id, created=True)
    if op.idempotency_key is not None:
        existing = await conn.fetchrow(
            "SELECT id, payload FROM runs WHERE workflow = $1 AND idempotency_key = $2",
            op.workflow, op.idempotency_key,
        )
        if existing is not None:
            return m.existing_for_key(op, existing["id"], existing["payload"])
    return o.EnqueueOutcome(op.run_id, created=False)  # this run id exists: a retried enqueue


_ENQUEUE_ALL = (  # the runs and their first events in one statement; the ids created
    "WITH q AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
    " $5::text[], $6::float8[], $7::text[], $8::text[]) WITH ORDINALITY AS q(id, workflow,"
    " version, payload, idempotency_key, now, detail, trace_context, n)),"
    " new AS (INSERT INTO runs (id, workflow, version, payload, state, idempotency_key,"
    " attempts, lease_epoch, created_at, updated_at, trace_context) SELECT id, workflow,"
    " version, payload, 'queued', idempotency_key, 0, 0, now, now, trace_context FROM q"
    " ORDER BY n ON CONFLICT DO NOTHING RETURNING id),"
    " logged AS (INSERT INTO history (run_id, at, event, attempt, detail) SELECT q.id, q.now,"
    " 'run.queued', 0, q.detail FROM q JOIN new ON new.id = q.id ORDER BY q.n)"
    " SELECT id FROM new")


async def _enqueue_all(conn: Conn, ops: Sequence[o.Enqueue]) -> list[Any]:
    """Several enqueues in one round trip (two if some idempotency key names a run there
    already), in order: of two with one key, the first inserts and the second finds its run,
    as one at a time. A group with one run id twice goes one at a time (the statement's
    answer does not tell which of the two created the run)."""
    if len({op.run_id for op in ops}) < len(ops):
        return [await _one_of(conn, op) for op in ops]
    created = {row[0] for row in await conn.fetch(_ENQUEUE_ALL, *_columns(
        [(op.run_id, op.workflow, op.version, op.payload, op.idempotency_key, op.now,
          m.enqueue_detail(op), op.trace_context) for op in ops], 8))}
    named = [op for op in ops if op.run_id not in created and op.idempotency_key is not None]
    existing = {} if not named else {(r[0], r[1]): (r[2], r[3]) for r in await conn.fetch(
        "SELECT workflow, idempotency_key, id, payload FROM runs WHERE (workflow,"
        " idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [op.workflow for op in named], [op.idempotency_key for op in named])}
    outcomes: list[Any] = []
    for op in ops:
        found = existing.get((op.workflow, op.idempotency_key))
        try:
            outcomes.append(
                o.EnqueueOutcome(op.run_id, created=True) if op.run_id in created
                else m.existing_for_key(op, *found) if found is not None
                else o.EnqueueOutcome(op.run_id, created=False))
        except AikiError as exc:  # refused on purpose; it wrote nothing
            outcomes.append(exc)
    return outcomes


_CLAIM = (  # the runs leased, and their "run.running" events logged, in lease order; each
    # run's row version and place (see _fast), and the transaction's id last
    "WITH claimed AS (UPDATE runs SET state = 'running', attempts = attempts + 1,"
    " lease_epoch = lease_epoch + 1, lease_owner = $4, lease_expires_at = $5,"
    " updated_at = $6 WHERE id IN (SELECT id FROM runs WHERE state = 'queued'"
    " AND (workflow, version) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    f" ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING seq, xmin, ctid, {RUN_COLUMNS}),"
    " logged AS (INSERT INTO history (run_id, at, event, attempt, worker_id, detail)"
    " SELECT id, $6, 'run.running', attempts, $4, 'lease epoch ' || lease_epoch"
    " FROM claimed ORDER BY seq)"
    " SELECT " + ", ".join(f"c.{f.name}" for f in attrs.fields(RunRecord))
    + ", c.xmin::text, c.ctid::text, pg_current_xact_id_if_assigned()::text"
    " FROM claimed c ORDER BY c.seq")
# The claimed runs' steps, read by a statement of its own, after the claim locked the runs:
# the claim's own snapshot may predate changes committed before it took a row's lock (a
# run claimed, advanced and queued again by another server meanwhile; a queued run's sleep
# woken, an event delivered), and no step of a run can change while its row is locked
# (every write of steps writes the run's row: TOUCH).
_CLAIMED_STEPS = (f"SELECT run_id, {STEP_COLUMNS} FROM steps WHERE run_id = ANY($1::text[])"
                  " ORDER BY run_id, seq")


async def _claim(conn: Conn, op: o.Claim) -> tuple[ClaimedRun, ...]:
    """Lease the oldest queued runs of ``op``'s versions; their steps read after the lock."""
    if not op.workflows or op.limit <= 0:
        return ()
    rows = await conn.fetch(_CLAIM, [w for w, _ in op.workflows], [v for _, v in op.workflows],
                            op.limit, op.worker_id, op.now + op.lease_ttl, op.now)
    if not rows:
        return ()
    _note_xid(rows)
    runs = [RunRecord(*tuple(row)[:_N_RUN]) for row in rows]
    batch = _batch.get()
    if batch is not None:
        for run, row in zip(runs, rows, strict=True):
            batch.versions[run.id] = (row[-3], row[-2])
    steps: dict[str, list[StepRecord]] = {run.id: [] for run in runs}
    for row in await conn.fetch(_CLAIMED_STEPS, list(steps)):
        steps[row[0]].append(StepRecord(*tuple(row)[1:]))
    return tuple(ClaimedRun(run, tuple(steps[run.id])) for run in runs)


_RENEW = (  # $1-$3 the leases (run id, epoch, owner), $4 the new expiry, $5 now; $6 the
    # row version each must still have (NULL: any); the runs renewed, each row's new version
    # and place, and the transaction's id
    "UPDATE runs SET lease_expires_at = $4, updated_at = $5"
    " FROM unnest($1::text[], $2::bigint[], $3::text[], $6::text[])"
    " AS lease (id, epoch, owner, version)"
    " WHERE runs.id = lease.id AND runs.state IN ('running', 'paused')"
    " AND runs.lease_epoch = lease.epoch AND runs.lease_owner = lease.owner"
    " AND (lease.version IS NULL OR runs.xmin::text = lease.version)"
    " RETURNING runs.id, runs.lease_epoch, runs.lease_owner, runs.xmin::text, runs.ctid::text,"
    " pg_current_xact_id_if_assigned()::text")


async def _renew(conn: Conn, op: o.Renew) -> tuple[str, ...]:
    """Renew the leases of ``op``; the runs whose lease is not current (stale).

    A run whose row version the batch was given (``_Batch.kept``: this store keeps the run,
    see ``_fast.Fresh``) is renewed first only if its row is still that version, and its new
    version and place are noted (``_Batch.renewed``): the row is then what was kept, renewed,
    and the run stays on the one-statement path. The others (and a kept run changed since)
    are renewed whatever their version, in a second statement."""
    if not op.leases:
        return ()
    batch = _batch.get()
    kept = {} if batch is None else batch.kept
    renewed: set[tuple[str, int, str]] = set()
    for as_kept in (True, False):
        leases = [lease for lease in op.leases
                  if (lease.run_id, lease.epoch, lease.worker_id) not in renewed
                  and (lease.run_id in kept or not as_kept)]
        if not leases:
            continue
        rows = await conn.fetch(
            _RENEW, [lease.run_id for lease in leases], [lease.epoch for lease in leases],
            [lease.worker_id for lease in leases], op.now + op.lease_ttl, op.now,
            [kept[lease.run_id] if as_kept else None for lease in leases])
        _note_xid(rows)
        for row in rows:
            renewed.add((row[0], row[1], row[2]))
            if batch is not None and as_kept:
                batch.renewed[row[0]] = (row[3], row[4])
            elif batch is not None:  # (written again since: not as noted)
                batch.renewed.pop(row[0], None)
    return tuple(
        lease.run_id for lease in op.leases
        if (lease.run_id, lease.epoch, lease.worker_id) not in renewed
    )


async def _requeue_due(
    conn: Conn, due_where: str, now: float, changes: str, event: Callable[[Any], History]
) -> tuple[str, ...]:
    """Queue again the runs ``due_where`` picks (skipping rows others hold), in enqueue order."""
    due = sorted(await conn.fetch(
        f"UPDATE runs SET state = 'queued', {changes}, updated_at = $1 FROM (SELECT id,"
        f" lease_owner FROM runs WHERE {due_where} FOR UPDATE SKIP LOCKED) AS due"
        " WHERE runs.id = due.id RETURNING runs.seq, runs.id, runs.attempts,"
        " runs.lease_epoch, due.lease_owner",
        now,
    ), key=lambda row: row["seq"])
    await _log(conn, *(event(row) for row in due))
    return tuple(row["id"] for row in due)


async def _expire(conn: Conn, op: o.ExpireLeases) -> tuple[str, ...]:
    # A paused run whose worker vanished stays paused. Rare (a run paused while running
    # whose worker never gave it back): when there is one, every expired lease is decided
    # by the state machine row by row, in enqueue order, as the other stores do.
    if await conn.fetchval(
            "SELECT true FROM runs WHERE state = 'paused' AND lease_owner IS NOT NULL"
            " AND lease_expires_at <= $1 LIMIT 1", op.now):
        rows = await conn.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE lease_owner IS NOT NULL"
            " AND lease_expires_at <= $1 AND state IN ('running', 'paused')"
            " ORDER BY seq FOR UPDATE SKIP LOCKED", op.now)
        for row in rows:
            run = _run(row)
            await _write(conn, run.id, m.expire(run, op.now))
        return tuple(row["id"] for row in rows)
    return await _requeue_due(
        conn, "state = 'running' AND lease_expires_at <= $1", op.now,
        "lease_owner = NULL, lease_expires_at = NULL",
        lambda row: _event(
            row["id"], op.now, "run.queued", row["attempts"], row["lease_owner"],
            detail=f"lease epoch {row['lease_epoch']} of worker {row['lease_owner']!r} expired",
        ),
    )


async def _wake_due(conn: Conn, op: o.WakeDue) -> tuple[str, ...]:
    """The waiting runs with a condition due, locked (skipping rows others hold), each
    decided by the state machine."""
    rows = await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE state = 'waiting' AND id IN (SELECT run_id"
        " FROM waits WHERE due_at <= $1) ORDER BY seq FOR UPDATE SKIP LOCKED", op.now)
    for row in rows:
        run = _run(row)
        steps = {s.position: s for s in await get_steps(conn, run.id)}
        await _write(conn, run.id,
                     m.wake_due(run, await get_waits(conn, run.id), steps, op.now))
    woke = tuple(row["id"] for row in rows)
    # Cancels whose grace period is over end too (their ids follow).
    return o.WakeOutcome(woke, await _end_cancels(conn, o.EndCancels(op.now)))


async def _save_step(conn: Conn, op: o.StartStep | o.SaveStep) -> bool:
    new = op.step
    key = (op.lease.run_id, new.position)
    runs, steps, _ = await _locked_runs_and_steps(conn, [key])
    keyed = None
    if new.idempotency_key is not None:
        keyed = await conn.fetchval(
            "SELECT position FROM steps WHERE run_id = $1 AND name = $2"
            " AND idempotency_key = $3 AND position <> $4 ORDER BY seq LIMIT 1",
            op.lease.run_id, new.name, new.idempotency_key, new.position,
        )
    change = m.decide_step(op, runs.get(key[0]), steps[key], keyed)
    await _write(conn, op.lease.run_id, change)
    return bool(change.history)


# -- children and cancels: the machine decides each run's change; these walk the tree -------
# Rows are locked as they are read (FOR UPDATE): a parent, then its children, top down.
_UNFINISHED = "state NOT IN ('completed', 'failed', 'cancelled')"


async def _descendants(conn: Conn, run_id: str) -> list[RunRecord]:
    """The unfinished children it did not detach, theirs, and so on, in enqueue order."""
    rows = await conn.fetch(
        f"WITH RECURSIVE tree (id) AS (SELECT id FROM runs WHERE parent_id = $1 AND NOT detached"
        f" AND {_UNFINISHED} UNION ALL SELECT r.id FROM runs r JOIN tree ON r.parent_id ="
        f" tree.id WHERE NOT r.detached AND r.{_UNFINISHED})"
        f" SELECT {RUN_COLUMNS} FROM runs WHERE id IN (SELECT id FROM tree) ORDER BY seq"
        " FOR UPDATE", run_id)
    return [_run(row) for row in rows]


async def _unfinished(conn: Conn, run_id: str) -> int:
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM runs WHERE parent_id = $1 AND NOT detached AND {_UNFINISHED}",
        run_id)
    return count


async def _awaits_children(conn: Conn, run: RunRecord) -> bool:
    return m.awaits_children(run, await get_waits(conn, run.id))


async def _ended(conn: Conn, run: RunRecord, now: float, ended: list[RunRecord]) -> None:
    """``run`` has ended: note it, start an occurrence buffered behind it, and tell its
    parent (recursively up the tree)."""
    ended.append(run)
    o.note_ended(run)
    await _release_buffered(conn, run, now)
    parent = (await get_run(conn, run.parent_id, lock=True)
              if run.parent_id is not None else None)
    if parent is None or parent.state in TERMINAL_RUN_STATES:
        return
    joins = [_step(row) for row in await conn.fetch(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 AND kind = 'join' AND name = $2"
        " AND state = 'running' ORDER BY seq", parent.id, run.id)]
    change = m.child_ended(parent, joins, await get_waits(conn, parent.id), run,
                           await _unfinished(conn, parent.id), now)
    await _write(conn, parent.id, change)
    if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
        await _ended(conn, change.run, now, ended)


async def _cascade(conn: Conn, run_id: str, reason: str | None, grace: float, who: str,
                   now: float, revoked: list[tuple[str, int]],
                   ended: list[RunRecord]) -> int:
    """Cancel ``run_id``'s unfinished, not detached descendants, the deepest first; how
    many."""
    descendants = await _descendants(conn, run_id)
    for d in reversed(descendants):
        run = await get_run(conn, d.id, lock=True)
        assert run is not None
        change, out = m.cancel(run, run.id, reason, grace, who, now,
                               awaiting_children=await _awaits_children(conn, run),
                               cascade=run_id, children=await _unfinished(conn, run.id))
        await _write(conn, run.id, change)
        if out.holder is not None:
            revoked.append((run.id, run.lease_epoch))
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            await _ended(conn, change.run, now, ended)
    return len(descendants)


# (In READ COMMITTED, a statement that waits for a row lock sees that row as its holder
# left it, but every other row as of the statement's start: a child another server ended
# while holding its parent's lock still counts as unfinished. A count above zero is taken
# again once the lock is held: a parent would otherwise wait for a child that has ended.)
_RUN_AND_CHILDREN = (
    f"SELECT {', '.join(f'r.{f.name}' for f in attrs.fields(RunRecord))},"
    f" (SELECT count(*) FROM runs c WHERE c.parent_id = r.id AND NOT c.detached"
    f" AND c.{_UNFINISHED}) FROM runs r WHERE r.id = $1 FOR UPDATE OF r")


async def _finish(conn: Conn, op: o.CompleteRun | o.FailRun) -> RunRecord | None:
    run_id = op.lease.run_id
    # The run, locked, and how many of its children it did not detach are unfinished: one
    # round trip (the hot path: a run with no children ends in this read and one write).
    row = await conn.fetchrow(_RUN_AND_CHILDREN, run_id)
    run = m.fenced(op.lease, m.unpaused(op.lease, None if row is None else RunRecord(
        *tuple(row)[:_N_RUN])))
    children: int = 0 if row is None else row[_N_RUN]
    if children:  # counted as of before the lock: again, now that it is held
        children = await _unfinished(conn, run_id)
    ended: list[RunRecord] = []
    now_run: RunRecord | None = run
    if isinstance(op, o.FailRun) and run.cancel_requested_at is None and children:
        why = f"its parent run {run_id} failed"
        revoked: list[tuple[str, int]] = []
        if await _cascade(conn, run_id, why, m.CASCADE_GRACE, "the engine", op.now, revoked,
                          ended):
            o.note_cancel(o.CancelOutcome(True, None, None, tuple(revoked)), why,
                          op.now + m.CASCADE_GRACE)
        now_run = await get_run(conn, run_id)
        children = await _unfinished(conn, run_id)
    if isinstance(op, o.CompleteRun):
        change = m.finish(now_run, op.lease, op.now, result=op.result, children=children)
    else:
        change = m.finish(now_run, op.lease, op.now, error=(op.error_type, op.error_message),
                          traceback=op.traceback, children=children)
    await _write(conn, run_id, change)
    if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
        await _ended(conn, change.run, op.now, ended)
    return change.run


async def _abandon(conn: Conn, op: o.AbandonSteps) -> None:
    run_id = op.lease.run_id
    run = await get_run(conn, run_id, lock=True)
    steps = [s for q in op.positions if (s := await _get_step(conn, run_id, q)) is not None]
    await _write(conn, run_id, m.abandon(run, op.lease, steps, op.scope, op.now,
                                         await _get_step(conn, run_id, op.scope),
                                         op.positions, op.starts, op.after))


async def _start_child(conn: Conn, op: o.StartChild) -> StepRecord:
    run_id = op.lease.run_id
    run = await get_run(conn, run_id, lock=True)
    change, child, first = m.start_child(run, op.lease, await _get_step(conn, run_id,
                                                                        op.step.position),
                                         op.step, op)
    await _write(conn, run_id, change)
    if child is not None:
        await conn.execute(
            f"INSERT INTO runs ({RUN_COLUMNS}) VALUES"
            f" ({', '.join(f'${i}' for i in range(1, len(attrs.fields(RunRecord)) + 1))})",
            *row_of(child))
        await _log(conn, (child.id, first.at, first.event, first.attempt, first.worker_id,
                          first.position, first.name, first.detail))
    step = await _get_step(conn, run_id, op.step.position)
    assert step is not None
    return step


async def _buffered(conn: Conn, run_id: str, name: str) -> EventRecord | None:
    """The run's oldest undelivered event of that name."""
    row = await conn.fetchrow(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = $1 AND name = $2"
        " AND position IS NULL ORDER BY seq LIMIT 1", run_id, name)
    return None if row is None else EventRecord(*row)


async def _await_step(conn: Conn, op: o.AwaitStep) -> StepRecord:
    run_id = op.lease.run_id
    run = await get_run(conn, run_id, lock=True)
    buffered = await _buffered(conn, run_id, op.step.name)
    child = await get_run(conn, op.step.name) if op.step.kind == "join" else None
    change, step = m.await_step(run, op.lease, await _get_step(conn, run_id, op.step.position),
                                buffered, op.step, op.now, child)
    await _write(conn, run_id, change)
    return step


async def _wait(conn: Conn, op: o.WaitRun) -> None:
    run_id = op.lease.run_id
    run = await get_run(conn, run_id, lock=True)
    steps = {}
    for c in op.conditions:
        step = await _get_step(conn, run_id, c.position)
        if step is not None:
            steps[c.position] = step
    buffered = {r["name"] for r in await conn.fetch(
        "SELECT DISTINCT name FROM events WHERE run_id = $1 AND position IS NULL", run_id)}
    await _write(conn, run_id, m.wait(run, op.lease, op.conditions, steps, buffered, op.now,
                                      op.reason))


async def _purge(conn: Conn, op: o.PurgeRuns) -> tuple[str, ...]:
    rows = await conn.fetch(
        "SELECT id FROM runs WHERE state IN ('completed', 'failed', 'cancelled')"
        " AND finished_at < $1 ORDER BY finished_at, seq LIMIT $2 FOR UPDATE SKIP LOCKED",
        op.before, max(op.limit, 0))
    ids = [row["id"] for row in rows]
    if ids:
        for table in ("events", "waits", "history", "steps", "runs"):
            column = "id" if table == "runs" else "run_id"
            await conn.execute(f"DELETE FROM {table} WHERE {column} = ANY($1::text[])", ids)
    return tuple(ids)


async def _wakeup(conn: Conn, op: o.Wakeup) -> bool:
    run = await get_run(conn, op.run_id, lock=True)
    sleeping = [s for s in await get_steps(conn, op.run_id)
                if s.kind == "sleep" and s.state == "running"]
    change, woken = m.wakeup(run, op.run_id, sleeping, op.now)
    await _write(conn, op.run_id, change)
    return woken


async def _send(conn: Conn, op: o.SendEvent) -> o.SendOutcome:
    run = await get_run(conn, op.run_id, lock=True)  # sends to one run take turns
    duplicate = op.idempotency_key is not None and await conn.fetchval(
        "SELECT true FROM events WHERE run_id = $1 AND name = $2 AND idempotency_key = $3",
        op.run_id, op.name, op.idempotency_key) is not None
    row = await conn.fetchrow(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 AND kind = 'event' AND name = $2"
        " AND state = 'running' ORDER BY seq LIMIT 1", op.run_id, op.name)
    change, outcome = m.send(run, op, duplicate, None if row is None else _step(row),
                             None if row is None else await _buffered(conn, op.run_id, op.name))
    await _write(conn, op.run_id, change)
    return outcome


async def _retry(conn: Conn, op: o.RetryRun) -> o.ControlOutcome:
    run = await get_run(conn, op.run_id, lock=True)
    change = m.retry(run, op.run_id, await get_steps(conn, op.run_id), op.version, op.who,
                     op.now, op.control_id)
    await _write(conn, op.run_id, change)
    return m.controlled(change)


async def _end_cancels(conn: Conn, op: o.EndCancels) -> tuple[RunRecord, ...]:
    """Overdue cancels end, and with each the descendants its end waits for."""
    overdue = [_run(row) for row in await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE cancel_deadline IS NOT NULL AND"
        " cancel_deadline <= $1 AND state NOT IN ('completed', 'failed', 'cancelled')"
        " ORDER BY seq FOR UPDATE SKIP LOCKED", op.now)]
    ancestor: dict[str, str | None] = {r.id: None for r in overdue}
    for r in overdue:
        for d in await _descendants(conn, r.id):
            ancestor.setdefault(d.id, r.id)
    seqs = {row["id"]: row["seq"] for row in await conn.fetch(
        "SELECT id, seq FROM runs WHERE id = ANY($1::text[])", list(ancestor))}
    ended: list[RunRecord] = []
    for run_id in sorted(ancestor, key=lambda r: seqs[r], reverse=True):
        run = await get_run(conn, run_id, lock=True)
        if run is None or run.state in TERMINAL_RUN_STATES:
            continue
        change = m.end_cancel(run, op.now, ancestor[run_id])
        await _write(conn, run_id, change)
        assert change.run is not None
        await _ended(conn, change.run, op.now, ended)
    return tuple(ended)


async def _cancel(conn: Conn, op: o.CancelRun) -> o.CancelOutcome:
    run = await get_run(conn, op.run_id, lock=True)
    if run is None or run.state in TERMINAL_RUN_STATES or run.cancel_requested_at:
        return m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now)[1]
    revoked: list[tuple[str, int]] = []
    ended: list[RunRecord] = []
    first = await _awaits_children(conn, run)  # marked first: its children's ends wait on it
    out = o.CancelOutcome(True, None, None)
    if first:
        change, out = m.cancel(run, op.run_id, op.reason, op.grace, op.who, op.now,
                               awaiting_children=True,
                               children=await _unfinished(conn, op.run_id))
        await _write(conn, op.run_id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            await _ended(conn, change.run, op.now, ended)
    await _cascade(conn, op.run_id, op.reason, op.grace, op.who, op.now, revoked, ended)
    if not first:
        change, out = m.cancel(await get_run(conn, op.run_id), op.run_id, op.reason,
                               op.grace, op.who, op.now,
                               children=await _unfinished(conn, op.run_id))
        await _write(conn, op.run_id, change)
        if change.run is not None and change.run.state in TERMINAL_RUN_STATES:
            await _ended(conn, change.run, op.now, ended)
    cancelled = o.CancelOutcome(True, await get_run(conn, op.run_id), out.holder,
                                tuple(revoked))
    o.note_cancel(cancelled, op.reason, op.now + op.grace)
    return cancelled


# -- schedules: the schedule row is locked first, so two servers never decide one occurrence ---
async def _write_schedule(conn: Conn, change: m.ScheduleChange) -> list[str]:
    if change.cancel is not None:  # (cancel_previous: the previous run first)
        await _cancel(conn, change.cancel)
    started = []
    for enqueue in change.enqueues:
        outcome = await _enqueue(conn, enqueue)
        if outcome.created:
            started.append(outcome.run_id)
    if change.schedule is not None:
        await conn.execute(SCHEDULE_UPSERT, *attrs.astuple(change.schedule))
    if change.firings:
        await conn.executemany(FIRING_UPSERT, [attrs.astuple(f) for f in change.firings])
    return started


async def _last_run(conn: Conn, s: ScheduleRecord | None) -> RunRecord | None:
    # Read after the schedule row is locked: a run's end that releases a buffered occurrence
    # locks the same row, so this sees it or comes after it.
    return None if s is None or s.last_run_id is None else await get_run(conn, s.last_run_id)


async def _define_schedule(conn: Conn, op: o.DefineSchedule) -> o.DefineOutcome:
    # Two definitions of a new id at once: the second waits on the first's row.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('aiki.schedule.' || $1))",
                       op.schedule.id)
    change, outcome = m.define_schedule(await get_schedule(conn, op.schedule.id, lock=True), op)
    await _write_schedule(conn, change)
    return outcome


async def _pause_schedule(conn: Conn, op: o.PauseSchedule) -> ScheduleRecord:
    change, record = m.pause_schedule(await get_schedule(conn, op.schedule_id, lock=True), op)
    await _write_schedule(conn, change)
    return record


async def _trigger_schedule(conn: Conn, op: o.TriggerSchedule) -> ScheduleFiring:
    s = await get_schedule(conn, op.schedule_id, lock=True)
    row = await conn.fetchrow(
        f"SELECT {FIRING_COLUMNS} FROM schedule_firings WHERE schedule_id = $1 AND key = $2",
        op.schedule_id, f"trigger:{op.trigger_id}")
    change, firing = m.trigger(s, op, await _last_run(conn, s),
                               None if row is None else ScheduleFiring(*row))
    await _write_schedule(conn, change)
    return firing


async def _backfill_schedule(conn: Conn, op: o.BackfillSchedule) -> tuple[ScheduleFiring, ...]:
    s = await get_schedule(conn, op.schedule_id, lock=True)
    handled = {row["key"] for row in await conn.fetch(
        "SELECT key FROM schedule_firings WHERE schedule_id = $1", op.schedule_id)}
    change, firings = m.backfill(s, op, await _last_run(conn, s), handled)
    await _write_schedule(conn, change)
    return firings


async def _delete_schedule(conn: Conn, op: o.DeleteSchedule) -> bool:
    await conn.execute("DELETE FROM schedule_firings WHERE schedule_id = $1", op.schedule_id)
    deleted = await conn.fetchval("DELETE FROM schedules WHERE id = $1 RETURNING true",
                                  op.schedule_id)
    return bool(deleted)


async def _fire_schedules(conn: Conn, op: o.FireSchedules) -> tuple[str, ...]:
    """The due schedules, locked (skipping those another server is firing), each decided by
    the state machine: its runs, its firing records and its next occurrence in this one
    transaction."""
    rows = await conn.fetch(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire_at <= $1"
        " ORDER BY next_fire_at, id LIMIT $2 FOR UPDATE SKIP LOCKED", op.now, max(op.limit, 0))
    started: list[str] = []
    for row in rows:
        s = ScheduleRecord(*row)
        started += await _write_schedule(conn, m.fire(s, await _last_run(conn, s), op.now))
    return tuple(started)


async def _release_buffered(conn: Conn, run: RunRecord | None, now: float) -> None:
    """A run ended: an occurrence buffered behind it starts (``buffer_one``). The schedule
    row is locked whatever it holds: a firing that buffers concurrently is waited for."""
    if run is None or not m.started_by_a_schedule(run):
        return
    rows = await conn.fetch(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE last_run_id = $1"
                            " ORDER BY id FOR UPDATE", run.id)
    for row in rows:
        await _write_schedule(conn, m.release_buffered(ScheduleRecord(*row), run, now))


async def _pause(conn: Conn, op: o.PauseRun) -> o.ControlOutcome:
    change = m.pause(await get_run(conn, op.run_id, lock=True), op.run_id, op.who, op.now,
                     op.control_id)
    await _write(conn, op.run_id, change)
    return m.controlled(change)


async def _resume(conn: Conn, op: o.ResumeRun) -> o.ControlOutcome:
    run = await get_run(conn, op.run_id, lock=True)
    steps = {s.position: s for s in await get_steps(conn, op.run_id)}
    buffered = {r["name"]: r["sent_at"] for r in await conn.fetch(
        "SELECT name, min(sent_at) AS sent_at FROM events WHERE run_id = $1"
        " AND position IS NULL GROUP BY name", op.run_id)}
    change = m.resume(run, op.run_id, await get_waits(conn, op.run_id), steps, buffered,
                      op.who, op.now, op.control_id,
                      children=await _unfinished(conn, op.run_id))
    await _write(conn, op.run_id, change)
    if change.history and change.run is not None and (  # (not a repeat)
            change.run.state in TERMINAL_RUN_STATES):
        await _ended(conn, change.run, op.now, [])
    return m.controlled(change)


async def _fork(conn: Conn, op: o.ForkRun) -> o.ControlOutcome:
    existing = await get_run(conn, op.new_run_id)
    if existing is not None:
        return m.fork_again(existing, op)
    # Locked: its writers lock its row first, so its steps cannot change under the copy.
    original = await get_run(conn, op.run_id, lock=True)
    new, made, noted = m.fork(original, op, await get_steps(conn, op.run_id))
    columns = [f.name for f in attrs.fields(RunRecord)]
    inserted = await conn.fetchval(
        f"INSERT INTO runs ({', '.join(columns)}) VALUES"
        f" ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})"
        " ON CONFLICT DO NOTHING RETURNING true", *row_of(new))
    if not inserted:  # a concurrent retry of this fork committed first
        existing = await get_run(conn, op.new_run_id)
        assert existing is not None
        return m.fork_again(existing, op)
    await _write(conn, new.id, attrs.evolve(made, run=None))
    await _write(conn, op.run_id, noted)
    return o.ControlOutcome(new, applied=True)


async def _release(conn: Conn, op: o.ReleaseRun) -> None:
    run = await get_run(conn, op.lease.run_id, lock=True)
    await _write(conn, op.lease.run_id, m.release(run, op.lease, op.now, op.reason))


_OPS: dict[type[Any], Callable[[Conn, Any], Awaitable[Any]]] = {
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


# -- a batch's task starts and outcomes, together --------------------------------------------
def _array_types(record: type[Any]) -> list[str]:
    """The PostgreSQL array type of each field of ``record``, from its resolved type hint
    (``float | None`` is float8): never from the text of an annotation, which is a string
    or a class depending on whether something (cattrs) resolved the hints first."""
    hints = typing.get_type_hints(record)
    types = []
    for field in attrs.fields(record):
        args = typing.get_args(hints[field.name]) or (hints[field.name],)
        types.append("float8" if float in args else "bool" if bool in args
                     else "int8" if int in args else "text")
    return types


def _unnest(first: int, types: Sequence[str]) -> str:
    return "unnest(" + ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types)) + ")"


_STEP_TYPES = ["text", *_array_types(StepRecord)]
_RUN_TYPES = _array_types(RunRecord)
_HISTORY_TYPES = ["text", "float8", "text", "int8", "text", "text", "text", "text"]
_N_RUN = len(attrs.fields(RunRecord))
# A run's row is locked first, on its own, and read with its steps after: a statement
# that waits for a row lock reads that row as its holder left it but every other row (a
# step the holder wrote) as of before the wait, so a task outcome sent again through
# another server while the first one's transaction held the run was applied twice.
_LOCK_RUNS = "SELECT 1 FROM runs WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
_RUNS_AND_STEPS = (  # the runs, each with the step asked for and, for a run about to end
    # ($3), how many of the children it did not detach are unfinished; then the transaction's
    # id (assigned by the lock: see _Batch)
    "SELECT " + ", ".join(f"r.{f.name}" for f in attrs.fields(RunRecord)) + ", "
    f"CASE WHEN q.ending THEN (SELECT count(*) FROM runs c WHERE c.parent_id = r.id"
    f" AND NOT c.detached AND c.{_UNFINISHED}) END, "
    + ", ".join(f"s.{f.name}" for f in attrs.fields(StepRecord))
    + ", pg_current_xact_id_if_assigned()::text"
    + " FROM unnest($1::text[], $2::text[], $3::bool[]) AS q(run_id, position, ending)"
    " JOIN runs r ON r.id = q.run_id"
    " LEFT JOIN steps s ON s.run_id = q.run_id AND s.position = q.position")
_SAVE_ALL = (  # steps, runs and history events, each a column of arrays, and the waits of
    # the runs that ended, in one statement
    f"WITH upserted AS (INSERT INTO steps (run_id, {STEP_COLUMNS})"
    f" SELECT * FROM {_unnest(1, _STEP_TYPES)}"
    " ON CONFLICT (run_id, position) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(StepRecord)) + "),"
    " changed AS (UPDATE runs SET " + ", ".join(f"{c} = v.{c}" for c in _RUN_FIELDS)
    + f" FROM {_unnest(1 + len(_STEP_TYPES), _RUN_TYPES)} AS v({RUN_COLUMNS})"
    " WHERE runs.id = v.id),"
    " cleared AS (DELETE FROM waits WHERE run_id = ANY("
    f"${1 + len(_STEP_TYPES) + len(_RUN_TYPES) + len(_HISTORY_TYPES)}::text[]))"
    " INSERT INTO history (run_id, at, event, attempt, worker_id, position, name, detail)"
    f" SELECT * FROM {_unnest(1 + len(_STEP_TYPES) + len(_RUN_TYPES), _HISTORY_TYPES)}")
# The runs of ``$1`` (their ids), for :func:`aiki.store.machine.ends_alone`.
_RUNS_OF = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ANY($1::text[])"


class Parents:
    """What a store has seen of runs' parents: whether a run's end writes no other run
    (:func:`aiki.store.machine.ends_alone`), for the runs it claimed, so a batch's completions go
    with its task starts and outcomes without a read to ask. Both facts are fixed when a
    run is enqueued; a run is forgotten when it ends or is purged, and, past ``limit``
    runs, the oldest half is (an unknown run costs one read). Touched on the asyncio loop
    only."""

    def __init__(self, limit: int = 50_000) -> None:
        self._alone: dict[str, bool] = {}
        self._limit = limit

    def learn(self, run_id: str, alone: bool) -> None:
        if len(self._alone) >= self._limit:
            for old in list(self._alone)[: self._limit // 2]:
                del self._alone[old]
        self._alone[run_id] = alone

    def forget(self, run_id: str) -> None:
        self._alone.pop(run_id, None)

    def known_alone(self, run_id: str) -> bool:
        """Whether ``run_id`` is known to end writing no other run (False: not known)."""
        return self._alone.get(run_id, False)

    def __len__(self) -> int:
        return len(self._alone)

    async def ending_alone(self, conn: Conn, ops: Sequence[o.Op[Any]]) -> frozenset[str]:
        """The runs whose completion is in ``ops`` and whose end writes no other run; a
        read only for runs not known, and not for a batch of one op."""
        ending = [op.lease.run_id for op in ops if isinstance(op, o.CompleteRun)]
        if not ending or len(ops) < 2:
            return frozenset()
        unknown = [run_id for run_id in ending if run_id not in self._alone]
        if unknown:
            for row in await conn.fetch(_RUNS_OF, unknown):
                self.learn(row[0], m.ends_alone(_run(row)))
        return frozenset(run_id for run_id in ending if self._alone.get(run_id))

    def applied(self, ops: Sequence[o.Op[Any]], outcomes: o.Outcomes) -> None:
        """What a batch showed: the runs it claimed, and the ones it ended or purged
        (forgotten). Runs it only queued are not kept: memory per queued run stays what
        it was."""
        for op, outcome in zip(ops, outcomes, strict=True):
            if isinstance(op, o.Claim) and isinstance(outcome, tuple):
                for claimed in outcome:
                    self.learn(claimed.run.id, m.ends_alone(claimed.run))
            elif isinstance(op, o.PurgeRuns) and isinstance(outcome, tuple):
                for run_id in outcome:
                    self.forget(run_id)
        for run in outcomes.ended:
            self.forget(run.id)


Steady: TypeAlias = "o.StartStep | o.SaveStep | o.CompleteRun"


def _steady(op: o.Op[Any], alone: frozenset[str]) -> bool:
    """An op that goes with a batch's others (:func:`_apply_steady`): a task start or
    outcome that needs no look at other steps (no idempotency key), or the completion of a
    run in ``alone`` (its end writes no other run)."""
    if isinstance(op, o.CompleteRun):
        return op.lease.run_id in alone
    return isinstance(op, (o.StartStep, o.SaveStep)) and op.step.idempotency_key is None


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


async def _locked_runs_and_steps(
    conn: Conn, keys: Sequence[tuple[str, str | None]],
) -> tuple[dict[str, RunRecord], dict[tuple[str, str | None], StepRecord | None],
           dict[str, int]]:
    """The runs of ``keys`` (run id, position), locked, each with the step at that position
    (None: not recorded), in two round trips (:data:`_LOCK_RUNS`; one where the batch's
    BEGIN locked them: :class:`_Batch`); for a key with no position (a run about to end),
    how many of the run's children it did not detach are unfinished."""
    ids = list(dict.fromkeys(k[0] for k in keys))
    batch = _batch.get()
    if batch is None or not batch.locked.issuperset(ids):
        await conn.execute(_LOCK_RUNS, ids)
    rows = await conn.fetch(_RUNS_AND_STEPS, [k[0] for k in keys], [k[1] for k in keys],
                            [k[1] is None for k in keys])
    runs: dict[str, RunRecord] = {}
    steps: dict[tuple[str, str | None], StepRecord | None] = dict.fromkeys(keys)
    children: dict[str, int] = {}
    for row in rows:
        values = tuple(row)
        run = runs[values[0]] = RunRecord(*values[:_N_RUN])
        if values[_N_RUN] is not None:
            children[run.id] = values[_N_RUN]
        if values[_N_RUN + 1] is not None:
            steps[run.id, values[_N_RUN + 1]] = StepRecord(*values[_N_RUN + 1:-1])
    _note_xid(rows)
    return runs, steps, children


class _Writes:
    """The changes decided so far in a group of steady ops, written in one statement."""

    def __init__(self) -> None:
        self._empty()

    def _empty(self) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.steps: dict[tuple[str, str], StepRecord] = {}  # in the order first written
        self.history: list[History] = []
        self.cleared: list[str] = []  # runs whose waits end

    def add(self, run_id: str, change: m.Change) -> None:
        if change.run is not None:
            self.runs[run_id] = change.run
        for step in change.steps:
            self.steps[run_id, step.position] = step
        if change.waits == ():
            self.cleared.append(run_id)
        self.history += [(run_id, e.at, e.event, e.attempt, e.worker_id, e.position, e.name,
                          e.detail) for e in change.history]

    async def flush(self, conn: Conn) -> None:
        if self.runs or self.steps or self.cleared:
            await conn.execute(
                _SAVE_ALL,
                *_columns([(k[0], *row_of(s)) for k, s in self.steps.items()],
                          len(_STEP_TYPES)),
                *_columns([row_of(r) for r in self.runs.values()], len(_RUN_TYPES)),
                *_columns(self.history, len(_HISTORY_TYPES)), self.cleared)
        self._empty()


async def _apply_steady(conn: Conn, ops: Sequence[Steady]) -> list[Any]:
    """Several task starts and outcomes and ends of runs (of one run or many) in three round
    trips, where one at a time takes three each: a lock of every run and one read of them
    with the steps asked for (:func:`_locked_runs_and_steps`), the state machine's decisions
    in order (each op sees the ones before it), then one write. (A run that ends waiting for
    its children writes its waits on its own; one that turns out to have a parent tells it.)"""
    keys = list(dict.fromkeys(
        (op.lease.run_id, None if isinstance(op, o.CompleteRun) else op.step.position)
        for op in ops))
    runs, steps, children = await _locked_runs_and_steps(conn, keys)
    outcomes: list[Any] = []
    writes = _Writes()
    for op in ops:
        run_id = op.lease.run_id
        try:
            if isinstance(op, o.CompleteRun):
                change = m.finish(runs.get(run_id), op.lease, op.now, result=op.result,
                                  children=children.get(run_id, 0))
            else:
                change = m.decide_step(op, runs.get(run_id), steps[run_id, op.step.position],
                                       None)
        except AikiError as exc:  # refused on purpose; it wrote nothing
            outcomes.append(exc)
            continue
        ended = change.run if (isinstance(op, o.CompleteRun) and change.run is not None
                               and change.run.state in TERMINAL_RUN_STATES) else None
        # (The run's row, locked, has the last word on whether its end writes another
        # run: a run id used again after a purge elsewhere may now name a child.)
        alone = ended is None or m.ends_alone(ended)
        # (Steps without their run's row go on their own: ``_write`` writes the row too.)
        if m.rows_only(change) and alone and (change.run is not None or not change.steps):
            writes.add(run_id, change)
        else:
            await writes.flush(conn)
            await _write(conn, run_id, change)
        if change.run is not None:
            runs[run_id] = change.run
        for step in change.steps:
            steps[run_id, step.position] = step
        if ended is not None and alone:
            o.note_ended(ended)
        elif ended is not None:
            await _ended(conn, ended, op.now, [])
        outcomes.append(change.run if isinstance(op, o.CompleteRun) else bool(change.history))
    await writes.flush(conn)
    return outcomes


# (A run's end may also write its parent, woken, and its children, cancelled: it may touch
# several runs, and a task start of its parent must not move ahead of it. One that writes
# no other run is known before the batch is ordered: :class:`Parents`.)
_ONE_RUN_OPS = (o.StartStep, o.SaveStep, o.ReleaseRun, o.WaitRun, o.AwaitStep)


def _run_of(op: o.Op[Any], alone: frozenset[str] = frozenset()) -> str | None:
    """The one run ``op`` reads and writes; None for an op that may touch several."""
    if isinstance(op, _ONE_RUN_OPS):
        return op.lease.run_id
    if isinstance(op, o.CompleteRun) and op.lease.run_id in alone:
        return op.lease.run_id
    return op.run_id if isinstance(op, o.Enqueue) else None


def _order(ops: Sequence[o.Op[Any]], alone: frozenset[str] = frozenset()) -> list[int]:
    """The order to apply ``ops`` in: steady ops first (:func:`_steady`), then enqueues,
    so each kind goes together, unless an earlier op of the same run stays before them. A
    batch's ops come from requests in flight at once (only one request's chain is ordered,
    and it is about one run), so any order that keeps each run's ops in turn is an order
    they could have come in; an op that may touch several runs (a claim, an expiry sweep,
    the end of a run with a parent, ...) moves nothing across it."""
    order: list[int] = []
    first: list[int] = []
    new: list[int] = []  # enqueues, after the steady ops: they go together too
    rest: list[int] = []
    held: set[str | None] = set()
    behind = False  # an enqueue stayed in ``rest``: the later ones do too (runs' seq order)
    for k, op in enumerate(ops):
        run = _run_of(op, alone)
        enqueue = isinstance(op, o.Enqueue)
        if run is None:
            order += first + new + rest + [k]
            first, new, rest, held, behind = [], [], [], set(), False
        elif _steady(op, alone) and run not in held:
            first.append(k)
        elif enqueue and not behind and run not in held:
            new.append(k)
            held.add(run)
        else:
            rest.append(k)
            held.add(run)
            behind = behind or enqueue
    return order + first + new + rest




async def _apply_all(conn: Conn, ops: Sequence[o.Op[Any]], parents: Parents) -> list[Any]:
    """One outcome per op, in the order of ``ops`` (refusals are outcomes), applied in the
    order of :func:`_order`: task starts and outcomes and ends of runs, the bulk of a busy
    batch, go together (:func:`_apply_steady`), and so do enqueues (:func:`_enqueue_all`)."""
    alone = await parents.ending_alone(conn, ops)
    order = _order(ops, alone)
    outcomes: list[Any] = [None] * len(ops)
    i = 0
    while i < len(order):
        kind = _kind(ops[order[i]], alone)
        j = i + 1
        while kind is not None and j < len(order) and _kind(ops[order[j]], alone) is kind:
            j += 1
        if kind is not None and j - i >= 2:
            together = await kind(conn, [ops[k] for k in order[i:j]])
            for k, outcome in zip(order[i:j], together, strict=True):
                outcomes[k] = outcome
            i = j
            continue
        outcomes[order[i]] = await _one_of(conn, ops[order[i]])
        i += 1
    return outcomes


def _kind(op: o.Op[Any], alone: frozenset[str]) -> Callable[..., Awaitable[list[Any]]] | None:
    """How ``op`` goes together with the ops of its kind next to it; None: on its own."""
    if _steady(op, alone):
        return _apply_steady
    return _enqueue_all if isinstance(op, o.Enqueue) else None


async def _one_of(conn: Conn, op: o.Op[Any]) -> Any:
    """The outcome of ``op`` applied on its own; a refusal is an outcome."""
    try:
        return await _apply_one(conn, op)
    except AikiError as exc:  # refused on purpose; it wrote nothing
        return exc


async def _apply_one(conn: Conn, op: o.Op[Any]) -> Any:
    apply = _OPS.get(type(op))
    if apply is None:
        raise TypeError(f"unknown store operation {type(op).__name__}")
    return await apply(conn, op)


# -- one crossing per call ---------------------------------------------------------------------
# A batch of the hot path's ops has its statements planned once and kept (a generic plan):
# PostgreSQL would plan those that take arrays again at every call, because their plan for
# the arrays' actual lengths looks cheaper than one for any length, and planning them costs
# more than running them (0.2 ms against 0.07). Their plans are key lookups whatever the
# values. Other batches (and reads) keep the default: a timer's wake-up, planned for no
# particular time, would scan every waiting run (37 ms at 200,000, against 0.3).
# Every batch's statements find their rows by key or through an index made for them, and
# none of them may read a table in full: while the runs and steps tables are small (below a
# few thousand rows), PostgreSQL judges a hash join over a full read of both cheaper than
# key lookups for the ten rows it guesses an array holds, and a plan made then is kept for
# the connection's life. At 600 runs that read took 0.62 ms against 0.05 (one task start's
# read), and grew with the tables until the plan was remade.
_KEYED = "SET LOCAL enable_seqscan = off"
BEGIN = f"BEGIN; {_KEYED}"
BEGIN_GENERIC = f"BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; {_KEYED}"
_GENERIC = (o.StartStep, o.SaveStep, o.CompleteRun, o.Enqueue, o.Claim, o.Renew)


def _begin(ops: Sequence[o.Op[Any]]) -> str:
    return BEGIN_GENERIC if all(isinstance(op, _GENERIC) for op in ops) else BEGIN


@attrs.define
class _Batch:
    """The batch a connection applies now (:func:`apply_batch`), as its statements see it.

    ``locked``: the runs its BEGIN locked. A batch of task starts and outcomes and ends of
    runs locks its runs first whatever it does next (:func:`_locked_runs_and_steps`), so the
    lock goes with BEGIN, in one round trip (a simple query: the ids as literals), and is
    not sent again. ``xid``: the transaction's id, once a statement read it: a row lock
    assigns one, so the read after the lock returns it, and the read before COMMIT (for the
    fate of a commit whose reply is lost) is not sent either. ``versions``: the row version
    (``xmin``) and place (``ctid``) of each run a claim of the batch leased. ``kept``: the
    row version this store keeps of runs a renewal of the batch names; ``renewed``: the new
    version and place of those it renewed while still that version (:func:`_renew`).
    """

    locked: frozenset[str] = frozenset()
    xid: str | None = None
    versions: dict[str, tuple[str, str]] = attrs.Factory(dict)  # claimed: (xmin, ctid)
    kept: Mapping[str, str] = attrs.Factory(dict)
    renewed: dict[str, tuple[str, str]] = attrs.Factory(dict)


_batch: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "aiki_postgres_batch", default=None)


def _note_xid(rows: Sequence[Any]) -> None:
    """The batch's transaction id, from the last column of ``rows`` (a statement's after a
    row lock or a write: the id is assigned), so it is not read again before COMMIT."""
    batch = _batch.get()
    if batch is not None and rows:
        batch.xid = rows[0][-1]


def _locked_first(op: o.Op[Any], parents: Parents) -> str | None:
    """The run ``op`` locks before anything else, if its batch may lock it with BEGIN."""
    if isinstance(op, (o.StartStep, o.SaveStep)) or (
            isinstance(op, o.CompleteRun) and parents.known_alone(op.lease.run_id)):
        return op.lease.run_id
    return None


def _begin_and_lock(ops: Sequence[o.Op[Any]], parents: Parents) -> tuple[str, frozenset[str]]:
    """BEGIN for ``ops``, with the lock of their runs where the batch would take those locks
    first, together, anyway: every op is a task start or outcome, or the end of a run known
    to write no other run (ordered by id, as every lock of several runs is); and the runs
    it locks."""
    begin = _begin(ops)
    locked: set[str] = set()
    for op in ops:
        run_id = _locked_first(op, parents)
        if run_id is None:
            return begin, frozenset()
        locked.add(run_id)
    if not locked:
        return begin, frozenset()
    literals = ", ".join(_literal(run_id) for run_id in sorted(locked))
    return (f"{begin}; SELECT 1 FROM runs WHERE id IN ({literals}) ORDER BY id FOR UPDATE",
            frozenset(locked))


def _literal(text: str) -> str:
    """``text`` as a PostgreSQL string literal, whatever standard_conforming_strings and
    backslash_quote say (a quote doubled, not escaped: ``\\'`` is refused under
    ``backslash_quote = off``)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


async def commit(conn: Conn) -> None:
    """COMMIT. A seam: the tests replace it to lose the connection around the commit."""
    await conn.execute("COMMIT")


async def apply_batch(conn: Conn, ops: Sequence[o.Op[Any]], parents: Parents,
                      kept: Mapping[str, str] | None = None) -> tuple[o.Outcomes, _Batch]:
    """Apply ``ops`` in one transaction; one outcome per op (refusals are outcomes), and the
    batch as its statements saw it: the row version and place (``xmin``, ``ctid``) of each
    run it claimed, and of each run of ``kept`` (run id: the row version this store keeps)
    it renewed while still that version."""
    pid = conn.get_server_pid()  # (unknown once the connection is gone)
    begin, locked = _begin_and_lock(ops, parents)
    batch = _Batch(locked, kept=kept or {})
    _batch.set(batch)  # (this call's own context: the loop runs each call as a task)
    try:
        await conn.execute(begin)
        with o.noting_ends() as noted:
            outcomes = await _apply_all(conn, ops, parents)
        outcomes = o.outcomes_of(outcomes, noted)
        # A transaction that wrote nothing has no id and nothing to lose.
        xid: str | None = batch.xid or await conn.fetchval(
            "SELECT pg_current_xact_id_if_assigned()::text")
    except Exception as exc:
        if not _lost(exc, conn) and not conn.is_closed():
            await conn.execute("ROLLBACK")  # keeps the connection for the next call
        raise  # (a lost or cancelled one is terminated: the server rolls back)
    try:
        await commit(conn)
    except Exception as exc:
        if xid is not None and _lost(exc, conn):
            raise CommitUnknown(exc, outcomes, xid, pid) from exc
        raise
    parents.applied(ops, outcomes)
    return outcomes, batch


async def run_read(pool: Pool, read: Callable[[Conn], Awaitable[T]]) -> T:
    return await with_connection(pool, read)


async def transaction_status(pool: Pool, xid: str, pid: int) -> str | None:
    """Whether transaction ``xid`` committed: ``committed``, ``aborted`` or ``in progress``.

    If it is still in progress (its server process has not noticed yet that its client is
    gone), that process is terminated first, and waited for, so the answer is final.
    """

    async def read(conn: Conn) -> str | None:
        status: str | None = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid)
        if status == "in progress":
            await conn.execute("SELECT pg_terminate_backend($1, 5000)", pid)
            status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid)
        return status

    return await with_connection(pool, read)


async def open_pool(dsn: str, schema: str, max_size: int, connect_timeout: float,
                    command_timeout: float | None) -> Pool:
    """A pool whose connections work in ``schema``, brought up to date by the migrations."""
    pool = ConnectionPool(
        connector(dsn, timeout=connect_timeout, command_timeout=command_timeout,
                  server_settings={"search_path": schema, "application_name": "aiki"}),
        max_size,
    )
    try:
        await with_connection(pool, lambda conn: migrate(conn, schema))
    except BaseException:
        pool.terminate()
        raise
    return pool


async def close_pool(pool: Pool, timeout: float) -> None:
    """Close the pool politely within ``timeout`` seconds, then by force."""
    try:
        await pool.close(timeout)
    except BaseException:
        pool.terminate()
        raise


# -- wake-ups: LISTEN on a connection of its own ------------------------------------------------
def work_channel(schema: str) -> str:
    """The channel the triggers notify (migrations 2 and 3): payload '' when a run in
    ``schema`` is queued, 'ended:<run id>' when one ends, 'due' when a timed wait begins."""
    return f"aiki_work:{schema}"


class Listener:
    """A dedicated connection LISTENing on the work channel (not from the pool: a pooled
    connection is handed around, a listening one must stay put)."""

    def __init__(self, conn: Connection, ignore: Callable[[int], bool]) -> None:
        self._conn = conn
        self._ignore = ignore
        self._heard = asyncio.Event()
        self._notices: list[str] = []
        self._lost: BaseException | None = None

    @classmethod
    async def open(cls, dsn: str, schema: str, connect_timeout: float,
                   ignore: Callable[[int], bool] = lambda pid: False) -> Listener:
        """``ignore(pid)``: a notification from that server process is not worth a wake-up
        (one of this store's own connections: its server pokes its Dispatcher itself)."""
        try:
            conn = await connector(dsn, timeout=connect_timeout,
                                   server_settings={"application_name": "aiki-listen"})()
        except CONNECT_FAILURES as exc:
            raise NotCommitted(exc) from exc
        listener = cls(conn, ignore)
        conn.add_termination_listener(listener._on_termination)
        try:
            await conn.add_listener(work_channel(schema), listener._on_notification)
        except BaseException as exc:
            conn.terminate()
            if isinstance(exc, Exception) and _lost(exc, conn):
                raise NotCommitted(exc) from exc
            raise
        return listener

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        if not self._ignore(pid):
            self._notices.append(str(payload))
            self._heard.set()

    def _on_termination(self, *args: Any) -> None:
        self._lost = ConnectionResetError("the listening connection was closed")
        self._heard.set()

    async def wait(self) -> list[str]:
        """The payloads of the notifications that arrived since the last call, once there is
        one; repeats are folded into one."""
        await self._heard.wait()
        self._heard.clear()
        if self._lost is not None:
            raise NotCommitted(self._lost)
        notices, self._notices = self._notices, []
        return list(dict.fromkeys(notices))

    def close(self) -> None:
        self._conn.terminate()
