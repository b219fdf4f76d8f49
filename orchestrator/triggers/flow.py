"""A rule's flow-control settings, parsed for the store and the scheduler.

All settings apply per (rule, key), where the key is :func:`~orchestrator.triggers.key_of`
(``data.partition`` unless the rule says otherwise). They are checked when rules load;
:func:`flow_control` only converts them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, cast

import msgspec

from orchestrator.triggers.durations import parse_duration
from orchestrator.triggers.rules import Rule

__all__ = ["FlowControl", "Overlap", "flow_control"]

Overlap = Literal["queue", "skip", "cancel_running"]


class FlowControl(msgspec.Struct, frozen=True):
    """How runs of one rule are collected, limited and ordered, per key.

    Defaults (all None, ``queue``, ``0``) mean: one run per trigger, no limit.
    """

    debounce: timedelta | None = None
    """Coalesce the key's events; the run starts this long after the LAST one and receives
    all of them."""
    batch_max_events: int | None = None
    """Start the collecting run once it holds this many events."""
    batch_max_wait: timedelta | None = None
    """Start the collecting run this long after its FIRST event."""
    concurrency: int | None = None
    """At most this many runs of the rule per key running at once; others wait (pending)."""
    on_overlap: Overlap = "queue"
    """A new run while one of the same rule and key is pending or running: ``queue`` (wait
    its turn), ``skip`` (the new run is not created), ``cancel_running`` (the older ones are
    cancelled)."""
    priority: int = 0
    """Higher runs first when capacity is short."""

    @property
    def collects(self) -> bool:
        """Whether events are collected into one run (debounce or batch)."""
        return (
            self.debounce is not None
            or self.batch_max_events is not None
            or self.batch_max_wait is not None
        )


def flow_control(rule: Rule) -> FlowControl:
    """``rule``'s flow control, durations parsed. Raises ``ValueError`` for a rule that
    did not pass validation (a bad duration or on_overlap)."""
    if rule.on_overlap not in ("queue", "skip", "cancel_running"):
        raise ValueError(f"on_overlap must be queue, skip or cancel_running: {rule.on_overlap!r}")
    batch = rule.batch
    return FlowControl(
        debounce=parse_duration(rule.debounce) if rule.debounce is not None else None,
        batch_max_events=batch.max_events if batch is not None else None,
        batch_max_wait=(
            parse_duration(batch.max_wait)
            if batch is not None and batch.max_wait is not None
            else None
        ),
        concurrency=rule.concurrency,
        on_overlap=cast(Overlap, rule.on_overlap),
        priority=rule.priority,
    )
