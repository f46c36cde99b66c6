"""The PostgreSQL store as Trio sees it: each call crosses the bridge once, and outages are
ridden out here (see the package docstring for the whole story)."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import trio

from aiki.asyncio_bridge import AsyncioThread
from aiki.errors import StoreUnavailable
from aiki.records import (
    EventRecord,
    HistoryEvent,
    RunCount,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitRecord,
)
from aiki.store import ops as o
from aiki.store import redact_url as redact
from aiki.store.postgres import _fast, _sql

T = TypeVar("T")
log = logging.getLogger("aiki.store.postgres")

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)  # then 1.0 s between attempts
CLOSE_TIMEOUT = 5.0
RESYNC = "resync"


class PostgresStore:
    """A store in a PostgreSQL database, shared safely by any number of servers.

    Open it with ``async with PostgresStore.open(dsn) as store:`` or ``store = await
    PostgresStore.open(dsn)`` then ``await store.aclose()``; see :meth:`open`.
    """

    # A commit runs beside the Trio thread (asyncpg on the store's own thread, and the
    # database server): work scheduled while it is on its way costs it nothing, so an
    # enqueue's run is pushed to its idle worker before the commit (see
    # ``Dispatcher.assign_early``). Not so for SQLite, whose idle batches run inline.
    commits_off_the_loop = True

    def __init__(self, *, bridge: AsyncioThread, pool: _sql.Pool, dsn: str, schema: str,
                 retry_for: float, connect_timeout: float, resources: AsyncExitStack) -> None:
        self.dsn = redact(dsn)
        self.schema = schema
        self.retry_for = retry_for
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._bridge = bridge
        self._pool = pool
        self._resources = resources
        self._closed = False
        self._parents = _sql.Parents()  # (touched on the asyncio loop only)
        self._fresh = _fast.Fresh()  # (likewise)

    @classmethod
    def open(
        cls, dsn: str, *, schema: str = "aiki", max_size: int = 10,
        retry_for: float = 15.0, connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
    ) -> Opening:
        """Connect to the database ``dsn`` names and bring schema ``schema`` up to date.

        ``dsn``: ``postgresql://user:password@host:port/database`` (or any form asyncpg
        accepts, such as ``postgresql://user@/db?host=/socket/dir``). ``schema``: where the
        tables live (created if missing; lowercase letters, digits and ``_``). The pool opens
        up to ``max_size`` connections, as calls need them. ``retry_for``: how long (seconds) a call
        keeps retrying while the database is unreachable before raising
        :class:`StoreUnavailable`. ``connect_timeout`` bounds one connection attempt and
        ``command_timeout`` one statement (``None``: unbounded).

        The store runs one asyncio event loop (for asyncpg) for its whole life. Use the result
        as ``async with PostgresStore.open(dsn) as store:`` and the loop runs in the calling
        task's nursery context for the block. Or ``await`` it and call :meth:`aclose` later,
        from any task and inside any cancel scope (``aiki.embedded`` closes its store in a
        shielded block): then the loop runs in a Trio system task of its own, since a loop
        held in the opener's scopes could only be closed in exactly their nesting. Either
        way, any task may use the store meanwhile.
        """
        if not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"schema {schema!r} is not a plain lowercase PostgreSQL name "
                "(letters, digits and _, not starting with a digit, at most 63)"
            )
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")

        async def opening(in_this_task: bool) -> PostgresStore:
            failure: Exception | None = None
            async with AsyncExitStack() as stack:
                if in_this_task:
                    bridge = await stack.enter_async_context(AsyncioThread.open())
                else:
                    bridge, close = await AsyncioThread.start_detached()
                    stack.push_async_callback(close)
                try:
                    pool = await _retrying(
                        f"opening the PostgreSQL store at {redact(dsn)}", retry_for,
                        lambda: bridge.run(_sql.open_pool, dsn, schema, max_size,
                                           connect_timeout, command_timeout),
                    )
                except Exception as exc:
                    failure = exc  # re-raised as itself, not wrapped in the loop's nursery group
                else:
                    stack.push_async_callback(_close_pool, bridge, pool)
                    return cls(bridge=bridge, pool=pool, dsn=dsn, schema=schema,
                               retry_for=retry_for, connect_timeout=connect_timeout,
                               resources=stack.pop_all())
            assert failure is not None
            raise failure

        return Opening(opening)

    @property
    def connections(self) -> int:
        """Connections the pool holds open now, idle or in use (at most ``max_size``)."""
        return self._pool.size

    async def aclose(self) -> None:
        """Close the pool (waiting up to 5 s for calls in flight) and the event loop."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await self._resources.aclose()

    # -- reads ------------------------------------------------------------------------------
    async def _read(self, what: str, read: Callable[[_sql.Conn], Awaitable[T]]) -> T:
        return await self._call(what, lambda: self._bridge.run(_sql.run_read, self._pool, read))

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._read("get_run", lambda conn: _sql.get_run(conn, run_id))

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self._read("get_steps", lambda conn: _sql.get_steps(conn, run_id))

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        return await self._read("get_history", lambda conn: _sql.get_history(conn, run_id))

    async def list_runs(
        self, *, workflow: str | None = None, state: str | None = None, limit: int = 100
    ) -> tuple[RunRecord, ...]:
        return await self._read(
            "list_runs", lambda conn: _sql.list_runs(conn, workflow, state, limit)
        )

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        return await self._read("get_waits", lambda conn: _sql.get_waits(conn, run_id))

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        return await self._read("get_children", lambda conn: _sql.get_children(conn, run_id))

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        return await self._read("get_events", lambda conn: _sql.get_events(conn, run_id))

    async def run_counts(self) -> tuple[RunCount, ...]:
        return await self._read("run_counts", _sql.run_counts)

    async def next_due(self) -> float | None:
        return await self._read("next_due", _sql.next_due)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        return await self._read("get_schedule",
                                lambda conn: _sql.get_schedule(conn, schedule_id))

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        return await self._read("list_schedules", _sql.list_schedules)

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        return await self._read("get_firings",
                                lambda conn: _sql.get_firings(conn, schedule_id, limit))

    # -- writes -----------------------------------------------------------------------------
    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        """Apply ``ops`` in one transaction (one crossing); one outcome per op.

        Retried while the database is unreachable, for up to ``retry_for`` seconds, when
        that is safe: the batch was not committed, or the connection died after COMMIT and
        re-reading the transaction's status showed that it was not. If that re-read shows it
        was committed, its outcomes are returned as if nothing had happened.
        """
        ops = list(ops)
        if not ops:
            await trio.lowlevel.checkpoint()
            return []

        async def attempt() -> list[Any]:
            try:
                return await self._bridge.run(_fast.run_batch, self._pool, ops, self._parents,
                                              self._fresh)
            except _sql.CommitUnknown as unknown:
                status = await self._call(f"reading the fate of {_what(unknown)}",
                                          functools.partial(self._fate, unknown))
                if status == "committed":
                    log.warning("the connection to %s died after COMMIT; %s was committed "
                                "(re-read)", self.dsn, _what(unknown))
                    return unknown.outcomes
                if status == "aborted":
                    raise _sql.NotCommitted(unknown.cause) from unknown
                raise StoreUnavailable(
                    f"the PostgreSQL store at {self.dsn}: the connection failed after COMMIT "
                    f"was sent ({unknown}), and whether {_what(unknown)} was committed "
                    f"cannot be told (its status is {status!r}); the batch may or may not "
                    "have been applied"
                ) from unknown

        return await self._call("apply", attempt)

    async def _fate(self, unknown: _sql.CommitUnknown) -> str | None:
        if unknown.xid is not None:
            return await self._bridge.run(_sql.transaction_status, self._pool, unknown.xid,
                                          unknown.pid)
        return await self._bridge.run(_fast.statement_fate, self._pool, unknown.receipt,
                                      unknown.pid)

    # -- wake-ups ---------------------------------------------------------------------------
    async def watch(
        self, on_notice: Callable[[str], None], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_notice(payload)`` for what other servers commit in this schema: ``""``
        when a run becomes queued, ``"ended:<run id>"`` when a run ends, ``"due"`` when a
        timed wait begins, ``"revoked:<epoch>:<run id>"`` when a cancel revokes the lease
        of that epoch (this store's own commits are left out: whoever made them tells
        its actors itself).

        PostgreSQL's LISTEN/NOTIFY (triggers notify when the transaction commits), on a
        connection of its own. Runs until cancelled: start it in a nursery; it is ready once
        it listens. While the database is away it reconnects with backoff, and calls
        ``on_notice("resync")`` each time it is back: whatever was notified meanwhile is
        lost, so the caller recovers it from the store. Notifications are hints.
        """
        tries = 0
        while True:
            try:
                listener = await self._bridge.run(
                    _sql.Listener.open, self._dsn, self.schema, self._connect_timeout,
                    self._own_backend,
                )
            except _sql.NotCommitted as exc:
                delay = BACKOFF[min(tries, len(BACKOFF) - 1)]
                tries += 1
                log.warning("listening for work on %s failed (%s); again in %g s",
                            self.dsn, exc, delay)
                await trio.sleep(delay)
                continue
            try:
                if task_status is not trio.TASK_STATUS_IGNORED:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                if tries:
                    on_notice(RESYNC)  # back after an outage: what was notified is lost
                tries = 0
                while True:
                    for notice in await self._bridge.run(listener.wait):
                        on_notice(notice)
            except _sql.NotCommitted as exc:
                log.warning("listening for work on %s: connection lost (%s)", self.dsn, exc)
                tries = 1
            finally:
                self._bridge.call_soon(listener.close)  # (the loop's object)

    def _own_backend(self, pid: int) -> bool:
        return pid in self._pool.server_pids()

    async def _call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StoreUnavailable(f"the PostgreSQL store at {self.dsn} is closed")
        return await _retrying(f"{what} on the PostgreSQL store at {self.dsn}", self.retry_for,
                               attempt)


def _what(unknown: _sql.CommitUnknown) -> str:
    """The write a commit of unknown fate was, as a log line names it."""
    if unknown.xid is not None:
        return f"transaction {unknown.xid}"
    if not unknown.receipt:
        return "a one-statement write"
    run_id, event = unknown.receipt[0][0], unknown.receipt[0][2]
    return f"the one-statement write of run {run_id} ({event})"


class Opening:
    """What :meth:`PostgresStore.open` returns: await it, or use it with ``async with``."""

    def __init__(self, open: Callable[[bool], Coroutine[Any, Any, PostgresStore]]) -> None:
        self._open = open
        self._store: PostgresStore | None = None

    def __await__(self) -> Generator[Any, None, PostgresStore]:
        return self._open(False).__await__()  # the loop in a system task: close it anywhere

    async def __aenter__(self) -> PostgresStore:
        self._store = await self._open(True)  # the loop in this task, for the block
        return self._store

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._store is not None
        await self._store.aclose()


async def _retrying(what: str, retry_for: float, attempt: Callable[[], Awaitable[T]]) -> T:
    """``await attempt()``, again after a backoff while it fails with NotCommitted, for up to
    ``retry_for`` seconds; then StoreUnavailable. Other database errors are StoreUnavailable
    at once."""
    deadline = trio.current_time() + retry_for
    for tries in range(1_000_000):
        try:
            return await attempt()
        except _sql.NotCommitted as exc:
            delay = BACKOFF[min(tries, len(BACKOFF) - 1)]
            if trio.current_time() + delay > deadline:
                raise StoreUnavailable(
                    f"{what} failed: the database is unavailable ({exc}); gave up after "
                    f"{tries + 1} attempt(s) in {retry_for:g} s, and nothing of this call was "
                    "kept"
                ) from exc.cause
            log.warning("%s failed (%s); retrying in %g s", what, exc, delay)
            await trio.sleep(delay)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"{what} failed: {_sql.describe(exc)}") from exc
    raise AssertionError("unreachable")


async def _close_pool(bridge: AsyncioThread, pool: _sql.Pool) -> None:
    # Shielded so a cancelled owner still closes its connections; bounded so it cannot hang.
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT + 1.0):
        try:
            await bridge.run(_sql.close_pool, pool, CLOSE_TIMEOUT)
        except Exception as exc:  # closing is best effort: the server drops them anyway
            log.warning("closing the PostgreSQL pool failed: %s", _sql.describe(exc))
