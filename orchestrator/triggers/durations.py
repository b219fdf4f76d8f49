"""Durations (``"1h30m"``), times of day (``"02:00"``) and time zones, as rules write them.

Parsing is strict so that a typo is an error at load time, never a surprising window::

    parse_duration("1h30m")   # timedelta(seconds=5400)
    parse_duration("90")      # ValueError: expected a duration like '2h', ...

:func:`next_time_of_day` is the one calendar computation of the package (``expect.by``):
the first HH:MM of a named time zone strictly after an instant, DST included.
"""

from __future__ import annotations

import difflib
import re
import zoneinfo
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache

from orchestrator.triggers.problems import show

__all__ = [
    "DURATION_HINT",
    "as_utc",
    "next_time_of_day",
    "parse_duration",
    "parse_time_of_day",
    "zone",
]

DURATION_HINT = "expected a duration like '2h', '30m', '1h30m', '45s', '1d'"

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_TIME_OF_DAY = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


def parse_duration(text: str) -> timedelta:
    """``"2h"``, ``"30m"``, ``"1h30m"``, ``"45s"``, ``"1d"``: whole numbers of days, hours,
    minutes and seconds, largest unit first, each at most once, no spaces; more than zero.

    Raises ``ValueError`` whose message states the expected form and the value given.
    """
    found = _DURATION.fullmatch(text) if isinstance(text, str) and text else None
    if found is None or not any(found.groups()):
        raise ValueError(f"{DURATION_HINT}, got {show(text)}")
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if not duration:
        raise ValueError(f"{DURATION_HINT} (longer than zero), got {show(text)}")
    return duration


def parse_time_of_day(text: str) -> time:
    """``"02:00"`` (24-hour ``HH:MM``) as a :class:`datetime.time`; ``ValueError`` otherwise."""
    found = _TIME_OF_DAY.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError(
            f"expected a time of day as 'HH:MM' (24-hour), e.g. '02:00', got {show(text)}"
        )
    return time(int(found.group(1)), int(found.group(2)))


@lru_cache(maxsize=256)
def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name`` (``"Europe/Paris"``); ``ValueError`` naming a close match."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        pass
    message = f"unknown time zone {show(name)}"
    close = difflib.get_close_matches(str(name), sorted(zoneinfo.available_timezones()), n=1)
    if close:
        raise ValueError(f"{message}; did you mean {close[0]!r}?") from None
    raise ValueError(f"{message}; use an IANA name like 'Europe/Paris' or 'UTC'") from None


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def next_time_of_day(after: datetime, at: time, tz: zoneinfo.ZoneInfo) -> datetime:
    """The first ``at`` (wall-clock time in ``tz``) strictly after ``after``, in UTC.

    One candidate per calendar day. When the clock goes back and ``at`` happens twice, the
    first occurrence is the day's; when the clock jumps over ``at`` (02:30 on a spring-forward
    night), the day's is the instant the clock would have shown it on the old offset (03:30).
    """
    start = as_utc(after)
    day = start.astimezone(tz).date()
    for offset in range(3):  # today, else tomorrow; a third day only guards odd zones
        candidate = datetime.combine(day + timedelta(days=offset), at, tzinfo=tz)
        moment = candidate.astimezone(UTC)
        if moment > start:
            return moment
    raise AssertionError("unreachable: a time of day recurs within two days")  # pragma: no cover
