"""Trigger rules: which pipeline runs when an event matches a pattern, or when several
related events (or the lack of one) complete a condition.

A :class:`Rule` is a frozen msgspec Struct, built from a ``[[rule]]`` table of a rules file
or directly in Python. Capabilities arrive as new fields with defaults, so older rules files
keep their meaning. A rule is one of two kinds:

* *simple*: ``match`` selects events; each selected event starts a run;
* *correlated*: ``on`` names conditions (each a pattern) and exactly one of ``all_of``,
  ``any_of``, ``n_of``, ``sequence`` or ``expect`` says when related events (same ``key``)
  complete it. ``match``, when given, is a filter every event must pass first.

Flow control (``debounce``, ``batch``, ``concurrency``, ``on_overlap``, ``priority``) applies
to both kinds. :mod:`.validation` checks what the field types cannot.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["COMBINATORS", "Batch", "Expect", "Explanation", "NOf", "Rule"]

COMBINATORS = ("all_of", "any_of", "n_of", "sequence", "expect")
"""The fields that say how a correlated rule combines its conditions (exactly one)."""


class NOf(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``n_of = { n = 2, of = ["a", "b", "c"] }``: any ``n`` of the conditions ``of``."""

    n: int
    """How many different conditions of ``of`` must arrive, 1 to ``len(of)``."""
    of: list[str]
    """Condition names, defined in ``on``."""


class Expect(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``expect``: fire when ``conditions`` have NOT all arrived by a deadline.

    The deadline is anchored at the first related event of the key (any ``on`` condition):
    ``after`` a duration, or ``by`` the next wall-clock time in ``timezone``. Exactly one of
    ``after`` and ``by``.
    """

    conditions: list[str]
    """The conditions that must arrive (names defined in ``on``)."""
    after: str | None = None
    """A duration after the first related event, e.g. ``"3h"``."""
    by: str | None = None
    """A time of day, ``"HH:MM"`` (24-hour): the first one strictly after the first event."""
    timezone: str | None = None
    """IANA zone for ``by``, e.g. ``"Europe/Paris"``. Default UTC. Only with ``by``."""


class Batch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``batch = { max_events = 100, max_wait = "5m" }``: collect events per key into one
    run; it starts when ``max_events`` are collected or ``max_wait`` after the first one,
    whichever comes first. At least one of the two."""

    max_events: int | None = None
    """Start the run once this many events are collected (at least 1)."""
    max_wait: str | None = None
    """Start the run this long after the first collected event (a duration)."""


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Run ``pipeline`` with ``params`` when ``match`` selects an event (simple rule), or
    when related events complete the conditions in ``on`` (correlated rule)."""

    name: str
    """Unique among all loaded rules; names the rule in runs, state and messages."""
    pipeline: str
    """The pipeline to run, as named in the config's pipeline list."""
    match: dict[str, Any] = {}
    """An EventBridge-style pattern over the event (see ``docs/rules.md``). Required (and
    non-empty) for simple rules; an extra filter on correlated rules. Default none."""
    priority: int = 0
    """Passed to the scheduler; higher runs first when capacity is short. Default 0."""
    params: dict[str, Any] = {}
    """Parameters given to every run; ``{data.partition}`` placeholders are filled from the
    triggering event (:func:`~orchestrator.triggers.render_params`). Default none."""
    description: str = ""
    """Free text for people; shown by ``rules check`` and ``rules explain``."""
    enabled: bool = True
    """A disabled rule is loaded and checked but never matches. Default true."""
    key: str = "data.partition"
    """Dotted path into the event: correlation key, and the key of flow control."""
    on: dict[str, dict[str, Any]] = {}
    """Named conditions of a correlated rule, each an EventBridge-style pattern."""
    all_of: list[str] | None = None
    """Fire once every named condition has arrived for the key (within the window)."""
    any_of: list[str] | None = None
    """Fire on the first of the named conditions, once per key and window."""
    n_of: NOf | None = None
    """Fire once ``n`` different conditions of ``of`` have arrived."""
    sequence: list[str] | None = None
    """Fire once the conditions have arrived in this order (others do not count)."""
    within: str | None = None
    """The window, measured from the first counted event of the key, e.g. ``"2h"``.
    Default: no window (once fired, the key never fires again)."""
    expect: Expect | None = None
    """Absence: fire when these conditions have not arrived by a deadline."""
    debounce: str | None = None
    """Coalesce a key's events; the run starts this long after the last one, with all."""
    batch: Batch | None = None
    """Collect a key's events into runs of up to ``max_events`` / ``max_wait``."""
    concurrency: int | None = None
    """At most this many runs of the rule per key at once; others wait. Default no limit."""
    on_overlap: str = "queue"
    """``queue``, ``skip`` or ``cancel_running``: what a new run does while one of the same
    rule and key is pending or running. Default ``queue``."""
    contract: Literal["block", "flag"] = "block"
    """What an event that breaks its dataset's data contract does for this rule: ``block``
    (default) starts nothing; ``flag`` starts the run with ``contract_error`` in its params."""

    @property
    def correlated(self) -> bool:
        """Whether this is a correlated rule (``on`` or a combinator is given)."""
        return bool(self.on) or any(getattr(self, f) is not None for f in COMBINATORS)


class Explanation(msgspec.Struct, frozen=True):
    """Whether one rule matches an event, and if not, the first clause that failed.

    For a correlated rule ``matched`` means the event contributes a condition for a key."""

    rule: str
    matched: bool
    reason: str
    """``"matched"``, or e.g. ``"data.dataset: 'demo.customers' is not one of ['demo.orders']"``."""
