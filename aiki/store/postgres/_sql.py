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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg
import attrs
from asyncpg.transaction import Transaction

from aiki.errors import AikiError, StoreUnavailable
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
from aiki.store.postgres._pool import Connection, ConnectionPool, PoolClosed, connector
from aiki.store.postgres._schema import migrate

T = TypeVar("T")
Conn: TypeAlias = Connection
Pool: TypeAlias = ConnectionPool

RUN_COLUMNS = ", ".join(f.name for f in attrs.fields(RunRecord))
STEP_COLUMNS = ", ".join(f.name for f in attrs.fields(StepRecord))
HISTORY_COLUMNS = ", ".join(f.name for f in attrs.fields(HistoryEvent))
NO_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
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
    id (``pg_xact_status`` tells its fate), ``pid`` the server process that ran it.
    """

    def __init__(self, cause: BaseException, outcomes: list[Any], xid: str, pid: int) -> None:
        super().__init__(describe(cause))
        self.cause, self.outcomes, self.xid, self.pid = cause, outcomes, xid, pid


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


async def next_wake_at(conn: Conn) -> float | None:
    wake_at: float | None = await conn.fetchval(
        "SELECT min(wake_at) FROM runs WHERE state = 'sleeping'"
    )
    return wake_at


async def _update_run(
    conn: Conn, run: RunRecord, now: float, event: History, **changes: Any
) -> RunRecord:
    """Write ``changes`` to the run and append ``event`` to its history, in one statement
    (one round trip), and return the run as written. Column names come from this module,
    never from callers' data."""
    changes["updated_at"] = now
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(changes, start=10))
    await conn.execute(
        f"WITH changed AS (UPDATE runs SET {assignments} WHERE id = $9) "
        + HISTORY_INSERT, *event, run.id, *changes.values(),
    )
    return attrs.evolve(run, **changes)


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


async def _fenced(conn: Conn, lease: Lease) -> RunRecord:
    run = await get_run(conn, lease.run_id, lock=True)
    if (run is None or run.state != "running" or run.lease_epoch != lease.epoch
            or run.lease_owner != lease.worker_id):
        raise stale_lease_error(lease, run)
    return run


# -- operations: each checks everything before its first write --------------------------------
async def _enqueue(conn: Conn, op: o.Enqueue) -> o.EnqueueOutcome:
    inserted = await conn.fetchval(  # the run and its first event in one round trip
        "WITH new AS (INSERT INTO runs (id, workflow, version, payload, state, idempotency_key,"
        " attempts, lease_epoch, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, 'queued', $5, 0, 0, $6, $6) ON CONFLICT DO NOTHING"
        " RETURNING id) INSERT INTO history (run_id, at, event, attempt, detail)"
        " SELECT id, $6, 'run.queued', 0, $7 FROM new RETURNING true",
        op.run_id, op.workflow, op.version, op.payload, op.idempotency_key, op.now,
        f"version {op.version}",
    )
    if inserted:
        return o.EnqueueOutcome(op.run_id, created=True)
    if op.idempotency_key is not None:
        existing = await conn.fetchval(
            "SELECT id FROM runs WHERE workflow = $1 AND idempotency_key = $2",
            op.workflow, op.idempotency_key,
        )
        if existing is not None:
            return o.EnqueueOutcome(existing, created=False)
    return o.EnqueueOutcome(op.run_id, created=False)  # this run id exists: a retried enqueue


async def _claim(conn: Conn, op: o.Claim) -> tuple[ClaimedRun, ...]:
    if not op.workflows or op.limit <= 0:
        return ()
    rows = await conn.fetch(
        "UPDATE runs SET state = 'running', attempts = attempts + 1,"
        " lease_epoch = lease_epoch + 1, lease_owner = $4, lease_expires_at = $5,"
        " updated_at = $6 WHERE id IN (SELECT id FROM runs WHERE state = 'queued'"
        " AND (workflow, version) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        f" ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING seq, {RUN_COLUMNS}",
        [w for w, _ in op.workflows], [v for _, v in op.workflows], op.limit,
        op.worker_id, op.now + op.lease_ttl, op.now,
    )
    if not rows:
        return ()
    runs = [RunRecord(*tuple(row)[1:]) for row in sorted(rows, key=lambda row: row["seq"])]
    await _log(conn, *(
        _event(run.id, op.now, "run.running", run.attempts, op.worker_id,
               detail=f"lease epoch {run.lease_epoch}")
        for run in runs
    ))
    steps: dict[str, list[StepRecord]] = {run.id: [] for run in runs}
    for row in await conn.fetch(
        f"SELECT run_id, {STEP_COLUMNS} FROM steps WHERE run_id = ANY($1::text[]) ORDER BY seq",
        list(steps),
    ):
        steps[row["run_id"]].append(StepRecord(*tuple(row)[1:]))
    return tuple(ClaimedRun(run, tuple(steps[run.id])) for run in runs)


async def _renew(conn: Conn, op: o.Renew) -> tuple[str, ...]:
    if not op.leases:
        return ()
    renewed = {
        (row["id"], row["lease_epoch"], row["lease_owner"])
        for row in await conn.fetch(
            "UPDATE runs SET lease_expires_at = $4, updated_at = $5"
            " FROM unnest($1::text[], $2::bigint[], $3::text[]) AS lease (id, epoch, owner)"
            " WHERE runs.id = lease.id AND runs.state = 'running'"
            " AND runs.lease_epoch = lease.epoch AND runs.lease_owner = lease.owner"
            " RETURNING runs.id, runs.lease_epoch, runs.lease_owner",
            [lease.run_id for lease in op.leases], [lease.epoch for lease in op.leases],
            [lease.worker_id for lease in op.leases], op.now + op.lease_ttl, op.now,
        )
    }
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
    return await _requeue_due(
        conn, "state = 'running' AND lease_expires_at <= $1", op.now,
        "lease_owner = NULL, lease_expires_at = NULL",
        lambda row: _event(
            row["id"], op.now, "run.queued", row["attempts"], row["lease_owner"],
            detail=f"lease epoch {row['lease_epoch']} of worker {row['lease_owner']!r} expired",
        ),
    )


async def _wake_due(conn: Conn, op: o.WakeDue) -> tuple[str, ...]:
    return await _requeue_due(
        conn, "state = 'sleeping' AND wake_at <= $1", op.now, "wake_at = NULL",
        lambda row: _event(row["id"], op.now, "run.queued", row["attempts"], None,
                           detail="woke up"),
    )


async def _save_step(conn: Conn, op: o.StartStep | o.SaveStep) -> None:
    run = await _fenced(conn, op.lease)
    new = op.step
    row = await conn.fetchrow(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 AND position = $2",
        run.id, new.position,
    )
    old = None if row is None else _step(row)
    if not step_write_changes(run.id, old, new, save=isinstance(op, o.SaveStep)):
        return None
    if new.idempotency_key is not None:
        other = await conn.fetchval(
            "SELECT position FROM steps WHERE run_id = $1 AND name = $2"
            " AND idempotency_key = $3 AND position <> $4 ORDER BY seq LIMIT 1",
            run.id, new.name, new.idempotency_key, new.position,
        )
        if other is not None:
            raise key_conflict_error(run.id, new, other)
    if isinstance(op, o.StartStep):
        new = attrs.evolve(new, state="running")
        event, detail = "task.running", None
    else:
        event, detail = history_event_for_step(new)
    fields = attrs.fields(StepRecord)
    await conn.execute(
        f"INSERT INTO steps (run_id, {STEP_COLUMNS}) VALUES"
        f" ({', '.join(f'${i}' for i in range(1, len(fields) + 2))})"
        " ON CONFLICT (run_id, position) DO UPDATE SET "
        + ", ".join(f"{f.name} = excluded.{f.name}" for f in fields),
        run.id, *attrs.astuple(new),
    )
    await _update_run(conn, run, op.now, _event(run.id, op.now, event, new.attempts,
                                                op.lease.worker_id, position=new.position,
                                                name=new.name, detail=detail))
    return None


async def _finish(conn: Conn, lease: Lease, now: float, state: str, result: str | None = None,
                  error: tuple[str, str] | None = None) -> RunRecord:
    run = await _fenced(conn, lease)
    error_type, error_message = error if error else (None, None)
    return await _update_run(
        conn, run, now,
        _event(run.id, now, f"run.{state}", run.attempts, lease.worker_id,
               detail=None if error is None else f"{error_type}: {error_message}"),
        state=state, result=result, error_type=error_type, error_message=error_message,
        finished_at=now, **NO_LEASE,
    )


async def _suspend(conn: Conn, op: o.SuspendRun) -> None:
    run = await _fenced(conn, op.lease)
    await _update_run(conn, run, op.now,
                      _event(run.id, op.now, "run.sleeping", run.attempts, op.lease.worker_id,
                             detail=f"{op.reason}; wakes at {op.wake_at}"),
                      state="sleeping", wake_at=op.wake_at, **NO_LEASE)


async def _release(conn: Conn, op: o.ReleaseRun) -> None:
    run = await _fenced(conn, op.lease)
    await _update_run(conn, run, op.now,
                      _event(run.id, op.now, "run.queued", run.attempts, op.lease.worker_id,
                             detail=op.reason),
                      state="queued", **NO_LEASE)


async def _apply_one(conn: Conn, op: o.Op[Any]) -> Any:
    if isinstance(op, o.Enqueue):
        return await _enqueue(conn, op)
    if isinstance(op, o.Claim):
        return await _claim(conn, op)
    if isinstance(op, o.Renew):
        return await _renew(conn, op)
    if isinstance(op, o.ExpireLeases):
        return await _expire(conn, op)
    if isinstance(op, (o.StartStep, o.SaveStep)):
        return await _save_step(conn, op)
    if isinstance(op, o.CompleteRun):
        return await _finish(conn, op.lease, op.now, "completed", result=op.result)
    if isinstance(op, o.FailRun):
        return await _finish(conn, op.lease, op.now, "failed",
                             error=(op.error_type, op.error_message))
    if isinstance(op, o.SuspendRun):
        return await _suspend(conn, op)
    if isinstance(op, o.ReleaseRun):
        return await _release(conn, op)
    if isinstance(op, o.WakeDue):
        return await _wake_due(conn, op)
    raise TypeError(f"unknown store operation {type(op).__name__}")


# -- one crossing per call ---------------------------------------------------------------------
async def commit(conn: Conn, transaction: Transaction) -> None:
    """COMMIT. A seam: the tests replace it to lose the connection around the commit."""
    await transaction.commit()


async def run_batch(pool: Pool, ops: Sequence[o.Op[Any]]) -> list[Any]:
    """Apply ``ops`` in one transaction; one outcome per op (refusals are outcomes)."""

    async def body(conn: Conn) -> list[Any]:
        pid = conn.get_server_pid()  # (unknown once the connection is gone)
        transaction = conn.transaction()
        await transaction.start()
        try:
            outcomes: list[Any] = []
            for op in ops:
                try:
                    outcomes.append(await _apply_one(conn, op))
                except AikiError as exc:  # refused on purpose; it wrote nothing
                    outcomes.append(exc)
            # A transaction that wrote nothing has no id and nothing to lose.
            xid: str | None = await conn.fetchval("SELECT pg_current_xact_id_if_assigned()::text")
        except Exception as exc:
            if not _lost(exc, conn) and not conn.is_closed():
                await transaction.rollback()  # keeps the connection for the next call
            raise  # (a lost or cancelled one is terminated: the server rolls back)
        try:
            await commit(conn, transaction)
        except Exception as exc:
            if xid is not None and _lost(exc, conn):
                raise CommitUnknown(exc, outcomes, xid, pid) from exc
            raise
        return outcomes

    return await with_connection(pool, body)


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
    """The channel ``notify_work`` (migration 2) notifies when a run in ``schema`` is queued."""
    return f"aiki_work:{schema}"


class Listener:
    """A dedicated connection LISTENing on the work channel (not from the pool: a pooled
    connection is handed around, a listening one must stay put)."""

    def __init__(self, conn: Connection, ignore: Callable[[int], bool]) -> None:
        self._conn = conn
        self._ignore = ignore
        self._heard = asyncio.Event()
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

    def _on_notification(self, conn: Any, pid: int, *args: Any) -> None:
        if not self._ignore(pid):
            self._heard.set()

    def _on_termination(self, *args: Any) -> None:
        self._lost = ConnectionResetError("the listening connection was closed")
        self._heard.set()

    async def wait(self) -> None:
        """Return once a notification arrived (all that arrived meanwhile count as one)."""
        await self._heard.wait()
        self._heard.clear()
        if self._lost is not None:
            raise NotCommitted(self._lost)

    def close(self) -> None:
        self._conn.terminate()
