"""Schedule ops on every store (memory, SQLite, PostgreSQL): the same outcomes, the same rows.

Times are fixed floats; nothing sleeps. Occurrences of ``every=60`` are multiples of 60.
"""

from __future__ import annotations

import attrs
import pytest
import trio

from aiki import schedules as sch
from aiki.errors import ScheduleConflict, ScheduleInvalid, ScheduleNotFound
from aiki.records import Lease, ScheduleRecord
from aiki.store import Store, execute
from aiki.store import machine as m
from aiki.store import ops as o

T0 = 1_800_000_000.0  # a multiple of 60


def schedule(schedule_id: str = "s", *, every: float | None = 60.0, cron: str | None = None,
             timezone: str = "UTC", overlap: str = "skip", window: float = 60.0,
             payload: str = '{"kind": "sales"}', now: float = T0 - 30,
             version: str = "1") -> ScheduleRecord:
    return ScheduleRecord(schedule_id, "wf", version, payload, cron, timezone, every, overlap,
                          window, False, sch.next_after(cron, timezone, every, now), None, None,
                          now, now)


async def define(store: Store, s: ScheduleRecord, update: bool = False,
                 now: float = T0 - 30) -> o.DefineOutcome:
    return await execute(store, o.DefineSchedule(s, update, now))


async def lease_of(store: Store, run_id: str, now: float) -> Lease:
    [claimed] = [c for c in await execute(store, o.Claim("w", (("wf", "1"),), 10, now, 30.0))
                 if c.run.id == run_id]
    return claimed.lease


async def test_define_returns_the_same_schedule_and_refuses_another_definition(
        store: Store) -> None:
    first = await define(store, schedule())
    assert first.created and not first.updated
    assert await store.get_schedule("s") == first.schedule == schedule()
    again = await define(store, schedule(now=T0 - 10))  # same definition, later
    assert (again.created, again.updated, again.schedule) == (False, False, schedule())
    with pytest.raises(ScheduleConflict, match="payload '{\"kind\": \"sales\"}'"):
        await define(store, schedule(payload='{"kind": "costs"}'))
    assert await store.list_schedules() == (schedule(),)  # nothing changed
    await execute(store, o.PauseSchedule("s", True, T0 - 20))
    replaced = await define(store, schedule(every=120.0, now=T0 - 10), update=True,
                            now=T0 - 10)
    assert replaced.updated and replaced.schedule.every == 120.0
    assert replaced.schedule.paused  # state carries over: still paused
    assert replaced.schedule.created_at == T0 - 30
    assert replaced.schedule.next_fire_at == T0  # the next multiple of 120 s


async def test_fire_starts_one_run_per_due_occurrence_and_moves_on(store: Store) -> None:
    await define(store, schedule(overlap="allow"))
    assert await store.next_due() == T0
    assert await execute(store, o.FireSchedules(T0 - 1)) == ()
    started = await execute(store, o.FireSchedules(T0 + 0.5))
    key = sch.iso(T0)
    assert started == (f"s@{key}",)
    run = await store.get_run(f"s@{key}")
    assert run is not None and run.idempotency_key == f"schedule:s:{key}"
    assert (run.workflow, run.version, run.payload) == ("wf", "1", '{"kind": "sales"}')
    [queued] = await store.get_history(run.id)
    assert m.scheduled_by(queued.detail) == ("s", key)
    assert (await store.get_schedule("s")).next_fire_at == T0 + 60  # type: ignore[union-attr]
    [firing] = await store.get_firings("s")
    assert (firing.key, firing.outcome, firing.reason, firing.run_id) == (
        key, "fired", "scheduled", run.id)
    assert await store.next_due() == T0 + 60
    # Fired again at the same time (a second server, a retried batch): nothing more.
    assert await execute(store, o.FireSchedules(T0 + 0.5)) == ()
    assert len(await store.list_runs()) == 1


async def test_catch_up_fires_recent_occurrences_and_records_older_ones_skipped(
        store: Store) -> None:
    await define(store, schedule(overlap="allow", window=150.0))
    # No server for 10 minutes: T0 .. T0+600 came and went.
    started = await execute(store, o.FireSchedules(T0 + 610))
    assert started == tuple(f"s@{sch.iso(T0 + k * 60)}" for k in (8, 9, 10))
    firings = await store.get_firings("s")
    skipped = [f for f in firings if f.outcome == "skipped"]
    assert len(skipped) == 1
    [old] = skipped
    assert (old.occurrence, old.last, old.count, old.reason) == (T0, T0 + 420, 8, "catch-up")
    assert "older than the catch-up window" in (old.detail or "")
    assert (await store.get_schedule("s")).next_fire_at == T0 + 660  # type: ignore[union-attr]


async def test_skip_skips_while_the_last_run_is_unfinished(store: Store) -> None:
    await define(store, schedule(overlap="skip"))
    [first] = await execute(store, o.FireSchedules(T0))
    assert await execute(store, o.FireSchedules(T0 + 60)) == ()
    newest = (await store.get_firings("s"))[0]
    assert (newest.outcome, newest.occurrence) == ("skipped", T0 + 60)
    assert f"previous run {first} is unfinished" in (newest.detail or "")
    lease = await lease_of(store, first, T0 + 70)
    await execute(store, o.CompleteRun(lease, '"ok"', T0 + 80))
    assert await execute(store, o.FireSchedules(T0 + 120)) == (f"s@{sch.iso(T0 + 120)}",)


async def test_buffer_one_starts_the_waiting_occurrence_when_the_previous_run_ends(
        store: Store) -> None:
    await define(store, schedule(overlap="buffer_one"))
    [first] = await execute(store, o.FireSchedules(T0))
    assert await execute(store, o.FireSchedules(T0 + 60)) == ()
    assert await execute(store, o.FireSchedules(T0 + 120)) == ()
    outcomes = {f.key: f.outcome for f in await store.get_firings("s")}
    assert outcomes == {sch.iso(T0): "fired", sch.iso(T0 + 60): "buffered",
                        sch.iso(T0 + 120): "skipped"}
    lease = await lease_of(store, first, T0 + 130)
    await execute(store, o.FailRun(lease, "E", "boom", T0 + 140))  # ended: the next starts
    waiting = f"s@{sch.iso(T0 + 60)}"
    run = await store.get_run(waiting)
    assert run is not None and run.state == "queued" and run.created_at == T0 + 140
    s = await store.get_schedule("s")
    assert s is not None and (s.buffered_at, s.last_run_id) == (None, waiting)
    fired = {f.key: (f.outcome, f.reason) for f in await store.get_firings("s")}
    assert fired[sch.iso(T0 + 60)] == ("fired", "buffered")


async def test_cancel_previous_cancels_the_unfinished_run_and_its_tree_and_starts_the_next(
        store: Store) -> None:
    from tests.store.test_children import start

    await define(store, schedule(overlap="cancel_previous"))
    [first] = await execute(store, o.FireSchedules(T0))
    lease = await lease_of(store, first, T0 + 10)
    await execute(store, start(lease, "0", now=T0 + 11))  # a child, queued
    second = f"s@{sch.iso(T0 + 60)}"
    assert await execute(store, o.FireSchedules(T0 + 60)) == (second,)
    old = await store.get_run(first)
    assert old is not None and old.state == "queued"  # it compensates, with the grace
    assert old.lease_epoch == lease.epoch + 1  # its worker's lease is revoked
    assert (old.cancel_reason, old.cancel_deadline) == (
        f"schedule s: replaced by occurrence {sch.iso(T0 + 60)} (overlap 'cancel_previous')",
        T0 + 60 + m.CASCADE_GRACE)
    child = await store.get_run(f"{first}/0")
    assert child is not None and child.state == "cancelled"  # it never ran: at once
    new = await store.get_run(second)
    assert new is not None and new.state == "queued"
    newest = (await store.get_firings("s"))[0]
    assert (newest.outcome, newest.run_id) == ("fired", second)
    assert f"previous run {first} is cancelled" in (newest.detail or "")
    assert (await store.get_schedule("s")).last_run_id == second  # type: ignore[union-attr]
    # The next occurrence replaces the second one, which never ran: it ends at once.
    third = f"s@{sch.iso(T0 + 120)}"
    assert await execute(store, o.FireSchedules(T0 + 120)) == (third,)
    replaced = await store.get_run(second)
    assert replaced is not None and replaced.state == "cancelled"
    unfinished = [r.id for r in await store.list_runs() if r.state not in (
        "completed", "failed", "cancelled") and r.cancel_requested_at is None]
    assert unfinished == [third]


async def test_cancel_previous_catching_up_starts_only_the_last_occurrence(
        store: Store) -> None:
    await define(store, schedule(overlap="cancel_previous", window=150.0))
    started = await execute(store, o.FireSchedules(T0 + 130))
    assert started == (f"s@{sch.iso(T0 + 120)}",)
    outcomes = {f.key: (f.outcome, f.run_id) for f in await store.get_firings("s")}
    assert outcomes == {sch.iso(T0): ("skipped", None), sch.iso(T0 + 60): ("skipped", None),
                        sch.iso(T0 + 120): ("fired", f"s@{sch.iso(T0 + 120)}")}
    assert len(await store.list_runs()) == 1
    # A finished previous run is not cancelled: the next occurrence simply starts.
    lease = await lease_of(store, f"s@{sch.iso(T0 + 120)}", T0 + 140)
    await execute(store, o.CompleteRun(lease, '"ok"', T0 + 150))
    assert await execute(store, o.TriggerSchedule("s", "t1", T0 + 160)) is not None
    done = await store.get_run(f"s@{sch.iso(T0 + 120)}")
    assert done is not None and done.state == "completed"


async def test_trigger_fires_now_once_per_trigger_id_under_the_policy(store: Store) -> None:
    await define(store, schedule(overlap="skip"))
    fired = await execute(store, o.TriggerSchedule("s", "t1", T0 - 10))
    assert (fired.outcome, fired.reason, fired.run_id) == ("fired", "trigger", "s@trigger:t1")
    assert await execute(store, o.TriggerSchedule("s", "t1", T0 - 5)) == fired  # a retry
    second = await execute(store, o.TriggerSchedule("s", "t2", T0 - 5))
    assert second.outcome == "skipped"  # the triggered run is unfinished
    assert len(await store.list_runs()) == 1
    with pytest.raises(ScheduleNotFound):
        await execute(store, o.TriggerSchedule("nope", "t3", T0))


async def test_backfill_fires_every_unhandled_occurrence_in_the_range(store: Store) -> None:
    await define(store, schedule(overlap="allow", window=0.0))
    await execute(store, o.FireSchedules(T0 + 250))  # window 0: T0..T0+240 skipped
    firings = await execute(store, o.BackfillSchedule("s", T0 + 60, T0 + 180, T0 + 260))
    assert [(f.occurrence, f.outcome, f.reason) for f in firings] == [
        (T0 + 60, "fired", "backfill"), (T0 + 120, "fired", "backfill"),
        (T0 + 180, "fired", "backfill")]
    again = await execute(store, o.BackfillSchedule("s", T0, T0 + 180, T0 + 260))
    assert [f.occurrence for f in again] == [T0]  # the others were handled
    assert len(await store.list_runs()) == 4
    with pytest.raises(ScheduleInvalid, match="in the future"):
        await execute(store, o.BackfillSchedule("s", T0, T0 + 900, T0 + 260))
    with pytest.raises(ScheduleInvalid, match="after its end"):
        await execute(store, o.BackfillSchedule("s", T0 + 60, T0, T0 + 260))
    with pytest.raises(ScheduleInvalid, match="more than 1000"):
        await execute(store, o.BackfillSchedule("s", T0 - 86400, T0, T0 + 260))
    assert len(await store.list_runs()) == 4


async def test_pause_stops_firing_and_resume_starts_after_now(store: Store) -> None:
    await define(store, schedule())
    paused = await execute(store, o.PauseSchedule("s", True, T0 - 10))
    assert paused.paused and await store.next_due() is None
    assert await execute(store, o.FireSchedules(T0 + 500)) == ()
    resumed = await execute(store, o.PauseSchedule("s", False, T0 + 500))
    assert not resumed.paused and resumed.next_fire_at == T0 + 540
    [skipped] = await store.get_firings("s")
    assert (skipped.outcome, skipped.reason, skipped.count) == ("skipped", "resumed", 9)
    assert await store.next_due() == T0 + 540
    with pytest.raises(ScheduleNotFound):
        await execute(store, o.PauseSchedule("nope", True, T0))


async def test_delete_removes_the_schedule_and_its_firings_not_its_runs(store: Store) -> None:
    await define(store, schedule())
    await execute(store, o.FireSchedules(T0))
    assert await execute(store, o.DeleteSchedule("s")) is True
    assert await store.get_schedule("s") is None
    assert await store.get_firings("s") == ()
    assert await store.list_schedules() == ()
    assert len(await store.list_runs()) == 1
    assert await execute(store, o.DeleteSchedule("s")) is False
    assert await store.next_due() is None


async def test_a_cron_schedule_in_a_time_zone(store: Store) -> None:
    noon_paris = 1_798_714_800.0  # 2026-12-31T11:00:00Z = 12:00 in Paris
    await define(store, schedule(every=None, cron="0 12 * * *", timezone="Europe/Paris",
                                 now=noon_paris - 3600), now=noon_paris - 3600)
    assert await store.next_due() == noon_paris
    assert await execute(store, o.FireSchedules(noon_paris)) == (
        "s@2026-12-31T11:00:00Z",)
    assert (await store.get_schedule("s")).next_fire_at == noon_paris + 86400  # type: ignore[union-attr]


async def test_concurrent_firings_start_one_run(store: Store) -> None:
    await define(store, schedule(overlap="allow"))
    results: list[tuple[str, ...]] = []

    async def fire() -> None:
        results.append(await execute(store, o.FireSchedules(T0 + 1)))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(fire)
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert len(await store.list_runs()) == 1


async def test_schedule_ops_in_one_batch_see_each_other(store: Store) -> None:
    s = schedule(overlap="allow")
    outcomes = await store.apply([o.DefineSchedule(s, False, T0 - 30),
                                  o.DefineSchedule(attrs.evolve(s, payload="{}"), False, T0),
                                  o.FireSchedules(T0)])
    assert isinstance(outcomes[1], ScheduleConflict)
    assert outcomes[2] == (f"s@{sch.iso(T0)}",)
