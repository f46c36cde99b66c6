"""When schedules fire: cron in a time zone across daylight-saving changes, intervals, and
every definition refused with a message naming what is wrong. Pure: no engine."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest

from aiki import schedules as sch
from aiki.errors import ScheduleInvalid
from aiki.records import ScheduleRecord
from aiki.store import machine as m

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int, fold: int = 0) -> float:
    return datetime.datetime(*args, tzinfo=PARIS, fold=fold).timestamp()  # type: ignore[misc]


def utc(at: float) -> str:
    return sch.iso(at)


def fires(cron: str, tz: str, start: float, end: float) -> list[str]:
    out = []
    for t in sch.occurrences(cron, tz, None, start):
        if t > end:
            return out
        out.append(utc(t))
    raise AssertionError("unreachable")


def test_a_0230_paris_schedule_on_the_spring_forward_day_fires_once_at_the_jump() -> None:
    # 2026-03-29: at 02:00 CET the clocks go to 03:00 CEST; 02:30 does not exist.
    got = fires("30 2 * * *", "Europe/Paris", paris(2026, 3, 27, 12), paris(2026, 3, 31, 12))
    assert got == [
        "2026-03-28T01:30:00Z",  # 02:30 CET (UTC+1)
        "2026-03-29T01:00:00Z",  # 03:00 CEST: once, when the clock jumps over 02:30
        "2026-03-30T00:30:00Z",  # 02:30 CEST (UTC+2)
        "2026-03-31T00:30:00Z",
    ]


def test_a_0230_paris_schedule_on_the_fall_back_day_fires_once() -> None:
    # 2026-10-25: at 03:00 CEST the clocks go back to 02:00 CET; 02:30 happens twice.
    got = fires("30 2 * * *", "Europe/Paris", paris(2026, 10, 23, 12), paris(2026, 10, 27, 12))
    assert got == [
        "2026-10-24T00:30:00Z",  # 02:30 CEST
        "2026-10-25T00:30:00Z",  # the first 02:30 (CEST), not the second one (CET)
        "2026-10-26T01:30:00Z",  # 02:30 CET
        "2026-10-27T01:30:00Z",
    ]
    # Even asked from between the two 02:30s, the second one does not fire.
    between = paris(2026, 10, 25, 2, 45)  # the first 02:45 (CEST)
    assert utc(sch.next_after("30 2 * * *", "Europe/Paris", None, between)) == \
        "2026-10-26T01:30:00Z"


def test_the_timer_fires_the_dst_days_through_the_state_machine() -> None:
    # The same, as FireSchedules decides it, occurrence by occurrence.
    start = paris(2026, 3, 28, 12)
    s = ScheduleRecord("p", "wf", "1", "{}", "30 2 * * *", "Europe/Paris", None, "allow",
                       60.0, False, sch.next_after("30 2 * * *", "Europe/Paris", None, start),
                       None, None, start, start)
    keys = []
    for _ in range(2):
        change = m.fire(s, None, s.next_fire_at)
        keys += [f.key for f in change.firings]
        assert change.schedule is not None
        s = change.schedule
    assert keys == ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]


def test_hourly_in_paris_across_the_fall_back_hour_fires_every_real_hour() -> None:
    got = fires("0 * * * *", "Europe/Paris", paris(2026, 10, 25, 0, 30),
                paris(2026, 10, 25, 4, 30))
    # 01:00, 02:00 CEST, 02:00 CET? cron (and cronsim) fire 02:00 once; then 03:00, 04:00.
    assert got[0] == "2026-10-24T23:00:00Z" and got[-1] == "2026-10-25T03:00:00Z"
    assert len(got) == len(set(got))


def test_intervals_fire_at_multiples_since_the_epoch() -> None:
    t = datetime.datetime(2026, 12, 1, 9, 7, 30, tzinfo=datetime.UTC).timestamp()
    assert utc(sch.next_after(None, "UTC", 900.0, t)) == "2026-12-01T09:15:00Z"
    assert utc(sch.next_after(None, "UTC", 900.0, t + 450)) == "2026-12-01T09:30:00Z"


@pytest.mark.parametrize(("expr", "message"), [
    ("61 * * * *", "the minute field '61' is not valid"),
    ("0 25 * * *", "the hour field '25' is not valid"),
    ("0 3 32 * *", "the day-of-month field '32' is not valid"),
    ("0 3 * 13 *", "the month field '13' is not valid"),
    ("0 3 * * funday", "the day-of-week field 'funday' is not valid"),
    ("0 3 * *", "it has 4 field(s)"),
    ("", "cron must be a cron expression"),
])
def test_an_invalid_cron_expression_names_the_bad_field(expr: str, message: str) -> None:
    with pytest.raises(ScheduleInvalid, match="nothing was stored") as caught:
        sch.check_cron(expr)
    assert message in str(caught.value)


def test_unknown_time_zones_intervals_and_policies_are_refused() -> None:
    with pytest.raises(ScheduleInvalid, match="unknown timezone 'Mars/Olympus'"):
        sch.check_timezone("Mars/Olympus")
    for bad in (0, -5.0, float("nan"), float("inf")):
        with pytest.raises(ScheduleInvalid, match="above zero"):
            sch.check_interval(bad)
    with pytest.raises(ScheduleInvalid, match="one of skip, buffer_one, allow"):
        sch.check_overlap("sometimes")
    assert sch.check_overlap("cancel_previous") == "cancel_previous"
    with pytest.raises(ScheduleInvalid, match="catchup_window"):
        sch.check_catchup(-1.0)
    with pytest.raises(ScheduleInvalid, match="schedule id"):
        sch.check_id("has spaces")


def test_the_time_zone_database_is_there() -> None:
    # tzdata is a dependency: zoneinfo finds the zones on a machine without /usr/share/zoneinfo.
    import tzdata

    assert tzdata.IANA_VERSION
    assert ZoneInfo("Europe/Paris").utcoffset(datetime.datetime(2026, 7, 1)) == \
        datetime.timedelta(hours=2)
