"""The correlation state machine: windows, once per key, sequences, absence deadlines.

Every step goes through ``msgspec.json`` the way the store persists state, and no step may
change the state it was given. Time is explicit; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from orchestrator.triggers import (
    CorrelationState,
    Correlator,
    Expect,
    Firing,
    NOf,
    Rule,
    correlator,
)

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
ORDERS = {"data": {"dataset": ["sales.orders"]}}
CUSTOMERS = {"data": {"dataset": ["sales.customers"]}}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def build(**fields: Any) -> Correlator:
    fields.setdefault("on", {"orders": ORDERS, "customers": CUSTOMERS})
    corr = correlator(Rule(name=fields.pop("name", "r"), pipeline="p", **fields))
    assert corr is not None
    return corr


class Driver:
    """Plays the store: one state per key, persisted as JSON between events."""

    def __init__(self, corr: Correlator) -> None:
        self.corr = corr
        self.rows: dict[str, bytes] = {}
        self.next_id = 0

    def state(self, key: str = "p1") -> CorrelationState | None:
        row = self.rows.get(key)
        return None if row is None else msgspec.json.decode(row, type=CorrelationState)

    def send(
        self,
        conditions: Sequence[str],
        when: datetime,
        key: str = "p1",
        event_id: int | None = None,
    ) -> Firing | None:
        if event_id is None:
            self.next_id += 1
            event_id = self.next_id
        before = self.state(key)
        snapshot = None if before is None else msgspec.json.encode(before)
        state, firing = self.corr.apply(
            before, key=key, conditions=conditions, event_id=event_id, event_time=when
        )
        if before is not None:  # apply never changes the state it is given
            assert msgspec.json.encode(before) == snapshot
        self._save(key, state)
        return firing

    def deadline(self, now: datetime, key: str = "p1") -> Firing | None:
        state = self.state(key)
        assert state is not None
        firing = self.corr.on_deadline(state, now)
        self._save(key, state)
        return firing

    def _save(self, key: str, state: CorrelationState | None) -> None:
        if state is None:
            self.rows.pop(key, None)
            return
        row = msgspec.json.encode(state)
        assert msgspec.json.decode(row, type=CorrelationState) == state
        self.rows[key] = row


def instance(key: str, opened: datetime) -> str:
    return f"{key}@{opened.isoformat()}"


# --- all_of -------------------------------------------------------------------------------


def test_all_of_fires_once_per_key_and_window() -> None:
    d = Driver(build(all_of=["orders", "customers"], within="2h"))
    assert d.send(["orders"], at(0)) is None
    firing = d.send(["customers"], at(30))
    assert firing == Firing(
        rule="r",
        key="p1",
        instance=instance("p1", T0),
        event_ids=[1, 2],
        reason="complete",
        missing=[],
    )
    state = d.state()
    assert state is not None
    assert state.fired
    assert (state.opened_at, state.window_ends, state.deadline) == (T0, at(120), None)
    assert state.seen == {"orders": [1], "customers": [2]}
    assert state.order == ["orders", "customers"]
    # the rest of the window is ignored, however complete it looks again
    assert d.send(["orders"], at(60)) is None
    assert d.send(["customers"], at(119)) is None
    assert d.state() == state
    # a new window opens with the first event at or after the end, and can fire again
    assert d.send(["customers"], at(120)) is None
    again = d.send(["orders"], at(150))
    assert again is not None
    assert again.instance == instance("p1", at(120))
    assert again.event_ids == [5, 6]


def test_all_of_does_not_fire_after_the_window_expired() -> None:
    d = Driver(build(all_of=["orders", "customers"], within="2h"))
    d.send(["orders"], at(0))
    assert d.send(["customers"], at(121)) is None  # too late: starts a window of its own
    state = d.state()
    assert state is not None
    assert (state.opened_at, state.seen, state.fired) == (at(121), {"customers": [2]}, False)
    firing = d.send(["orders"], at(200))
    assert firing is not None
    assert firing.event_ids == [2, 3]
    assert firing.instance == instance("p1", at(121))


def test_a_repeated_condition_does_not_fire_twice_and_every_event_is_passed_on() -> None:
    d = Driver(build(all_of=["orders", "customers"], within="2h"))
    assert d.send(["orders"], at(0)) is None
    assert d.send(["orders"], at(10)) is None
    firing = d.send(["customers"], at(20))
    assert firing is not None
    assert firing.event_ids == [1, 2, 3]
    assert d.send(["customers"], at(30)) is None


def test_one_event_meeting_every_condition_fires_at_once() -> None:
    corr = build(all_of=["orders", "customers"], on={"orders": ORDERS, "customers": ORDERS})
    d = Driver(corr)
    firing = d.send(["orders", "customers"], at(0))
    assert firing is not None
    assert firing.event_ids == [1]


def test_without_within_a_key_fires_once_ever() -> None:
    d = Driver(build(all_of=["orders", "customers"]))
    d.send(["orders"], at(0))
    assert d.send(["customers"], at(60 * 24 * 30)) is not None  # a month later: no window
    state = d.state()
    assert state is not None
    assert state.window_ends is None
    for days in (31, 365):
        assert d.send(["orders"], at(60 * 24 * days)) is None
        assert d.send(["customers"], at(60 * 24 * days + 1)) is None


def test_keys_are_independent() -> None:
    d = Driver(build(all_of=["orders", "customers"], within="2h"))
    assert d.send(["orders"], at(0), key="p1") is None
    assert d.send(["customers"], at(1), key="p2") is None
    firing = d.send(["customers"], at(2), key="p1")
    assert firing is not None
    assert (firing.key, firing.event_ids) == ("p1", [1, 3])
    late = d.send(["orders"], at(3), key="p2")
    assert late is not None
    assert (late.key, late.event_ids, late.instance) == ("p2", [2, 4], instance("p2", at(1)))


def test_the_same_event_applied_twice_changes_nothing() -> None:
    corr = build(all_of=["orders", "customers"], within="2h")
    state, _ = corr.apply(None, key="p1", conditions=["orders"], event_id=7, event_time=T0)
    assert state is not None
    again, firing = corr.apply(state, key="p1", conditions=["orders"], event_id=7, event_time=T0)
    assert again is state
    assert firing is None


# --- any_of, n_of, sequence ---------------------------------------------------------------


def test_any_of_fires_on_the_first_once_per_window() -> None:
    d = Driver(build(any_of=["orders", "customers"], within="1h"))
    first = d.send(["customers"], at(0))
    assert first is not None
    assert first.event_ids == [1]
    assert d.send(["orders"], at(5)) is None
    assert d.send(["customers"], at(59)) is None
    second = d.send(["orders"], at(60))
    assert second is not None
    assert second.instance == instance("p1", at(60))


def test_n_of_needs_n_different_conditions() -> None:
    on = {name: {"data": {"dataset": [name]}} for name in ("a", "b", "c")}
    d = Driver(build(on=on, n_of=NOf(n=2, of=["a", "b", "c"]), within="1h"))
    assert d.send(["a"], at(0)) is None
    assert d.send(["a"], at(1)) is None  # the same condition again is still one
    firing = d.send(["c"], at(2))
    assert firing is not None
    assert firing.event_ids == [1, 2, 3]
    assert d.send(["b"], at(3)) is None


def test_sequence_counts_only_the_next_step() -> None:
    on = {name: {"data": {"dataset": [name]}} for name in ("extract", "transform", "load")}
    d = Driver(build(on=on, sequence=["extract", "transform", "load"], within="1h"))
    assert d.send(["load"], at(0)) is None  # out of order, and nothing opened yet
    assert d.state() is None
    assert d.send(["extract"], at(1)) is None
    assert d.send(["load"], at(2)) is None  # skips transform: does not count
    assert d.send(["extract"], at(3)) is None  # a repeat of a passed step: does not count
    state = d.state()
    assert state is not None
    assert (state.opened_at, state.order, state.seen) == (at(1), ["extract"], {"extract": [2]})
    assert d.send(["transform"], at(4)) is None
    firing = d.send(["load"], at(5))
    assert firing is not None
    assert firing.event_ids == [2, 5, 6]


def test_sequence_one_event_can_take_consecutive_steps() -> None:
    on = {"a": {"data": {"dataset": ["x"]}}, "b": {"data": {"dataset": ["x"]}}}
    d = Driver(build(on=on, sequence=["a", "b"]))
    firing = d.send(["a", "b"], at(0))
    assert firing is not None
    assert firing.event_ids == [1]


def test_an_expired_window_is_dropped_when_the_event_does_not_count() -> None:
    on = {name: {"data": {"dataset": [name]}} for name in ("extract", "load")}
    d = Driver(build(on=on, sequence=["extract", "load"], within="1h"))
    d.send(["extract"], at(0))
    assert d.state() is not None
    assert d.send(["load"], at(61)) is None  # the window is over and load cannot open one
    assert d.state() is None


# --- absence ------------------------------------------------------------------------------


def absence(**expect: Any) -> Correlator:
    return build(expect=Expect(conditions=["orders"], **expect))


def test_absence_fires_at_the_deadline_with_what_is_missing() -> None:
    corr = absence(after="3h")
    d = Driver(corr)
    assert d.send(["customers"], at(0)) is None
    state = d.state()
    assert state is not None
    assert state.deadline == at(180)
    assert corr.next_deadline(state) == at(180)
    assert d.deadline(at(179)) is None
    firing = d.deadline(at(180))
    assert firing == Firing(
        rule="r",
        key="p1",
        instance=instance("p1", T0),
        event_ids=[1],
        reason="absence",
        missing=["orders"],
    )
    state = d.state()
    assert state is not None
    assert state.fired
    assert corr.next_deadline(state) is None
    assert d.deadline(at(500)) is None  # once
    assert d.send(["orders"], at(600)) is None  # late data does not reopen the watch


def test_absence_does_not_fire_when_satisfied() -> None:
    corr = absence(after="3h")
    d = Driver(corr)
    d.send(["customers"], at(0))
    d.send(["customers"], at(10))
    assert d.send(["orders"], at(179)) is None
    state = d.state()
    assert state is not None
    assert state.fired
    assert corr.next_deadline(state) is None
    assert d.deadline(at(180)) is None


def test_absence_opened_by_the_expected_condition_itself_is_satisfied_at_once() -> None:
    corr = build(
        on={"orders": ORDERS, "customers": CUSTOMERS, "refunds": {"data": {"dataset": ["r"]}}},
        expect=Expect(conditions=["orders", "refunds"], after="1h"),
    )
    d = Driver(corr)
    d.send(["orders"], at(0))  # opens the watch and counts
    firing = d.deadline(at(60))
    assert firing is not None
    assert (firing.event_ids, firing.missing) == ([1], ["refunds"])


def test_an_event_after_an_unresolved_deadline_resolves_it_first() -> None:
    d = Driver(absence(after="3h"))
    d.send(["customers"], at(0))
    firing = d.send(["orders"], at(240))  # the store had not yet called on_deadline
    assert firing is not None
    assert (firing.reason, firing.missing, firing.event_ids) == ("absence", ["orders"], [1])
    state = d.state()
    assert state is not None
    assert state.fired
    assert state.seen == {"customers": [1]}  # the late event is not part of the watch


def test_absence_with_within_opens_a_new_watch_after_the_window() -> None:
    corr = build(expect=Expect(conditions=["orders"], after="3h"), within="1h")
    d = Driver(corr)
    d.send(["customers"], at(0))
    state = d.state()
    assert state is not None
    assert state.window_ends == at(180)  # a watch lasts at least until its deadline
    firing = d.send(["customers"], at(200))  # resolves the old watch, opens the next
    assert firing is not None
    assert firing.instance == instance("p1", T0)
    state = d.state()
    assert state is not None
    assert (state.opened_at, state.deadline, state.fired) == (at(200), at(380), False)


PARIS = "Europe/Paris"


def paris(*args: int) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime(*args, tzinfo=ZoneInfo(PARIS))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("opened", "by", "deadline"),
    [
        # across midnight, winter (UTC+1)
        (paris(2026, 11, 24, 23, 30), "02:00", paris(2026, 11, 25, 2, 0)),
        # strictly after: opened exactly at the time waits for the next day
        (paris(2026, 11, 24, 2, 0), "02:00", paris(2026, 11, 25, 2, 0)),
        (paris(2026, 11, 24, 1, 59), "02:00", paris(2026, 11, 24, 2, 0)),
        # spring forward (29 March 2026, 02:00 -> 03:00): 02:30 does not exist; it falls
        # one hour later on the new offset
        (paris(2026, 3, 28, 22, 0), "02:30", paris(2026, 3, 29, 3, 30)),
        (paris(2026, 3, 28, 22, 0), "03:00", paris(2026, 3, 29, 3, 0)),
        # fall back (25 October 2026, 03:00 -> 02:00): 02:30 happens twice; the first counts
        (paris(2026, 10, 24, 23, 0), "02:30", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        # after the first 02:30 of that night the next deadline is the next day's
        (
            datetime(2026, 10, 25, 0, 45, tzinfo=UTC),
            "02:30",
            datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
        ),
        # a day that has 25 hours
        (paris(2026, 10, 24, 12, 0), "11:00", paris(2026, 10, 25, 11, 0)),
    ],
)
def test_absence_by_a_time_of_day_in_a_named_timezone(
    opened: datetime, by: str, deadline: datetime
) -> None:
    corr = absence(by=by, timezone=PARIS)
    d = Driver(corr)
    d.send(["customers"], opened)
    state = d.state()
    assert state is not None
    assert state.deadline == deadline
    assert state.deadline is not None
    assert state.deadline.utcoffset() == timedelta(0)  # stored in UTC
    # (subtract in UTC: arithmetic on zoned datetimes is wall-clock arithmetic)
    assert d.deadline(deadline.astimezone(UTC) - timedelta(seconds=1)) is None
    firing = d.deadline(deadline)
    assert firing is not None
    assert firing.missing == ["orders"]


def test_fall_back_day_is_25_hours_long() -> None:
    corr = absence(by="11:00", timezone=PARIS)
    state, _ = corr.apply(
        None,
        key="k",
        conditions=["customers"],
        event_id=1,
        event_time=paris(2026, 10, 24, 11, 0),
    )
    assert state is not None
    assert state.deadline is not None
    assert state.deadline - state.opened_at == timedelta(hours=25)


def test_by_defaults_to_utc() -> None:
    corr = absence(by="02:00")
    state, _ = corr.apply(None, key="k", conditions=["customers"], event_id=1, event_time=at(0))
    assert state is not None
    assert state.deadline == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


# --- conditions, inputs, the state as data -------------------------------------------------


def test_conditions_apply_match_first_and_keep_on_order() -> None:
    corr = build(
        on={"customers": CUSTOMERS, "any": {"data": {"rows": [{"numeric": [">", 0]}]}}},
        all_of=["customers", "any"],
        match={"source": [{"prefix": "prod://"}]},
    )
    event = {"source": "prod://x", "data": {"dataset": "sales.customers", "rows": 3}}
    assert corr.conditions(event) == ["customers", "any"]
    assert corr.conditions({**event, "source": "test://x"}) == []
    assert corr.conditions({**event, "data": {"dataset": "other", "rows": 3}}) == ["any"]


def test_event_times_are_instants_and_naive_means_utc() -> None:
    corr = build(all_of=["orders", "customers"], within="2h")
    paris_time = T0.astimezone(timezone(timedelta(hours=1)))
    state, _ = corr.apply(None, key="k", conditions=["orders"], event_id=1, event_time=paris_time)
    assert state is not None
    assert state.opened_at == T0
    assert state.opened_at.utcoffset() == timedelta(0)
    naive = (T0 + timedelta(minutes=119)).replace(tzinfo=None)
    _, firing = corr.apply(state, key="k", conditions=["customers"], event_id=2, event_time=naive)
    assert firing is not None
    assert firing.instance == "k@2026-11-24T10:00:00+00:00"


def test_unknown_condition_names_are_ignored_and_keys_must_agree() -> None:
    corr = build(all_of=["orders", "customers"])
    assert corr.apply(None, key="k", conditions=["nope"], event_id=1, event_time=T0) == (
        None,
        None,
    )
    state, _ = corr.apply(None, key="k", conditions=["orders"], event_id=1, event_time=T0)
    with pytest.raises(ValueError, match="state of key 'k' applied to key 'other'"):
        corr.apply(state, key="other", conditions=["orders"], event_id=2, event_time=T0)


def test_state_json_is_plain() -> None:
    corr = absence(after="3h")
    state, _ = corr.apply(None, key="p1", conditions=["customers"], event_id=9, event_time=T0)
    assert msgspec.json.decode(msgspec.json.encode(state)) == {
        "key": "p1",
        "opened_at": "2026-11-24T10:00:00Z",
        "window_ends": None,
        "deadline": "2026-11-24T13:00:00Z",
        "seen": {"customers": [9]},
        "order": ["customers"],
        "fired": False,
    }


def test_non_absence_rules_have_no_deadline() -> None:
    corr = build(all_of=["orders", "customers"], within="2h")
    state, _ = corr.apply(None, key="k", conditions=["orders"], event_id=1, event_time=T0)
    assert state is not None
    assert corr.next_deadline(state) is None
    assert corr.on_deadline(state, at(10_000)) is None
    assert (corr.kind, corr.absence) == ("all_of", False)


def test_simple_rules_have_no_correlator() -> None:
    assert correlator(Rule(name="s", pipeline="p", match={"type": ["t"]})) is None
