"""Durable sleeps and events end to end, on every store, in virtual time."""

from __future__ import annotations

import datetime

import attrs
import pytest
import trio

import aiki
from aiki.store import Store

calls: list[tuple[str, float]] = []


@aiki.task(name="note")
async def note(what: str) -> str:
    calls.append((what, trio.current_time()))
    return what


@aiki.workflow(name="napper", version="1")
async def napper(run: aiki.WorkflowRun, seconds: float) -> list[bool]:
    await note.run(run, "before")
    slept = await run.sleep(seconds)
    await note.run(run, "after")
    return [slept, await run.sleep(datetime.timedelta(seconds=0))]


async def test_a_long_sleep_frees_the_slot_and_wakes_on_time(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    calls.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[napper]) as worker:
            handle = await napper.enqueue(client, 3600.0)
            with trio.fail_after(60):
                while (await handle.status()).state != "waiting":
                    await trio.sleep(0.5)
            assert not worker.held  # the slot is free while it sleeps
            status = await handle.status()
            [wait] = status.waits
            assert (wait.kind, wait.position) == ("sleep", "1")
            assert wait.due_at is not None and wait.since is not None
            assert wait.due_at - wait.since == pytest.approx(3600.0, abs=0.1)
            assert await handle.wait_for_completion(timeout=7200) == [True, True]
            events = [e.event for e in await handle.history()]
    (_, before), (_, after) = calls
    assert after - before == pytest.approx(3600.0, abs=0.5)  # on time, not a poll late
    assert "sleep.waiting" in events and "sleep.completed" in events
    assert "run.waiting" in events


async def test_a_short_sleep_is_held_inline_and_wakeup_ends_it_early(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    calls.clear()
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[napper]) as worker:
            handle = await napper.enqueue(client, 5.0)
            with trio.fail_after(3):
                while not calls:
                    await trio.sleep(0.1)
            await trio.sleep(1.0)
            assert worker.held  # under the inline limit: the worker holds it
            assert (await handle.status()).state == "running"
            [wait] = (await handle.status()).waits
            assert wait.kind == "sleep"
            assert await handle.wakeup() is True  # pushed to the worker at once
            assert await handle.wait_for_completion(timeout=3) == [False, True]
            assert await handle.wakeup() is False  # not sleeping: nothing changes
    (_, before), (_, after) = calls
    assert after - before < 2.0


async def test_wakeup_of_a_waiting_run_queues_it(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[napper]):
            handle = await napper.enqueue(client, 86400.0 * 30)
            with trio.fail_after(60):
                while (await handle.status()).state != "waiting":
                    await trio.sleep(0.5)
            assert await handle.wakeup() is True
            with trio.fail_after(5):
                assert await handle.wait_for_completion() == [False, True]


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", str(86400 * 366 * 11)])
async def test_a_bad_duration_raises_at_the_call_and_records_nothing(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources, bad: str,
) -> None:
    @aiki.workflow(name="bad-sleep", version="1")
    async def bad_sleep(run: aiki.WorkflowRun, seconds: str) -> str:
        try:
            await run.sleep(float(seconds))
        except ValueError as exc:
            return f"refused: {exc}"
        return "slept"

    async with aiki.embedded("memory", sources=sources) as client:
        async with aiki.worker(client, workflows=[bad_sleep]):
            handle = await bad_sleep.enqueue(client, bad)
            result = await handle.wait_for_completion(timeout=10)
            assert (await handle.status()).waits == ()
            history = await handle.history()
    assert result.startswith("refused: run.sleep(): the duration must")
    assert not [e for e in history if e.event.startswith("sleep.")]


# -- events ------------------------------------------------------------------------------------
@attrs.frozen
class Approval:
    approved: bool
    by: str


approval = aiki.event("approval", Approval)
nudge_event = aiki.event("nudge", int)


@aiki.workflow(name="expense", version="1", events=[approval, nudge_event])
async def expense(run: aiki.WorkflowRun, amount: int) -> list[str]:
    seen = []
    for _ in range(2):
        try:
            decision = await approval.wait(run, timeout=datetime.timedelta(hours=1))
        except aiki.EventTimeout:
            seen.append("timed out")
        else:
            seen.append(f"{decision.approved} by {decision.by}")
    return seen


async def wait_state(handle: aiki.RunHandle[object], state: str) -> None:
    with trio.fail_after(60):
        while (await handle.status()).state != state:
            await trio.sleep(0.5)


async def test_sends_are_buffered_delivered_in_order_and_keys_deduplicate(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[expense]):
            handle = await expense.enqueue(client, 10)
            assert await handle.send(approval, Approval(True, "ann"), idempotency_key="m1") \
                in (True, False)
            await handle.send(approval, Approval(False, "bob"), idempotency_key="m1")  # dup
            await handle.send(approval, Approval(False, "cy"))
            assert await handle.wait_for_completion(timeout=60) == ["True by ann",
                                                                     "False by cy"]
    stored = [e for e in await engine_store.get_events(handle.id)]
    keys = [e.idempotency_key for e in stored]
    assert keys[0] == "m1" and keys[1] is not None and keys[1].startswith("send:")


async def test_a_send_wakes_a_waiting_run_by_push_and_a_timeout_passes_to_the_next(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[expense]) as worker:
            handle = await expense.enqueue(client, 10)
            await wait_state(handle, "waiting")
            assert not worker.held
            [wait] = (await handle.status()).waits
            assert (wait.kind, wait.name) == ("event", "approval")
            await trio.sleep(3600)  # the first wait times out
            # (Due now, not yet ended by the Timer, maybe: the run still "waiting" on it, and
            # a send would find it past its timeout. Its end recorded, and the next wait.)
            with trio.fail_after(60):
                while "event.timed_out" not in [e.event for e in await handle.history()]:
                    await trio.sleep(0.5)
            await wait_state(handle, "waiting")
            start = trio.current_time()
            assert await handle.send(approval, Approval(True, "dee")) is True
            assert await handle.wait_for_completion(timeout=60) == ["timed out", "True by dee"]
            assert trio.current_time() - start < 0.5  # pushed, not polled
            history = [e.event for e in await handle.history()]
    assert history.count("event.timed_out") == 1 and history.count("event.received") == 1


async def test_bad_sends_are_refused_with_nothing_stored(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[expense, napper]):
            handle = await expense.enqueue(client, 10)
            with pytest.raises(aiki.UnknownEvent, match="does not declare event 'nope'"):
                await handle.send("nope", 1)
            with pytest.raises(aiki.PayloadError, match="expected Approval"):
                await handle.send(approval, "yes")
            with pytest.raises(TypeError, match="cannot encode"):
                await handle.send("approval", object())
            with pytest.raises(aiki.RunNotFound):
                await client.handle("ghost").send(approval, Approval(True, "x"))
            assert await engine_store.get_events(handle.id) == ()
            done = await expense.enqueue(client, 20)
            for by in ("a", "b"):
                await done.send(approval, Approval(True, by))
            await done.wait_for_completion(timeout=60)
            with pytest.raises(aiki.RunFinished, match="completed"):
                await done.send("approval", {"approved": True, "by": "x"})
            assert len(await engine_store.get_events(done.id)) == 2  # the two before it


# -- replay ------------------------------------------------------------------------------------
variant = {"v": "sleep 5"}


@aiki.workflow(name="changing-sleep", version="1")
async def changing_sleep(run: aiki.WorkflowRun, x: int) -> str:
    await note.run(run, "start")
    if variant["v"] == "task":
        await note.run(run, "instead")
    else:
        await run.sleep(float(variant["v"].split()[1]))
    await note.run(run, "end")
    return variant["v"]


async def crash_mid_sleep_then_replay(engine_store: Store, sources: aiki.Sources,
                                      new: str) -> tuple[aiki.RunHandle[str], float]:
    """A worker holds a 5 s sleep inline and dies 2 s into it; the code changes to ``new``;
    another worker replays the run once the lease expires."""
    calls.clear()
    variant["v"] = "sleep 5"
    async with aiki.embedded(engine_store, lease_ttl=1.5, sources=sources) as client:
        handle = await changing_sleep.enqueue(client, 1)
        with trio.CancelScope() as crash:
            async with aiki.worker(client, workflows=[changing_sleep], id="first"):
                with trio.fail_after(5):
                    while not calls:
                        await trio.sleep(0.1)
                await trio.sleep(2.0)
                crash.cancel()
        variant["v"] = new
        async with aiki.worker(client, workflows=[changing_sleep], id="second"):
            with trio.move_on_after(60), pytest.raises(aiki.WorkflowFailed) if new == "task" \
                    else _nothing():
                await handle.wait_for_completion()
            history = await handle.history()
    started = next(e.at for e in history if e.event == "sleep.waiting")
    return handle, started


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(("new", "slept"), [("sleep 9", 9.0), ("sleep 1", None)])
async def test_a_replayed_sleep_counts_from_when_it_began(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources, new: str,
    slept: float | None,
) -> None:
    await crash_mid_sleep_then_replay(engine_store, sources, new)
    (_, start), (_, end) = calls[0], calls[-1]
    assert calls[-1][0] == "end"
    if slept is not None:  # longer now: it sleeps only the difference
        assert end - start == pytest.approx(slept, abs=0.2)
    else:  # shorter: over already, so it ends once the run is replayed (the lease expired
        # about 3.5 s in), not at the 5 s the history recorded
        assert end - start < 4.5


async def test_a_sleep_where_history_has_a_task_is_non_determinism(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    handle, _ = await crash_mid_sleep_then_replay(engine_store, sources, "task")
    async with aiki.embedded(engine_store, sources=sources) as client:
        status = await client.handle(handle.id).status()
    assert status.state == "failed" and status.error_type == "NonDeterminismError"
    assert status.error_message is not None
    assert "the history has run.sleep()" in status.error_message
    assert "the code now calls task 'note'" in status.error_message


async def test_an_unkeyed_send_sent_twice_stores_one_event(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    from aiki.client import core
    from aiki.store import MemoryStore

    store = MemoryStore()
    async with aiki.embedded(store, sources=sources) as client:
        handle = await expense.enqueue(client, 1)
        call = core.send_event(handle.id, approval, Approval(True, "x"), None, "fixed-id")
        await client.call(call)
        await client.call(call)  # the same request again: a resend after a lost reply
        await handle.send(approval, Approval(True, "y"))  # another call: another event
        sent = await store.get_events(handle.id)
    assert [e.payload for e in sent] == ['{"approved":true,"by":"x"}',
                                         '{"approved":true,"by":"y"}']
