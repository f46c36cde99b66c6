"""Several servers on one PostgreSQL database: LISTEN/NOTIFY wakes every Dispatcher."""

from __future__ import annotations

import pytest
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
            await nursery.start(mine.watch, lambda notice: woken.append(trio.current_time()))
            for i in range(3):
                await execute(mine, o.Enqueue(f"mine-{i}", "wf", "1", "null", None, 1.0))
            await trio.sleep(1.0)  # a notification would have arrived by now
            assert woken == []
            await execute(other, o.Enqueue("theirs", "wf", "1", "null", None, 1.0))
            with trio.fail_after(30):
                while not woken:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


approval = aiki.event("approval", str)
pauses: list[float] = []


@aiki.workflow(name="approve-later", version="1", events=[approval])
async def approve_later(run: aiki.WorkflowRun, x: int) -> str:
    slept = await run.sleep(1.5)  # over the worker's inline limit: the run waits
    decision = await approval.wait(run)
    return f"{x} {slept} {decision}"


async def test_a_client_a_worker_and_a_sender_each_on_another_server(
    postgres: TestPostgres,
) -> None:
    """Three servers on one database: the client enqueues and waits through A, the only
    worker is on B, the event is sent through C. The wake-up, the delivered event and the
    run's end each reach the server that has to act, by notification."""
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store_a, \
            PostgresStore.open(postgres.dsn, schema=schema) as store_b, \
            PostgresStore.open(postgres.dsn, schema=schema) as store_c:
        # Polls every 1000 s: within the bounds below only notifications can do it.
        async with aiki.embedded(store_a, poll_interval=1000.0, sources=Sources.real()) as a, \
                aiki.embedded(store_b, poll_interval=1000.0, sources=Sources.real()) as b, \
                aiki.embedded(store_c, poll_interval=1000.0, sources=Sources.real()) as c:
            async with aiki.worker(b, workflows=[approve_later], inline_retry_max=0.5):
                handle = await approve_later.enqueue(a, 7)
                with trio.fail_after(30):
                    while not any(e.event == "event.waiting" for e in await handle.history()):
                        await trio.sleep(0.1)
                assert await c.handle(handle.id).send(approval, "yes") is True
                with trio.fail_after(30):
                    assert await handle.wait_for_completion() == "7 True yes"
            history = await handle.history()
    assert [e.event for e in history].count("run.waiting") == 2  # the sleep, then the event
    woke = [e for e in history if e.event == "sleep.completed"]
    assert len(woke) == 1 and woke[0].detail == "slept"


hanging: list[str] = []


@aiki.task(name="hang")
async def hang(x: int) -> int:
    hanging.append("started")
    try:
        await trio.sleep(1000)
    except trio.Cancelled:
        hanging.append("cancelled")
        raise
    return x


@aiki.workflow(name="hangs", version="1")
async def hangs(run: aiki.WorkflowRun, x: int) -> int:
    return await hang.run(run, x)


async def test_a_cancel_through_one_server_reaches_the_worker_on_another_at_once(
    postgres: TestPostgres,
) -> None:
    """The worker is on A and heartbeats every 1000 s; the cancel goes through B. Only the
    relayed revoke (B's commit notifies 'revoked:<epoch>:<id>', A pushes it to its worker)
    stops the task in flight within the bound, and frees the worker's one slot for the run's
    compensation, so the run ends cancelled."""
    hanging.clear()
    schema = postgres.fresh_schema()
    async with PostgresStore.open(postgres.dsn, schema=schema) as store_a, \
            PostgresStore.open(postgres.dsn, schema=schema) as store_b:
        async with aiki.embedded(store_a, poll_interval=1000.0, lease_ttl=3000.0,
                                 sources=Sources.real()) as a, \
                aiki.embedded(store_b, poll_interval=1000.0, lease_ttl=3000.0,
                              sources=Sources.real()) as b:
            async with aiki.worker(a, workflows=[hangs], max_concurrent_runs=1):
                handle = await hangs.enqueue(a, 7)
                with trio.fail_after(30):
                    while hanging != ["started"]:
                        await trio.sleep(0.05)
                assert await b.handle(handle.id).cancel("not needed", grace=30) is True
                with trio.fail_after(30):
                    while "cancelled" not in hanging:
                        await trio.sleep(0.05)
                with trio.fail_after(30), pytest.raises(aiki.WorkflowCancelled):
                    await handle.wait_for_completion()
            history = await handle.history()
    assert hanging == ["started", "cancelled"]
    assert [e.event for e in history][-1] == "run.cancelled"
