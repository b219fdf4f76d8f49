"""Checking a rule beyond its field types, and compiling its patterns.

:func:`validate_rule` returns every problem, each naming the dotted field and stating the
fix, and the compiled patterns when there are none. The loader, :class:`RuleSet` and
:func:`~orchestrator.triggers.correlator` all go through it, so a rule built in Python is
held to the same rules as one read from a file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from orchestrator.triggers.durations import parse_duration, parse_time_of_day, zone
from orchestrator.triggers.patterns import CompiledPattern, compile_problems
from orchestrator.triggers.problems import RuleProblem, show
from orchestrator.triggers.rules import COMBINATORS, Batch, Expect, NOf, Rule
from orchestrator.triggers.templates import is_path, template_problem

__all__ = ["OVERLAP", "CompiledRule", "validate_rule"]

OVERLAP = ("queue", "skip", "cancel_running")

_Problem = Callable[[str, str], None]


class CompiledRule(NamedTuple):
    """A valid rule's compiled patterns: ``match`` (None when empty) and each ``on`` one."""

    match: CompiledPattern | None
    on: dict[str, CompiledPattern]


def validate_rule(
    rule: Rule, *, file: str = "", label: str = "", patterns_only: bool = False
) -> tuple[CompiledRule | None, list[RuleProblem]]:
    """Check what a Struct's types cannot; compile ``match`` and every ``on`` pattern.

    Returns the compiled patterns (None when there are problems) and every problem found.
    ``label`` names the rule in problems (default: its name). ``patterns_only`` checks the
    patterns alone (the loader's choice when other fields already have the wrong type).
    """
    label = label or rule.name
    problems: list[RuleProblem] = []

    def problem(field: str, message: str) -> None:
        problems.append(RuleProblem(file=file, rule=label, field=field, message=message))

    if not patterns_only:
        if not isinstance(rule.name, str) or not rule.name.strip():
            problem("name", f"expected a non-empty name, got {rule.name!r}; give every rule a name")
        if not isinstance(rule.pipeline, str) or not rule.pipeline.strip():
            problem(
                "pipeline",
                f"expected a pipeline name, got {rule.pipeline!r}; name the pipeline to run",
            )
    correlated = rule.correlated
    match = _match(rule.match, problem, required=not correlated)
    on = _on(rule.on, problem) if isinstance(rule.on, Mapping) and rule.on else {}
    if not isinstance(rule.on, Mapping):
        problem("on", f"expected a table of named conditions, got {show(rule.on)}")
    if not patterns_only:
        if correlated:
            _combination(rule, problem)
        elif rule.within is not None:
            problem(
                "within",
                "within is the window of a correlated rule; add conditions (on + all_of, any_of, "
                "n_of or sequence) or remove it",
            )
        _key(rule.key, problem)
        _flow(rule, problem)
        _templates(rule.params, "params", problem)
    if problems:
        return None, problems
    return CompiledRule(match, on), []


def _match(pattern: Any, problem: _Problem, *, required: bool) -> CompiledPattern | None:
    if not isinstance(pattern, dict):
        problem("match", f"expected a table, got {type(pattern).__name__}")
        return None
    if not pattern:
        if required:
            problem(
                "match",
                "match is empty, so the rule would fire on every event; add at least one "
                'condition, e.g. type = ["data.arrived"]',
            )
        return None
    compiled, invalid = compile_problems(pattern, where="match")
    for item in invalid:
        problem(item.field, item.message)
    return compiled


def _on(conditions: Mapping[str, Any], problem: _Problem) -> dict[str, CompiledPattern]:
    out: dict[str, CompiledPattern] = {}
    for name, pattern in conditions.items():
        field = f"on.{name}"
        if not isinstance(name, str) or not name.strip():
            problem("on", f"a condition needs a name, got {show(name)}")
            continue
        if isinstance(pattern, Mapping) and not pattern:
            problem(
                field,
                "the pattern is empty, so every event would satisfy the condition; add at "
                'least one field, e.g. data.dataset = ["sales.orders"]',
            )
            continue
        compiled, invalid = compile_problems(pattern, where=field)
        for item in invalid:
            problem(item.field, item.message)
        if compiled is not None:
            out[name] = compiled
    return out


def _names(value: Any, field: str, problem: _Problem) -> list[str] | None:
    """A list of condition names, or None after reporting why it is not one."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        problem(field, f"expected a list of condition names, got {show(value)}")
        return None
    if not value:
        problem(field, 'expected at least one condition name, e.g. ["orders"]')
        return None
    return list(value)


def _known(names: Sequence[str], field: str, defined: Sequence[str], problem: _Problem) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    for name in repeated:
        problem(field, f"lists {name!r} more than once; name each condition once")
    if not defined:
        return  # already reported: 'on' defines no conditions
    for name in dict.fromkeys(names):
        if name in defined:
            continue
        close = difflib.get_close_matches(name, list(defined), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(defined) if defined else "none"
        problem(
            field,
            f"unknown condition {name!r}; {hint}conditions are defined as [rule.on.NAME] "
            f"patterns (defined: {listed})",
        )


def _combination(rule: Rule, problem: _Problem) -> None:
    given = [f for f in COMBINATORS if getattr(rule, f) is not None]
    defined = [n for n in rule.on if isinstance(n, str)] if isinstance(rule.on, Mapping) else []
    if not given:
        problem(
            "on",
            "conditions need a way to combine them: add one of all_of, any_of, n_of, "
            "sequence (fire when they arrive) or expect (fire when they do not)",
        )
        return
    for extra in given[1:]:
        problem(
            extra,
            f"{given[0]} and {extra} are both given; a rule combines its conditions one way, "
            "so keep one (or write two rules)",
        )
    if not rule.on:
        problem(
            "on",
            f"{given[0]} refers to conditions, so define them: [rule.on.NAME] tables, each a "
            'pattern like data.dataset = ["sales.orders"]',
        )
    used: list[str] = []
    for field in ("all_of", "any_of", "sequence"):
        value = getattr(rule, field)
        if value is None:
            continue
        names = _names(value, field, problem)
        if names is not None:
            _known(names, field, defined, problem)
            used += names
    if rule.n_of is not None:
        used += _n_of(rule.n_of, defined, problem)
    if rule.within is not None:
        _duration(rule.within, "within", problem)
    if rule.expect is not None:
        _expect(rule.expect, defined, problem)
        return  # every condition of an absence rule opens the watch: none is unused
    if rule.on and given[0] != "expect":
        for name in defined:
            if name not in used:
                problem(
                    f"on.{name}",
                    f"condition {name!r} is defined but never used; name it in {given[0]} "
                    "or remove it",
                )


def _n_of(n_of: Any, defined: Sequence[str], problem: _Problem) -> list[str]:
    if not isinstance(n_of, NOf):
        problem("n_of", f"expected a table like {{ n = 2, of = [...] }}, got {show(n_of)}")
        return []
    names = _names(n_of.of, "n_of.of", problem)
    if names is None:
        return []
    _known(names, "n_of.of", defined, problem)
    size = len(set(names))
    if isinstance(n_of.n, bool) or not isinstance(n_of.n, int) or not 1 <= n_of.n <= size:
        problem(
            "n_of.n",
            f"expected a whole number from 1 to {size} (the number of conditions in "
            f"n_of.of), got {show(n_of.n)}",
        )
    return names


def _expect(expect: Any, defined: Sequence[str], problem: _Problem) -> None:
    if not isinstance(expect, Expect):
        problem(
            "expect",
            f'expected a table like {{ conditions = [...], after = "3h" }}, got {show(expect)}',
        )
        return
    names = _names(expect.conditions, "expect.conditions", problem)
    if names is not None:
        _known(names, "expect.conditions", defined, problem)
        if defined and set(defined) <= set(names):
            problem(
                "expect.conditions",
                "every condition in 'on' is expected, so the first event would satisfy the "
                "watch and it could never fire; add a condition that opens the watch (the "
                "event after which the others are due)",
            )
    if (expect.after is None) == (expect.by is None):
        problem(
            "expect",
            "give exactly one of after (a duration after the first related event, e.g. "
            'after = "3h") or by (a time of day, e.g. by = "02:00")',
        )
    if expect.after is not None:
        _duration(expect.after, "expect.after", problem)
        if expect.timezone is not None:
            problem("expect.timezone", "timezone applies to expect.by only; remove it")
    if expect.by is not None:
        try:
            parse_time_of_day(expect.by)
        except ValueError as exc:
            problem("expect.by", str(exc))
    if expect.timezone is not None:
        try:
            zone(expect.timezone)
        except ValueError as exc:
            problem("expect.timezone", str(exc))


def _duration(value: Any, field: str, problem: _Problem) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        problem(field, str(exc))


def _key(key: Any, problem: _Problem) -> None:
    if not is_path(key):
        problem(
            "key",
            f"expected a dotted path into the event like 'data.partition', got {show(key)}",
        )


def _flow(rule: Rule, problem: _Problem) -> None:
    if rule.debounce is not None:
        _duration(rule.debounce, "debounce", problem)
    batch = rule.batch
    if batch is not None:
        if not isinstance(batch, Batch):
            problem(
                "batch",
                f'expected a table like {{ max_events = 100, max_wait = "5m" }}, got {show(batch)}',
            )
        else:
            if batch.max_events is None and batch.max_wait is None:
                problem(
                    "batch",
                    'give max_events, max_wait or both, e.g. { max_events = 100, max_wait = "5m" }',
                )
            if batch.max_events is not None and not _at_least_one(batch.max_events):
                problem(
                    "batch.max_events",
                    f"expected a whole number of at least 1, got {show(batch.max_events)}",
                )
            if batch.max_wait is not None:
                _duration(batch.max_wait, "batch.max_wait", problem)
        if rule.debounce is not None:
            problem(
                "batch",
                "debounce and batch both collect a key's events into one run; keep one",
            )
    if rule.concurrency is not None and not _at_least_one(rule.concurrency):
        problem(
            "concurrency",
            f"expected a whole number of at least 1, got {show(rule.concurrency)}; "
            "leave it out for no limit",
        )
    if rule.on_overlap not in OVERLAP:
        close = difflib.get_close_matches(str(rule.on_overlap), OVERLAP, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problem(
            "on_overlap",
            f"expected one of 'queue', 'skip', 'cancel_running', got {show(rule.on_overlap)}{hint}",
        )


def _at_least_one(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _templates(value: Any, field: str, problem: _Problem) -> None:
    if isinstance(value, str):
        why = template_problem(value)
        if why is not None:
            problem(field, why)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _templates(v, f"{field}.{k}", problem)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _templates(v, f"{field}[{i}]", problem)
