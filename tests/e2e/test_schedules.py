"""Schedules end to end, on every store, in virtual time: the Timer fires them on time and
without polling, by their overlap policy, and catches up after a restart within the window."""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio

import aiki
from aiki.store import MemoryStore, SqliteStore, Store

MINUTE = datetime.timedelta(minutes=1)


@aiki.task(name="build-report")
async def build_report(kind: str) -> str:
    return f"{kind} report"


@aiki.workflow(name="report", version="1")
async def report(run: aiki.WorkflowRun, req: dict[str, Any]) -> str:
    if req.get("takes"):
        await run.sleep(req["takes"])  # long: the worker's slot is given back meanwhile
    return await build_report.run(run, req["kind"])


async def until(predicate: Any, timeout: float = 3600.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(1.0)


async def test_a_schedule_fires_every_minute_on_time_and_describes_its_last_runs(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "sales"}, id="minutely",
                                          every=MINUTE)
            assert sched.created
            first = (await sched.describe()).next_fire_times[0]
            await trio.sleep(first - sources.clock.now() + 5 * 60 + 1)
            described = await sched.describe()
            [listed] = await client.list_schedules()
    assert (listed.id, listed.workflow, listed.version) == ("minutely", "report", "1")
    assert described.spec == "every 1m" and not described.paused
    assert described.overlap == "skip" and described.catchup_window == 60.0
    fired = [o for o in described.recent if o.outcome == "fired"]
    assert [o.occurrence for o in reversed(fired)] == [first + 60 * k for k in range(6)]
    assert all(o.run_state == "completed" and o.reason == "scheduled" for o in fired)
    assert all(abs(o.at - o.occurrence) < 1.0 for o in fired)  # on time
    assert described.next_fire_times == tuple(first + 60 * k for k in range(6, 11))


async def test_the_timer_wakes_for_the_next_occurrence_and_does_not_poll(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    store = CountingStore(MemoryStore())
    async with aiki.embedded(store, sources=sources) as client:  # type: ignore[arg-type]
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "x"}, id="hourly", every=3600)
            first = (await sched.describe()).next_fire_times[0]
            await trio.sleep(first - sources.clock.now() + 3600 + 10)
            before = dict(store.calls)
            await trio.sleep(3000)  # idle between two occurrences
            idle = {k: store.calls[k] - before.get(k, 0) for k in store.calls}
            runs = await client.list_runs(workflow="report")
    assert len(runs) == 2
    assert idle.get("next_due", 0) <= 1 and idle.get("list_schedules", 0) == 0
    assert idle.get("apply", 0) <= 4  # (heartbeats of the idle worker renew nothing)


class CountingStore:
    """A store that counts its calls by name."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


def spans(runs: list[aiki.RunStatus]) -> list[tuple[float, float]]:
    return sorted((r.created_at, r.finished_at or float("inf")) for r in runs)


async def statuses(client: aiki.Client) -> list[aiki.RunStatus]:
    return [await client.handle(r.id).status()
            for r in await client.list_runs(workflow="report", limit=1000)]


async def test_skip_never_lets_two_runs_of_a_schedule_overlap(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "slow", "takes": 150},
                                          id="slow", every=MINUTE, overlap="skip")
            await trio.sleep(10 * 60)
            runs = await statuses(client)
            described = await sched.describe(firings=100)
    intervals = spans(runs)
    assert len(intervals) >= 3
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert end <= start  # the next began after the previous ended
    skipped = [o for o in described.recent if o.outcome == "skipped"]
    assert skipped and all("is unfinished (overlap 'skip')" in (o.detail or "")
                           for o in skipped)


async def test_buffer_one_starts_the_waiting_occurrence_as_the_previous_run_ends(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "slow", "takes": 100},
                                          id="buffered", every=MINUTE, overlap="buffer_one")
            await trio.sleep(8 * 60)
            runs = [r for r in await statuses(client) if r.state == "completed"]
            described = await sched.describe(firings=100)
    intervals = spans(runs)
    assert len(intervals) >= 3
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert 0 <= start - end < 1.0  # each one starts as the one before it ends
    reasons = {o.reason for o in described.recent if o.outcome == "fired"}
    assert "buffered" in reasons


async def test_allow_runs_occurrences_alongside(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            await report.schedule(client, {"kind": "slow", "takes": 150}, id="many",
                                  every=MINUTE, overlap="allow")
            await trio.sleep(5 * 60 + 1)
            runs = await statuses(client)
    intervals = spans(runs)
    assert len(intervals) == 5  # (the occurrences at +40 s ... +280 s)
    assert any(end > start for (_, end), (start, _) in zip(intervals, intervals[1:],
                                                            strict=False))


async def test_cancel_previous_cancels_the_unfinished_run_and_starts_the_next(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "slow", "takes": 150},
                                          id="latest", every=MINUTE,
                                          overlap="cancel_previous")
            await trio.sleep(5 * 60 + 1)
            runs = await statuses(client)
            described = await sched.describe(firings=100)
    runs.sort(key=lambda r: r.created_at)
    assert len(runs) == 5
    # Each run but the newest was cancelled as the next one started (in that transaction;
    # it then ended as soon as its workflow saw RunCancelled).
    for before, after in zip(runs, runs[1:], strict=False):
        assert before.state == "cancelled" and before.finished_at is not None
        assert 0 <= before.finished_at - after.created_at < 1.0
        assert before.cancel_reason is not None and "cancel_previous" in before.cancel_reason
    assert runs[-1].state == "waiting"  # its sleep: nothing replaced it yet
    replaced = [o for o in described.recent if o.outcome == "fired"
                and "is cancelled (overlap 'cancel_previous')" in (o.detail or "")]
    assert len(replaced) == 4


stopped: list[float] = []


@aiki.task(name="hold-on")
async def hold_on(kind: str) -> str:
    try:
        await trio.sleep(100_000)
    except trio.Cancelled:
        stopped.append(trio.current_time())
        raise
    return kind


@aiki.workflow(name="holds", version="1")
async def holds(run: aiki.WorkflowRun, kind: str) -> str:
    return await hold_on.run(run, kind)


async def test_cancel_previous_tells_the_worker_holding_the_previous_run_at_once(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    stopped.clear()
    async with aiki.embedded(engine_store, sources=sources, lease_ttl=3000.0) as client:
        # Heartbeats every 1000 s, one slot: only the push stops the task in flight in time
        # (a newer lease of the run assigned to the worker would stop it too).
        async with aiki.worker(client, workflows=[holds], max_concurrent_runs=1):
            sched = await holds.schedule(client, "x", id="held", every=MINUTE,
                                         overlap="cancel_previous")
            await trio.sleep(2 * 60 + 1)
            seen = list(stopped)  # (leaving the block stops the second one's task too)
            described = await sched.describe(firings=10)
            runs = sorted([await client.handle(r.id).status()
                           for r in await client.list_runs(workflow="holds")],
                          key=lambda r: r.created_at)
    fired = sorted(o.occurrence for o in described.recent if o.outcome == "fired")
    assert len(fired) == 2 and len(runs) == 2
    assert [r.state for r in runs] == ["cancelled", "running"]
    # The first run's task was stopped as the second occurrence fired, not a heartbeat later.
    assert len(seen) == 1
    assert runs[0].finished_at is not None and runs[0].finished_at - fired[1] < 1.0


@pytest.mark.filterwarnings("ignore::aiki.UnservedVersionWarning")  # (defined workerless)
async def test_a_restart_catches_up_within_the_window_and_records_older_ones_skipped(
    autojump_clock: trio.abc.Clock, tmp_path: Path, sources: aiki.Sources,
) -> None:
    path = str(tmp_path / "catchup.db")
    store = await SqliteStore.open(path, offload=False)
    async with aiki.embedded(store, sources=sources) as client:
        sched = await report.schedule(client, {"kind": "x"}, id="c", every=MINUTE,
                                      overlap="allow", catchup_window=150.0)
        first = (await sched.describe()).next_fire_times[0]
    await trio.sleep(first - sources.clock.now() + 10 * 60 + 5)  # no server for 10 minutes
    store = await SqliteStore.open(path, offload=False)
    async with aiki.embedded(store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            await trio.sleep(1.0)
            described = await client.schedule_handle("c").describe(firings=50)
    fired = [o for o in described.recent if o.outcome == "fired"]
    assert [o.occurrence - first for o in reversed(fired)] == [480.0, 540.0, 600.0]
    assert {o.reason for o in fired} == {"catch-up"}
    [older] = [o for o in described.recent if o.outcome == "skipped"]
    assert (older.occurrence, older.count, older.reason) == (first, 8, "catch-up")
    assert "older than the catch-up window of 150 s" in (older.detail or "")


async def test_definitions_return_conflict_or_update(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            a = await report.schedule(client, {"kind": "x"}, id="d", cron="0 3 * * *",
                                      timezone="Europe/Paris")
            b = await report.schedule(client, {"kind": "x"}, id="d", cron="0 3 * * *",
                                      timezone="Europe/Paris")
            assert a.created and not b.created and not b.updated
            with pytest.raises(aiki.ScheduleConflict, match="cron '0 3 \\* \\* \\*' "
                                                            "\\(asked: '0 4 \\* \\* \\*'\\)"):
                await report.schedule(client, {"kind": "x"}, id="d", cron="0 4 * * *",
                                      timezone="Europe/Paris")
            c = await report.schedule(client, {"kind": "x"}, id="d", cron="0 4 * * *",
                                      timezone="Europe/Paris", update=True)
            assert c.updated
            [summary] = await client.list_schedules()
            assert summary.spec == "cron '0 4 * * *' in Europe/Paris"
            await c.pause()
            assert (await c.describe()).paused
            await c.resume()
            fired = await c.trigger()
            assert fired.outcome == "fired" and fired.reason == "trigger"
            assert await client.handle(fired.run_id or "").wait_for_completion(60) == "x report"
            assert await c.delete() is True
            assert await client.list_schedules() == []
            with pytest.raises(aiki.ScheduleNotFound):
                await c.describe()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"cron": "0 3 * * 9"}, aiki.ScheduleInvalid, "the day-of-week field '9' is not valid"),
    ({"cron": "0 3 * * *", "timezone": "Europe/Atlantis"}, aiki.ScheduleInvalid,
     "unknown timezone 'Europe/Atlantis'"),
    ({"every": 0}, aiki.ScheduleInvalid, "above zero"),
    ({"every": datetime.timedelta(seconds=-1)}, aiki.ScheduleInvalid, "above zero"),
    ({}, aiki.ScheduleInvalid, "give either cron= or every="),
    ({"cron": "* * * * *", "every": 60}, aiki.ScheduleInvalid, "give either cron= or every="),
    ({"every": 60, "overlap": "cancel_if_you_can"}, aiki.ScheduleInvalid,
     "overlap must be one of"),
    ({"every": 60, "catchup_window": -1}, aiki.ScheduleInvalid, "catchup_window"),
    ({"every": 60, "payload": object()}, aiki.PayloadError, "cannot encode"),
    ({"every": 60, "payload": {"kind": 3}}, aiki.PayloadError, "does not match"),
    ({"every": 60, "id": "no spaces please"}, aiki.ScheduleInvalid, "schedule id"),
])
async def test_bad_definitions_are_refused_with_nothing_stored(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources, kwargs: dict[str, Any],
    error: type[Exception], message: str,
) -> None:
    store = MemoryStore()
    typed = aiki.workflow(name="typed", version="1")(_typed)
    async with aiki.embedded(store, sources=sources) as client:
        payload = kwargs.pop("payload", {"kind": "x"})
        schedule_id = kwargs.pop("id", "bad")
        with pytest.raises(error, match=message):
            await typed.schedule(client, payload, id=schedule_id, **kwargs)
        # The server refuses the same on its own (a client that skipped the checks).
        assert await store.list_schedules() == ()


async def _typed(run: aiki.WorkflowRun, req: dict[str, str]) -> str:
    return req["kind"]


async def test_the_server_refuses_what_a_careless_client_sends(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    from aiki import protocol as p
    from aiki.client.core import Call

    store = MemoryStore()
    async with aiki.embedded(store, sources=sources) as client:
        for fields, message in [
            ({"cron": "0 3 * * 9"}, "day-of-week field '9'"),
            ({"every": -1.0}, "above zero"),
            ({"every": 60.0, "timezone": "Nowhere/Town"}, "unknown timezone"),
            ({"every": 60.0, "overlap": "cancel_if_you_can"}, "overlap must be one of"),
            ({"every": 60.0, "payload": "{not json"}, "not valid JSON"),
        ]:
            body = {"id": "raw", "workflow": "report", "payload": "{}", "version": "1",
                    **fields}
            call = Call(lambda req, body=body: p.DefineSchedule(req, **body),
                        p.ScheduleDefined, lambda reply: reply)
            with pytest.raises(aiki.AikiError, match=message):
                await client.call(call)
        assert await store.list_schedules() == ()


async def test_a_version_no_worker_has_registered_is_a_warning_not_a_refusal(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(MemoryStore(), sources=sources) as client:
        with pytest.warns(aiki.UnservedVersionWarning, match="no connected worker has "
                                                             "registered workflow 'report'"):
            sched = await report.schedule(client, {"kind": "x"}, id="early", every=MINUTE)
        assert sched.created
        async with aiki.worker(client, workflows=[report]):  # the worker comes later
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                await report.schedule(client, {"kind": "x"}, id="early", every=MINUTE)
            await trio.sleep(125)
            runs = await client.list_runs(workflow="report", state="completed")
    assert len(runs) >= 2


async def test_backfill_starts_each_missed_occurrence_once(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
) -> None:
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[report]):
            sched = await report.schedule(client, {"kind": "b"}, id="bf", every=MINUTE,
                                          overlap="allow")
            first = (await sched.describe()).next_fire_times[0]
            start = first - 5 * 60
            done = await sched.backfill(start, first - 60)
            assert [o.occurrence - first for o in done] == [-300, -240, -180, -120, -60]
            assert {o.reason for o in done} == {"backfill"}
            assert await sched.backfill(start, first - 60) == []  # each once
            when = datetime.datetime.fromtimestamp(first - 60, datetime.UTC)
            assert await sched.backfill(when, when) == []
            await until(lambda: _all_done(client, 5))


async def _all_done(client: aiki.Client, n: int) -> bool:
    return len(await client.list_runs(workflow="report", state="completed")) >= n
