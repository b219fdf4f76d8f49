"""Durations and times of day as rules write them: strict, with messages that show the form."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from orchestrator.triggers import parse_duration
from orchestrator.triggers.durations import next_time_of_day, parse_time_of_day, zone


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", timedelta(hours=2)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1d", timedelta(days=1)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("90m", timedelta(minutes=90)),
        ("0h5m", timedelta(minutes=5)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["two hours", "", "2", "2H", "1h 30m", "30m1h", "1.5h", "-2h", "2hh", "h", " 2h"]
)
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like") as info:
        parse_duration(text)
    assert str(info.value) == (
        f"expected a duration like '2h', '30m', '1h30m', '45s', '1d', got {text!r}"
    )


def test_zero_and_non_strings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(longer than zero\), got '0s'"):
        parse_duration("0s")
    with pytest.raises(ValueError, match="got 7200"):
        parse_duration(7200)  # type: ignore[arg-type]


def test_times_of_day() -> None:
    assert parse_time_of_day("02:00") == time(2, 0)
    assert parse_time_of_day("2:05") == time(2, 5)
    assert parse_time_of_day("23:59") == time(23, 59)
    for bad in ("24:00", "2am", "02:60", "0200", "02:00:00"):
        with pytest.raises(ValueError, match=r"expected a time of day as 'HH:MM' \(24-hour\)"):
            parse_time_of_day(bad)


def test_zones() -> None:
    assert str(zone("Europe/Paris")) == "Europe/Paris"
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Pariss'; did you mean"):
        zone("Europe/Pariss")
    with pytest.raises(ValueError, match="use an IANA name like 'Europe/Paris' or 'UTC'"):
        zone("Nowhere at all")


def test_next_time_of_day_is_strictly_after_and_in_utc() -> None:
    utc = zone("UTC")
    start = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    assert next_time_of_day(start, time(2, 0), utc) == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    assert next_time_of_day(start, time(2, 1), utc) == datetime(2026, 11, 24, 2, 1, tzinfo=UTC)
    tokyo = next_time_of_day(start, time(9, 0), zone("Asia/Tokyo"))
    assert tokyo == datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
    assert tokyo.tzinfo is UTC
