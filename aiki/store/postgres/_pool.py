"""A small connection pool for the asyncio side, built for one checkout per store call.

Why not ``asyncpg.Pool``: under trio-asyncio every asyncio loop iteration is a round of Trio
scheduling, and asyncpg's acquire/release (a queue, a shielded release task, a reset query or
at least its bookkeeping) takes several; measured here it cost about 165 µs per call, more
than half a query's round trip. This pool checks a connection out and in without suspending
when one is idle, and does only what the store needs:

- at most ``max_size`` connections; callers beyond that wait their turn (FIFO);
- a connection comes back healthy (``release``) or is terminated (``discard``): the store
  discards any connection whose work was interrupted, so no half-finished transaction or
  unknown protocol state is ever handed to the next caller;
- an idle connection that PostgreSQL closed meanwhile (a restart) is dropped at checkout,
  and a new one is opened instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    Connection = asyncpg.Connection


class PoolClosed(Exception):
    """The pool was closed."""


class ConnectionPool:
    def __init__(self, connect: Callable[[], Awaitable[Connection]], max_size: int) -> None:
        self._connect = connect
        self._slots = asyncio.Semaphore(max_size)
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closed = False

    @property
    def size(self) -> int:
        """Open connections, idle or checked out."""
        return len(self._idle) + len(self._busy)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def server_pids(self) -> set[int]:
        """The server process ids of the open connections (no two live backends share one)."""
        return {conn.get_server_pid() for conn in [*self._idle, *self._busy]}

    async def acquire(self) -> Connection:
        if self._closed:
            raise PoolClosed("the connection pool is closed")
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    break
            else:
                conn = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self._busy.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """Give back a connection that finished its work (no transaction left open)."""
        self._busy.discard(conn)
        if self._closed or conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
        else:
            self._idle.append(conn)
        self._slots.release()

    def discard(self, conn: Connection) -> None:
        """Give back a connection whose state is unknown: it is closed at once."""
        self._busy.discard(conn)
        conn.terminate()
        self._slots.release()

    async def close(self, timeout: float) -> None:
        """Close idle connections politely (within ``timeout``) and checked-out ones at once."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in list(self._busy):
            conn.terminate()
        if idle:
            closing = asyncio.gather(*(conn.close(timeout=timeout) for conn in idle),
                                     return_exceptions=True)
            try:
                await asyncio.wait_for(closing, timeout)
            finally:
                for conn in idle:
                    conn.terminate()

    def terminate(self) -> None:
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn.terminate()
        self._idle.clear()


def connector(dsn: str, **kwargs: Any) -> Callable[[], Awaitable[Connection]]:
    async def connect() -> Connection:
        conn: Connection = await asyncpg.connect(dsn, **kwargs)
        return conn

    return connect
