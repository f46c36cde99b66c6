"""The PostgreSQL store: asyncpg on an asyncio loop in a thread, driven from Trio.

It behaves exactly like :class:`~aiki.store.memory.MemoryStore` (the conformance suite holds
it to that): same outcomes, same records, same history events. What it adds is sharing: any
number of servers may use one database at once.

Install it with ``pip install 'aiki[postgres]'``; it needs PostgreSQL 14 or newer.

How it is built
    ``aiki.asyncio_bridge.AsyncioThread``: an asyncio event loop (uvloop's when installed)
    in a thread of its own, opened once per store for its whole life. ``_sql``: the asyncio
    side, one coroutine per store call with the whole transaction inside, so a call crosses
    from Trio to the loop's thread once; nothing there touches Trio. ``_schema``: numbered
    migrations, applied at open under a transaction-scoped advisory lock so concurrent
    starts apply each exactly once. ``_fast``: a batch of one run this store claimed or
    wrote last, in one autocommitted statement (below).
    ``_store``: :class:`PostgresStore`, the Trio side.

Concurrency between servers
    Every write to a run locks its row first, so fencing (the lease epoch check) and the
    write are atomic; claims, lease expiry and wake-ups use ``FOR UPDATE SKIP LOCKED``, so two
    servers never lease one run at once and never wait on each other's rows. Idempotent
    enqueue is ``INSERT ... ON CONFLICT DO NOTHING`` on a unique index, then a select.
    Transactions run at READ COMMITTED.

One statement for a run this store knows as it is
    One at a time, each batch after a run's claim is ops of that one run (a task start with
    the previous outcome; the last outcome with the run's end). The store keeps what it
    claimed or last wrote of such a run, with the row's version (``xmin``); the state
    machine decides on that, and the writes go in one autocommitted statement that locks
    the row only if its version is unchanged, and writes nothing otherwise (then the batch
    goes the locked way; so it does if another transaction holds the row). Every write of a
    run's steps also writes the run's row, so the version changes with anything a decision
    reads. One round trip where a transaction
    takes four: a run of three tasks one at a time takes 9 statements, not 20.

Wake-ups between servers
    A trigger (migration 2) notifies channel ``aiki_work:<schema>`` whenever a run becomes
    queued (enqueued, released, lease expired, woken), delivered when the transaction
    commits. :meth:`PostgresStore.watch` LISTENs on a connection of its own and calls a
    callback (a Dispatcher's ``poke``), so another server's enqueue is claimed at once,
    with polling left as the slow fallback.

When the database goes away
    A call that fails because the database cannot be reached (refused, reset, shutting down,
    restarting) is retried with backoff (50 ms growing to 1 s) for ``retry_for`` seconds (15
    by default) whenever retrying is safe, and then raises
    :class:`~aiki.errors.StoreUnavailable` naming the cause. Reads are always safe to retry;
    a batch is safe to retry when nothing of it was kept:

    - the connection failed before COMMIT was sent: PostgreSQL rolls the transaction back;
    - PostgreSQL rolled it back itself (deadlock, serialization failure, cancelled query);
    - the connection failed *after* COMMIT was sent, so the outcome is unknown: the store
      does not guess. Every batch that writes reads its transaction id before committing;
      on a new connection it asks ``pg_xact_status`` what became of it. ``committed``: the
      batch's outcomes (computed inside the transaction) are returned as if nothing had
      happened. ``aborted``: the batch is run again. ``in progress`` (the old server process
      has not noticed its client is gone): that process is terminated and waited for
      (``pg_terminate_backend(pid, 5000)``), and the status read again. If the database
      does not come back within ``retry_for`` to answer, or the status is still not final,
      ``StoreUnavailable`` says the batch may or may not have been applied. A batch written
      in one autocommitted statement has no transaction id to read in time: its first
      history event is looked up instead, after the old server process is terminated and
      waited for.

    This relies on the commit being durable where it is read back: with synchronous
    replication and a failover to a standby that had not received the commit, ``aborted``
    is the standby's truth. A batch whose Trio caller is cancelled while its COMMIT is in
    flight may or may not be kept, like any crash at that instant; the engine is built for
    that (leases, fencing, idempotent writes).

Cancellation
    A Trio cancel in the middle of a call cancels the asyncio task; the connection it was
    using is terminated (the server rolls back) rather than given back to the pool, and the
    pool opens a new one when needed. The call returns ``trio.Cancelled`` only after that
    cleanup, so the pool is always left healthy. An autocommitted statement never waits for
    a row's lock (it takes the row ``SKIP LOCKED`` and writes nothing if it is held): one
    left waiting when its client went away would commit once the lock came free, its
    server process not noticing the client had left.
"""

from __future__ import annotations

from aiki.store.postgres._store import Opening, PostgresStore

__all__ = ["Opening", "PostgresStore"]
