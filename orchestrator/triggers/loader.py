"""Reading rules files (TOML): ``load_rules`` for the daemon, ``check_rules`` for people.

A rules file is a list of ``[[rule]]`` tables::

    [[rule]]
    name = "orders-rollup"
    pipeline = "orders"
    [rule.match]
    type = ["data.arrived"]
    data.dataset = ["demo.orders"]

Both functions see the same problems; :func:`load_rules` raises the first as a
:class:`~orchestrator.errors.RuleError`, :func:`check_rules` returns all of them. Every
problem names the file, the rule (``#3`` when it has no name) and the dotted field.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from orchestrator.triggers.index import RuleSet, assemble
from orchestrator.triggers.problems import RuleProblem, rule_label, show
from orchestrator.triggers.rules import Rule
from orchestrator.triggers.validation import CompiledRule, validate_rule

__all__ = ["check_rules", "load_rules"]

_FIELDS = {f.name: f for f in msgspec.structs.fields(Rule)}
_EXPECTED: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    dict[str, Any]: "a table",
    list[str]: "a list of strings",
}
_BAD: Any = object()
"""A value that failed conversion (its problem is already reported)."""


def load_rules(paths: Sequence[str | Path]) -> RuleSet:
    """Load and compile every rule of ``paths``, in order; raise ``RuleError`` on the first
    problem (file, rule and field in the message and as attributes)."""
    loaded, problems = _load(paths, None)
    if problems:
        raise problems[0].error()
    rules = tuple(item.rule for item in loaded)
    patterns = tuple(item.pattern for item in loaded)
    return assemble(rules, patterns)


def check_rules(
    paths: Sequence[str | Path], pipelines: Collection[str] | None = None
) -> list[RuleProblem]:
    """Every problem in ``paths``, in file and rule order (empty when all is well).

    With ``pipelines``, a rule naming a pipeline not in it is a problem too.
    """
    return _load(paths, pipelines)[1]


class _Loaded(NamedTuple):
    file: str
    label: str
    rule: Rule
    pattern: CompiledRule


class _Context(NamedTuple):
    file: str
    problems: list[RuleProblem]
    pipelines: Collection[str] | None


def _load(
    paths: Sequence[str | Path], pipelines: Collection[str] | None
) -> tuple[list[_Loaded], list[RuleProblem]]:
    loaded: list[_Loaded] = []
    problems: list[RuleProblem] = []
    first_seen: dict[str, _Loaded] = {}
    for path in paths:
        file = str(path)
        for item in _read(_Context(file, problems, pipelines)):
            earlier = first_seen.get(item.rule.name)
            if earlier is None:
                first_seen[item.rule.name] = item
                loaded.append(item)
                continue
            where = "earlier in this file" if earlier.file == file else f"in {earlier.file}"
            problems.append(
                RuleProblem(
                    file=file,
                    rule=item.label,
                    field="name",
                    message=f"the name {item.rule.name!r} is already used by a rule {where}; "
                    "rule names must be unique",
                )
            )
    return loaded, problems


def _unknown_pipeline(name: str, known: Collection[str]) -> str:
    message = f"unknown pipeline {name!r}"
    ordered = sorted(known)
    close = difflib.get_close_matches(name, ordered, n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    if not ordered:
        return f"{message}; no pipelines are configured"
    listed = ", ".join(ordered[:10]) + (", ..." if len(ordered) > 10 else "")
    return f"{message}; known pipelines: {listed}"


def _read(ctx: _Context) -> list[_Loaded]:
    file, problems = ctx.file, ctx.problems

    def whole_file(message: str) -> list[_Loaded]:
        problems.append(RuleProblem(file=file, rule="", field="", message=message))
        return []

    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        return whole_file(f"cannot read the rules file: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        return whole_file(f"is not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return whole_file(f"is not valid TOML: {exc}")
    for key in document:
        if key != "rule":
            problems.append(
                RuleProblem(
                    file=file,
                    rule="",
                    field=key,
                    message=f"unknown top-level key {key!r}; rules go in [[rule]] tables",
                )
            )
    tables = document.get("rule", [])
    if isinstance(tables, dict):
        return whole_file("'rule' is a single table; write each rule as [[rule]], not [rule]")
    if not isinstance(tables, list):
        return whole_file(f"'rule' must be a list of [[rule]] tables, got {show(tables)}")
    out: list[_Loaded] = []
    for position, table in enumerate(tables, 1):
        item = _rule(ctx, position, table)
        if item is not None:
            out.append(item)
    return out


def _rule(ctx: _Context, position: int, table: Any) -> _Loaded | None:
    file, problems = ctx.file, ctx.problems
    name = table.get("name") if isinstance(table, dict) else None
    label = rule_label(name if isinstance(name, str) else "", position)

    def problem(field: str, message: str) -> None:
        problems.append(RuleProblem(file=file, rule=label, field=field, message=message))

    if not isinstance(table, dict):
        problem("", f"expected a [[rule]] table, got {show(table)}")
        return None
    before = len(problems)
    values: dict[str, Any] = {}
    for key, value in table.items():
        info = _FIELDS.get(key)
        if info is None:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problem(key, f"unknown key {key!r}; {hint}known keys: {', '.join(_FIELDS)}")
            continue
        converted = _convert(value, info.type, key, problem)
        if converted is not _BAD:
            values[key] = converted
    for key, info in _FIELDS.items():
        if info.required and key not in table:
            problem(key, f"missing required key {key!r}")
    pipeline = values.get("pipeline")
    if ctx.pipelines is not None and isinstance(pipeline, str) and pipeline not in ctx.pipelines:
        problem("pipeline", _unknown_pipeline(pipeline, ctx.pipelines))
    if len(problems) > before:
        # still report pattern problems alongside the others
        patterns = {k: values[k] for k in ("match", "on") if k in values}
        if patterns:
            stub = Rule(name="-", pipeline="-", **patterns)
            problems.extend(validate_rule(stub, file=file, label=label, patterns_only=True)[1])
        return None
    rule = Rule(**values)
    if "match" not in table and not rule.correlated:
        problem(
            "match",
            "missing required key 'match' (the pattern that selects events); or define "
            "conditions with on + all_of, any_of, n_of, sequence or expect",
        )
        return None
    pattern, found = validate_rule(rule, file=file, label=label)
    problems.extend(found)
    if pattern is None or found:
        return None
    return _Loaded(file=file, label=label, rule=rule, pattern=pattern)


def _convert(value: Any, kind: Any, field: str, problem: Callable[[str, str], None]) -> Any:
    """``value`` as type ``kind`` (a field type of Rule), or ``_BAD`` after reporting why.

    Tables that become Structs (``n_of``, ``expect``, ``batch``) and named tables (``on``)
    are checked key by key, so problems name the inner field (``n_of.n``, ``on.orders``).
    """
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if isinstance(kind, types.UnionType) and len(args) == 1:
        kind = args[0]  # X | None: TOML has no null, so the value is an X
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        if not isinstance(value, dict):
            problem(field, f"expected a table, got {show(value)}")
            return _BAD
        fields = {f.name: f for f in msgspec.structs.fields(kind)}
        values: dict[str, Any] = {}
        for key, item in value.items():
            info = fields.get(key)
            if info is None:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problem(
                    f"{field}.{key}",
                    f"unknown key {key!r} in {field}; {hint}known keys: {', '.join(fields)}",
                )
                continue
            values[key] = _convert(item, info.type, f"{field}.{key}", problem)
        missing = [k for k, info in fields.items() if info.required and k not in value]
        for key in missing:
            problem(f"{field}.{key}", f"missing required key {key!r} in {field}")
        if missing or len(values) < len(value) or any(v is _BAD for v in values.values()):
            return _BAD
        return kind(**values)
    if kind == dict[str, dict[str, Any]]:
        if not isinstance(value, dict):
            problem(field, f"expected a table of named conditions, got {show(value)}")
            return _BAD
        bad = False
        for name, pattern in value.items():
            if not isinstance(pattern, dict):
                problem(
                    f"{field}.{name}",
                    f"expected a pattern (a table of event fields), got {show(pattern)}",
                )
                bad = True
        return _BAD if bad else value
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError:
        expected = _EXPECTED.get(kind, str(kind))
        problem(field, f"expected {expected}, got {show(value)}")
        return _BAD
