"""When a schedule fires: cron expressions (with a time zone) and fixed intervals. Pure.

Cron comes from `cronsim <https://pypi.org/project/cronsim/>`_ (see docs/architecture.md for
why), never from a parser of our own. Time zones come from :mod:`zoneinfo`, with the
``tzdata`` package as the database wherever the system has none.

- A cron schedule's occurrences are the instants cronsim gives in its time zone. Across
  daylight-saving changes it behaves as cron (cronie) does: a time that does not exist on the
  spring-forward day (02:30 in Europe/Paris) fires once, when the clock jumps (03:00); a time
  that happens twice on the fall-back day fires once, the first time.
- An interval schedule fires at every multiple of ``every`` seconds since the Unix epoch (so
  ``every=timedelta(minutes=15)`` fires at :00, :15, :30, :45 UTC whenever it was created, and
  every server computes the same instants).

Times are epoch seconds (floats), as everywhere in the store.
"""

from __future__ import annotations

import datetime
import math
import re
import zoneinfo
from collections.abc import Iterator
from typing import Literal

from cronsim import CronSim, CronSimError

from aiki.errors import ScheduleInvalid

Overlap = Literal["skip", "buffer_one", "allow", "cancel_previous"]
OVERLAPS: tuple[str, ...] = ("skip", "buffer_one", "allow", "cancel_previous")
#: What cannot be used yet, and why (refused at definition, nothing stored).
UNSUPPORTED_OVERLAPS: dict[str, str] = {}
SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_INTERVAL = 10 * 366 * 86400.0  # ten years, as durable sleeps
MAX_CATCHUP = 366 * 86400.0
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


def check_id(schedule_id: object) -> str:
    if not isinstance(schedule_id, str) or not SCHEDULE_ID.fullmatch(schedule_id):
        raise ScheduleInvalid(
            f"schedule id {schedule_id!r} is not valid: 1 to 64 characters, letters, digits "
            "and . _ : - (starting with a letter or digit); nothing was stored")
    return schedule_id


def check_timezone(name: object) -> zoneinfo.ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ScheduleInvalid(f"timezone must be an IANA zone name such as 'Europe/Paris', "
                              f"got {name!r}; nothing was stored")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleInvalid(
            f"unknown timezone {name!r}: give an IANA zone name such as 'Europe/Paris' or "
            "'UTC'; nothing was stored") from None


def check_cron(expr: object, timezone: str = "UTC") -> str:
    """``expr`` if cronsim takes it; else :class:`ScheduleInvalid` naming the bad field."""
    if not isinstance(expr, str) or not expr.strip():
        raise ScheduleInvalid(f"cron must be a cron expression such as '0 3 * * *', got "
                              f"{expr!r}; nothing was stored")
    expr = " ".join(expr.split())
    parts = expr.split(" ")
    if len(parts) != 5:
        raise ScheduleInvalid(
            f"invalid cron expression {expr!r}: it has {len(parts)} field(s); give five "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *'; nothing was "
            "stored")
    try:
        CronSim(expr, datetime.datetime(2000, 1, 1, tzinfo=check_timezone(timezone)))
    except CronSimError as exc:
        field = str(exc).removeprefix("Bad ").strip()
        index = _CRON_FIELDS.index(field) if field in _CRON_FIELDS else None
        where = f" the {field} field {parts[index]!r} is not valid" if index is not None \
            else f" {exc}"
        raise ScheduleInvalid(f"invalid cron expression {expr!r}:{where}; nothing was "
                              "stored") from None
    return expr


def check_interval(seconds: float) -> float:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise ScheduleInvalid(f"every= must be a duration above zero, got {seconds!r} s; "
                              "nothing was stored")
    if seconds > MAX_INTERVAL:
        raise ScheduleInvalid(f"every= must be at most ten years, got {seconds!r} s")
    return float(seconds)


def check_catchup(seconds: float) -> float:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not math.isfinite(seconds) or not 0 <= seconds <= MAX_CATCHUP:
        raise ScheduleInvalid(f"catchup_window must be a duration from zero to a year, got "
                              f"{seconds!r} s; nothing was stored")
    return float(seconds)


def check_overlap(overlap: object) -> str:
    if overlap not in OVERLAPS:
        raise ScheduleInvalid(f"overlap must be one of {', '.join(OVERLAPS)}, got "
                              f"{overlap!r}; nothing was stored")
    assert isinstance(overlap, str)
    why = UNSUPPORTED_OVERLAPS.get(overlap)
    if why is not None:
        raise ScheduleInvalid(f"{why}; nothing was stored")
    return overlap


def next_after(cron: str | None, timezone: str, every: float | None, t: float) -> float:
    """The first occurrence strictly after ``t``."""
    if every is not None:
        return (math.floor(t / every) + 1) * every
    assert cron is not None
    start = datetime.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(timezone))
    for moment in CronSim(cron, start):
        at = moment.timestamp()
        if at > t:  # (cronsim starts at the next whole minute; an instant is never repeated)
            return at
    raise AssertionError("a cron expression without occurrences")  # pragma: no cover


def occurrences(cron: str | None, timezone: str, every: float | None,
                after: float) -> Iterator[float]:
    """Every occurrence strictly after ``after``, in order."""
    t = after
    while True:
        t = next_after(cron, timezone, every, t)
        yield t


def iso(at: float) -> str:
    """An occurrence as it appears in keys, run ids and listings: UTC, to the second (or
    millisecond when it has a fraction)."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    spec = "seconds" if at == int(at) else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def describe(cron: str | None, timezone: str, every: float | None) -> str:
    if every is not None:
        return f"every {_duration(every)}"
    return f"cron {cron!r} in {timezone}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
