"""Several servers on one PostgreSQL database: LISTEN/NOTIFY wakes every Dispatcher."""

from __future__ import annotations

import trio

import aiki
from aiki.sources import Sources
from aiki.store import execute
from aiki.store import ops as o
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


async def test_a_store_is_woken_by_other_servers_commits_not_by_its_own(
    postgres: TestPostgres,
) -> None:
    # Its own enqueues are poked by the session that made them: a notification on top would
    # only cost the Dispatcher one more (empty) claim.
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as mine, \
            PostgresStore.open(postgres.dsn, schema=schema) as other:
        woken: list[float] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(mine.watch, lambda: woken.append(trio.current_time()))
            for i in range(3):
                await execute(mine, o.Enqueue(f"mine-{i}", "wf", "1", "null", None, 1.0))
            await trio.sleep(1.0)  # a notification would have arrived by now
            assert woken == []
            await execute(other, o.Enqueue("theirs", "wf", "1", "null", None, 1.0))
            with trio.fail_after(30):
                while not woken:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
