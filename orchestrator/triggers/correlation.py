"""Correlated and absence rules: a deterministic state machine per (rule, key).

Nothing here reads a clock or a database. The store keeps one :class:`CorrelationState`
per (rule, key) (JSON via msgspec), and for each event that contributes (see
:meth:`RuleSet.correlate`) calls::

    state, firing = correlator.apply(state, key=key, conditions=conditions,
                                     event_id=event_pk, event_time=published_at)
    # persist state (None: delete the row); if firing: create the run, once per
    # firing.instance; call correlator.on_deadline(state, now) at next_deadline(state)

Semantics, per key:

* A *window* opens at the first event that counts (``opened_at``) and lasts ``within``
  (``window_ends``; forever without ``within``). It fires at most once: at the event that
  completes the condition. Later events of the window are ignored. An event at or after
  ``window_ends`` opens a new window (if it counts), whether the old one fired or not.
* ``all_of``: every condition seen; ``any_of``: one; ``n_of``: ``n`` different ones;
  ``sequence``: each step seen after the previous one. Only the next step counts, so an
  out-of-order event (or a repeat of an earlier step) is not recorded.
* Absence (``expect``): every ``on`` condition opens the watch and sets ``deadline``. When
  the expected conditions all arrive before it, the watch is satisfied (``fired`` without a
  :class:`Firing`). Otherwise :meth:`Correlator.on_deadline` fires with ``missing``. An
  event at or after an unresolved deadline first resolves it (the same firing). The watch
  lasts until its deadline or ``within``, whichever is later.

Event times are compared as instants; naive datetimes are taken as UTC. Times in states
are stored in UTC, so ``instance`` ids are stable across encode/decode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec

from orchestrator.triggers.durations import (
    as_utc,
    next_time_of_day,
    parse_duration,
    parse_time_of_day,
    zone,
)
from orchestrator.triggers.nodes import Test
from orchestrator.triggers.rules import COMBINATORS, Rule
from orchestrator.triggers.validation import CompiledRule, validate_rule

__all__ = ["CorrelationState", "Correlator", "Firing", "correlator"]


class CorrelationState(msgspec.Struct, kw_only=True):
    """One key's window of one correlated rule. The store persists it (jsonb).

    Invariant: ``order`` has one entry per (condition, event) recorded, in arrival order, so
    ``order.count(name) == len(seen[name])``; together they give the arrival order of events.
    """

    key: str
    opened_at: datetime
    """Time of the first counted event of the window (UTC)."""
    window_ends: datetime | None
    """``opened_at + within``; None: the window never ends."""
    deadline: datetime | None
    """Absence rules: when the watch fires if the expected conditions are missing."""
    seen: dict[str, list[int]]
    """Condition name -> event ids (the store's event keys), in arrival order."""
    order: list[str]
    """Condition names in arrival order, one entry per recorded (condition, event)."""
    fired: bool = False
    """Fired (or, for absence, satisfied or fired): further events of the window are ignored."""


class Firing(msgspec.Struct, frozen=True):
    """A correlated rule's condition completed (or an absence deadline passed): one run."""

    rule: str
    key: str
    instance: str
    """``f"{key}@{opened_at.isoformat()}"``: stable id of the window; one run per instance."""
    event_ids: list[int]
    """Every event that contributed, in arrival order, each once."""
    reason: Literal["complete", "absence"]
    missing: list[str] = []
    """Absence: the expected conditions that had not arrived. Otherwise empty."""


class Correlator:
    """One correlated rule, compiled: which conditions an event meets, and the state
    machine. Build with :func:`correlator` (or get them from ``RuleSet.correlated``)."""

    __slots__ = (
        "_after",
        "_by",
        "_match",
        "_need",
        "_steps",
        "_tests",
        "_within",
        "_zone",
        "kind",
        "rule",
    )

    rule: Rule
    kind: str
    """``all_of``, ``any_of``, ``n_of``, ``sequence`` or ``expect``."""

    def __init__(self, rule: Rule, compiled: CompiledRule) -> None:
        self.rule = rule
        self.kind = next(f for f in COMBINATORS if getattr(rule, f) is not None)
        self._match: Test | None = compiled.match.matches if compiled.match else None
        self._tests: tuple[tuple[str, Test], ...] = tuple(
            (name, pattern.matches) for name, pattern in compiled.on.items()
        )
        self._within: timedelta | None = parse_duration(rule.within) if rule.within else None
        self._after: timedelta | None = None
        self._by: time | None = None
        self._zone: ZoneInfo | None = None
        steps: list[str]
        if rule.n_of is not None:
            steps, need = list(dict.fromkeys(rule.n_of.of)), rule.n_of.n
        elif rule.expect is not None:
            steps = list(dict.fromkeys(rule.expect.conditions))
            need = len(steps)
            expect = rule.expect
            if expect.after is not None:
                self._after = parse_duration(expect.after)
            if expect.by is not None:
                self._by = parse_time_of_day(expect.by)
                self._zone = zone(expect.timezone or "UTC")
        else:
            steps = list(dict.fromkeys(rule.all_of or rule.any_of or rule.sequence or []))
            need = 1 if rule.any_of is not None else len(steps)
        self._steps: tuple[str, ...] = tuple(steps)
        self._need = need

    @property
    def absence(self) -> bool:
        """Whether this is an absence (``expect``) rule."""
        return self.rule.expect is not None

    def conditions(self, event: Mapping[str, Any]) -> list[str]:
        """Names of the ``on`` conditions ``event`` satisfies, in ``on`` order; none when it
        fails ``match``."""
        if self._match is not None and not self._match(event):
            return []
        return [name for name, test in self._tests if test(event)]

    def apply(
        self,
        state: CorrelationState | None,
        *,
        key: str,
        conditions: Sequence[str],
        event_id: int,
        event_time: datetime,
    ) -> tuple[CorrelationState | None, Firing | None]:
        """Fold one event into ``key``'s state; returns the new state and what fired.

        ``state`` is not modified. The state returned is None when the key has no live
        window (the store may delete its row); it is ``state`` itself when nothing changed.
        Condition names this rule does not define are ignored.
        """
        if state is not None and state.key != key:
            raise ValueError(f"state of key {state.key!r} applied to key {key!r}")
        now = as_utc(event_time)
        firing: Firing | None = None
        current = state
        if current is not None and self._overdue(current, now):
            current = _copy(current)
            firing = self._absent(current)
        if current is not None and current.window_ends is not None and now >= current.window_ends:
            current = None  # the window is over; this event may open the next one
        elif current is not None and current.fired:
            return current, firing
        counted = self._counted(current, conditions)
        if current is None and not counted:
            return None, firing
        if current is not None and all(event_id in current.seen.get(n, ()) for n in counted):
            return (state if current is state else current), firing  # nothing new
        if current is None:
            current = self._open(key, now)
        elif current is state:
            current = _copy(current)
        for name in counted:
            ids = current.seen.setdefault(name, [])
            if event_id not in ids:
                ids.append(event_id)
                current.order.append(name)
        if self._progress(current) >= self._need:
            current.fired = True
            if not self.absence:  # absence: satisfied, nothing to run
                firing = self._firing(current, "complete", [])
        return current, firing

    def on_deadline(self, state: CorrelationState, now: datetime) -> Firing | None:
        """Absence: the firing when ``now`` is at or past the deadline and expected
        conditions are missing. Marks ``state`` fired (persist it); None otherwise."""
        if not self._overdue(state, as_utc(now)):
            return None
        return self._absent(state)

    def next_deadline(self, state: CorrelationState) -> datetime | None:
        """When the store should call :meth:`on_deadline` (None: never)."""
        if not self.absence or state.fired:
            return None
        return state.deadline

    def __repr__(self) -> str:
        return f"<Correlator {self.rule.name!r} {self.kind} {list(self._steps)}>"

    # -- internals -----------------------------------------------------------------------

    def _overdue(self, state: CorrelationState, now: datetime) -> bool:
        return (
            self.absence
            and not state.fired
            and state.deadline is not None
            and now >= state.deadline
        )

    def _absent(self, state: CorrelationState) -> Firing | None:
        """Resolve an overdue watch (marks ``state`` fired)."""
        state.fired = True
        missing = [name for name in self._steps if not state.seen.get(name)]
        return self._firing(state, "absence", missing) if missing else None

    def _counted(self, state: CorrelationState | None, conditions: Sequence[str]) -> list[str]:
        if self.kind != "sequence":
            return [name for name, _ in self._tests if name in conditions]
        steps, step = self._steps, 0 if state is None else self._progress(state)
        counted = []
        while step < len(steps) and steps[step] in conditions:
            counted.append(steps[step])
            step += 1
        return counted

    def _progress(self, state: CorrelationState) -> int:
        return sum(1 for name in self._steps if state.seen.get(name))

    def _open(self, key: str, now: datetime) -> CorrelationState:
        ends = now + self._within if self._within is not None else None
        deadline = None
        if self._after is not None:
            deadline = now + self._after
        elif self._by is not None and self._zone is not None:
            deadline = next_time_of_day(now, self._by, self._zone)
        if deadline is not None and ends is not None:
            ends = max(ends, deadline)
        return CorrelationState(
            key=key, opened_at=now, window_ends=ends, deadline=deadline, seen={}, order=[]
        )

    def _firing(
        self, state: CorrelationState, reason: Literal["complete", "absence"], missing: list[str]
    ) -> Firing:
        return Firing(
            rule=self.rule.name,
            key=state.key,
            instance=f"{state.key}@{as_utc(state.opened_at).isoformat()}",
            event_ids=_arrival_order(state),
            reason=reason,
            missing=missing,
        )


def _copy(state: CorrelationState) -> CorrelationState:
    return CorrelationState(
        key=state.key,
        opened_at=state.opened_at,
        window_ends=state.window_ends,
        deadline=state.deadline,
        seen={name: list(ids) for name, ids in state.seen.items()},
        order=list(state.order),
        fired=state.fired,
    )


def _arrival_order(state: CorrelationState) -> list[int]:
    """Event ids in arrival order, each once, from ``order`` and ``seen``."""
    taken: dict[str, int] = {}
    out: dict[int, None] = {}
    for name in state.order:
        ids = state.seen.get(name, [])
        i = taken.get(name, 0)
        taken[name] = i + 1
        if i < len(ids):
            out.setdefault(ids[i], None)
    return list(out)


def correlator(rule: Rule) -> Correlator | None:
    """``rule`` compiled as a :class:`Correlator`; None for a simple rule.

    Raises :class:`~orchestrator.errors.RuleError` for the first problem of an invalid rule.
    """
    compiled, problems = validate_rule(rule)
    if problems or compiled is None:
        raise problems[0].error()
    if not rule.correlated:
        return None
    return Correlator(rule, compiled)
