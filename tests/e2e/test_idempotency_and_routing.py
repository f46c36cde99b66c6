"""Idempotency keys for runs and tasks, version routing, and bad input at the front door."""

from __future__ import annotations

from collections import Counter

import attrs
import pytest
import trio

import aiki
from aiki.store import Store

charged: Counter[str] = Counter()


@aiki.task(name="charge")
async def charge(amount: int) -> str:
    charged["charge"] += 1
    return f"charged {amount}"


@aiki.workflow(name="pay", version="1")
async def pay(run: aiki.WorkflowRun, amount: int) -> list[str]:
    first = await charge.run(run, amount, idempotency_key="payment-1")
    again = await charge.run(run, amount + 1, idempotency_key="payment-1")  # deduped
    other = await charge.run(run, amount, idempotency_key="payment-2")
    return [first, again, other]


async def test_fifty_concurrent_enqueues_with_one_key_give_one_run(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    handles: list[aiki.RunHandle[list[str]]] = []
    async with aiki.embedded(engine_store, sources=sources) as client:

        async def enqueue() -> None:
            handles.append(await pay.enqueue(client, 10, idempotency_key="order-7"))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(enqueue)
        runs = await engine_store.list_runs(workflow="pay")
    assert len({h.id for h in handles}) == 1
    assert len(runs) == 1
    assert sum(h.created for h in handles) == 1


async def test_a_task_key_used_twice_in_a_run_returns_the_recorded_result(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    charged.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[pay]):
            handle = await pay.enqueue(client, 10)
            result = await handle.wait_for_completion(timeout=10)
            status = await handle.status()
    assert result == ["charged 10", "charged 10", "charged 10"]
    assert charged["charge"] == 2
    assert len(status.tasks) == 2


@aiki.workflow(name="greet", version="1")
async def greet_v1(run: aiki.WorkflowRun, who: str) -> str:
    return f"hello {who} from v1"


@aiki.workflow(name="greet", version="2")
async def greet_v2(run: aiki.WorkflowRun, who: str) -> str:
    return f"hello {who} from v2"


async def test_runs_are_pinned_to_their_version_and_wait_for_a_worker_that_has_it(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[greet_v1], id="old"):
            h1 = await greet_v1.enqueue(client, "ann")
            h2 = await greet_v2.enqueue(client, "bob")
            assert await h1.wait_for_completion(timeout=10) == "hello ann from v1"
            await trio.sleep(300)
            status = await h2.status()
            assert (status.state, status.attempts) == ("queued", 0)  # visible, not failed
            async with aiki.worker(client, workflows=[greet_v2], id="new"):
                assert await h2.wait_for_completion(timeout=10) == "hello bob from v2"
            history = await h2.history()
    assert [e.worker_id for e in history if e.event == "run.running"] == ["new"]


async def test_enqueue_by_name_picks_the_newest_registered_version(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[greet_v1, greet_v2]):
            handle = await client.enqueue("greet", "cy")
            assert await handle.wait_for_completion(timeout=10) == "hello cy from v2"


async def test_an_unknown_workflow_name_is_a_clear_error(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[greet_v1]):
            with pytest.raises(aiki.UnknownWorkflow, match=r"'no-such-flow'.*registered: greet"):
                await client.enqueue("no-such-flow", {})
        assert await engine_store.list_runs() == ()


class Opaque:
    pass


@attrs.frozen
class Box:
    label: str


@aiki.workflow(name="boxed", version="1")
async def boxed(run: aiki.WorkflowRun, box: Box) -> str:
    return box.label


async def test_an_unencodable_payload_raises_type_error_at_the_call_site_and_stores_nothing(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        with pytest.raises(TypeError, match="payload of workflow 'boxed'"):
            await boxed.enqueue(client, Opaque())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="payload of workflow 'raw'"):
            await client.enqueue("raw", {"when": {1, 2}}, version="1")
        assert await engine_store.list_runs() == ()


async def test_an_unknown_run_id_is_a_clear_error(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        with pytest.raises(aiki.RunNotFound, match="no-such-run"):
            await client.handle("no-such-run").status()


@aiki.task(name="bad-result")
async def bad_result(x: int) -> int:
    return Opaque()  # type: ignore[return-value]


@aiki.workflow(name="returns-garbage", version="1")
async def returns_garbage(run: aiki.WorkflowRun, x: int) -> int:
    return await bad_result.run(run, x)


async def test_a_task_result_that_cannot_be_encoded_fails_the_task_without_retrying(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[returns_garbage]):
            handle = await returns_garbage.enqueue(client, 1)
            with pytest.raises(aiki.WorkflowFailed) as failed:
                await handle.wait_for_completion(timeout=10)
    assert failed.value.error_type == "PayloadError"
    assert "result of task 'bad-result'" in failed.value.message


def test_definitions_refuse_the_wrong_shape() -> None:
    # A plain function is a task run in a thread (tests/sdk/test_task_styles.py), but not
    # an asyncio one.
    assert aiki.task(name="sync")(lambda x: x).style == "thread"
    with pytest.raises(TypeError, match="async def"):
        aiki.task(name="sync", loop="asyncio")(lambda x: x)

    async def two(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match=r"must take \(payload\)"):
        aiki.task(name="two")(two)  # type: ignore[arg-type]


async def test_a_key_reused_with_another_payload_is_a_conflict(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        first = await pay.enqueue(client, 10, idempotency_key="order-9")
        same = await pay.enqueue(client, 10, idempotency_key="order-9")
        assert (same.id, same.created) == (first.id, False)
        with pytest.raises(aiki.IdempotencyConflict, match="names run"):
            await pay.enqueue(client, 11, idempotency_key="order-9")
        kept = await pay.enqueue(client, 11, idempotency_key="order-9",
                                 on_conflict="return_existing")
        assert (kept.id, kept.created) == (first.id, False)
        with pytest.raises(ValueError, match="on_conflict must be"):
            await pay.enqueue(client, 11, idempotency_key="order-9", on_conflict="merge")
        assert len(await engine_store.list_runs()) == 1
