"""``aiki.embedded()`` and ``aiki.worker()``: the engine inside your own ``trio.run``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from aiki.actors.run import DEFAULT_RECORD_START_AFTER
from aiki.actors.scopes import serving_nursery
from aiki.actors.worker import Worker
from aiki.sdk.client import Client
from aiki.sdk.definitions import Workflow
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import open_store
from aiki.store.base import Store
from aiki.task_styles import DEFAULT_TASK_THREADS
from aiki.transport.memory import MemoryTransport

DEFAULT_STORE = "sqlite:///aiki.db"


@asynccontextmanager
async def embedded(
    store: str | Store = DEFAULT_STORE, *, lease_ttl: float = 30.0,
    poll_interval: float | None = None, retention: float | None = None,
    sources: Sources | None = None, check_wire: bool | None = None,
) -> AsyncIterator[Client]:
    """Run an Aiki server inside this nursery and yield a client of it.

    ``store``: ``"sqlite:///path.db"`` (the default, ``./aiki.db``), ``"memory"``, or a
    Store object. ``retention``: seconds a finished run is kept before it is deleted (None:
    for ever). The server's actors talk to workers and clients over the memory transport,
    which hands messages over as objects; ``check_wire=True`` (default: the
    ``AIKI_CHECK_WIRE`` environment variable) sends each through the network's codec too, as
    ``aiki.testing`` does.
    """
    sources = sources or Sources.real()
    owned = isinstance(store, str)
    opened: Store = await open_store(store) if isinstance(store, str) else store
    try:
        transport = (MemoryTransport() if check_wire is None
                     else MemoryTransport(check_wire=check_wire))
        server = Server(opened, sources, lease_ttl=lease_ttl, poll_interval=poll_interval,
                        retention=retention)
        async with serving_nursery() as nursery:
            address = await nursery.start(server.serve, transport, "embedded")
            async with Client.open(transport, address, sources) as client:
                yield client
    finally:
        if owned:
            with trio.CancelScope(shield=True):
                await opened.aclose()


@asynccontextmanager
async def worker(
    client: Client, *, workflows: Sequence[Workflow[Any, Any]], id: str | None = None,
    max_concurrent_runs: int = 10, inline_retry_max: float = 10.0,
    record_start_after: float = DEFAULT_RECORD_START_AFTER,
    task_threads: int = DEFAULT_TASK_THREADS,
) -> AsyncIterator[Worker]:
    """Run a worker for ``workflows`` while the block runs. ``task_threads``: how many
    plain-``def`` tasks may run at once, each in a worker thread.

    Leaving the block normally releases the runs it still holds. Cancelling it behaves like
    a crash: its runs move to another worker once their leases expire.
    """
    for wf in workflows:
        if not isinstance(wf, Workflow):
            raise TypeError(f"workflows must be @aiki.workflow definitions, got {wf!r}")
    w = Worker(
        client.transport, client.address, list(workflows),
        id or f"worker-{client.sources.short_id()}", client.sources,
        max_concurrent_runs=max_concurrent_runs, inline_retry_max=inline_retry_max,
        record_start_after=record_start_after,
        token=client.token, task_threads=task_threads, client=client,
    )
    async with serving_nursery() as nursery:
        await nursery.start(w.run)
        yield w  # an exception here is a crash: nothing more is said to the server
        # A block whose scope was cancelled ends "normally" without a checkpoint; that is
        # still a crash, not a graceful stop.
        await trio.lowlevel.checkpoint_if_cancelled()
        await w.release_all()
