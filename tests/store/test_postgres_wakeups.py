"""Several servers on one PostgreSQL database: LISTEN/NOTIFY wakes every Dispatcher."""

from __future__ import annotations

import trio

import aiki
from aiki.sources import Sources
from aiki.store.postgres import PostgresStore
from tests.conftest import TestPostgres


@aiki.workflow(name="woken", version="1")
async def woken(run: aiki.WorkflowRun, x: int) -> int:
    return x + 1


async def test_a_run_enqueued_on_one_server_wakes_the_dispatcher_of_another(
    postgres: TestPostgres,
) -> None:
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store_a, \
            PostgresStore.open(postgres.dsn, schema=schema) as store_b:
        # Server B polls every 1000 s and its worker heartbeats every 1000 s (lease / 3):
        # within the 60 s bound below only a notification can wake its Dispatcher.
        async with aiki.embedded(store_a, sources=Sources.real()) as client_a, \
                aiki.embedded(store_b, poll_interval=1000.0, lease_ttl=3000.0,
                              sources=Sources.real()) as client_b:
            async with aiki.worker(client_b, workflows=[woken], id="on-b"):
                await trio.sleep(0.5)  # let B's first (startup) claim pass: it finds nothing
                handle = await woken.enqueue(client_a, 41)  # enqueued through server A
                with trio.fail_after(60):
                    assert await client_b.handle(handle.id).wait_for_completion() == 42
            history = await client_b.handle(handle.id).history()
    assert [e.worker_id for e in history if e.event == "run.running"] == ["on-b"]
