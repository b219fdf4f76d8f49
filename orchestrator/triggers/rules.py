"""Trigger rules: which pipeline runs when an event matches a pattern.

A :class:`Rule` is a frozen msgspec Struct, built from a ``[[rule]]`` table of a rules file
or directly in Python. New capabilities (correlation, windows, flow control) will arrive as
new fields with defaults, so existing rules files keep their meaning.
"""

from __future__ import annotations

from typing import Any

import msgspec

from orchestrator.triggers.patterns import CompiledPattern, compile_problems
from orchestrator.triggers.problems import RuleProblem

__all__ = ["Explanation", "Rule", "validate_rule"]


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Run ``pipeline`` with ``params`` for every event that ``match`` selects."""

    name: str
    """Unique among all loaded rules; names the rule in runs, state and messages."""
    pipeline: str
    """The pipeline to run, as named in the config's pipeline list."""
    match: dict[str, Any]
    """An EventBridge-style pattern over the event (see ``docs/rules.md``)."""
    priority: int = 0
    """Passed to the scheduler; higher runs first when capacity is short. Default 0."""
    params: dict[str, Any] = {}
    """Static parameters given to every run of this rule. Default none."""
    description: str = ""
    """Free text for people; shown by ``rules check`` and ``rules explain``."""
    enabled: bool = True
    """A disabled rule is loaded and checked but never matches. Default true."""


class Explanation(msgspec.Struct, frozen=True):
    """Whether one rule matches an event, and if not, the first clause that failed."""

    rule: str
    matched: bool
    reason: str
    """``"matched"``, or e.g. ``"data.dataset: 'demo.customers' is not one of ['demo.orders']"``."""


def validate_rule(
    rule: Rule, *, file: str = "", label: str = ""
) -> tuple[CompiledPattern | None, list[RuleProblem]]:
    """Check what a Struct's types cannot: non-empty names, a valid non-empty pattern.

    Returns the compiled pattern (None when there are problems) and every problem found.
    ``label`` names the rule in problems (default: its name).
    """
    label = label or rule.name
    problems: list[RuleProblem] = []

    def problem(field: str, message: str) -> None:
        problems.append(RuleProblem(file=file, rule=label, field=field, message=message))

    if not isinstance(rule.name, str) or not rule.name.strip():
        problem("name", f"expected a non-empty name, got {rule.name!r}; give every rule a name")
    if not isinstance(rule.pipeline, str) or not rule.pipeline.strip():
        problem(
            "pipeline", f"expected a pipeline name, got {rule.pipeline!r}; name the pipeline to run"
        )
    if not isinstance(rule.match, dict):
        problem("match", f"expected a table, got {type(rule.match).__name__}")
        return None, problems
    if not rule.match:
        problem(
            "match",
            "match is empty, so the rule would fire on every event; add at least one "
            'condition, e.g. type = ["data.arrived"]',
        )
        return None, problems
    compiled, invalid = compile_problems(rule.match, where="match")
    for item in invalid:
        problem(item.field, item.message)
    return (None if problems else compiled), problems
