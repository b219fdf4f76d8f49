"""How problems in rules are named: file, rule, field, then the fact and the fix.

Every rule problem renders the same way, whether it is raised (:class:`RuleError`, first
problem only) or collected (:class:`RuleProblem`, all problems, for ``rules check``)::

    rules.toml: rule 'daily' field 'match.data.rows': numeric expects ...

Parts that are unknown are left out (a pattern compiled from Python has no file).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from orchestrator.errors import RuleError

__all__ = ["Invalid", "RuleProblem", "kind", "render", "rule_label", "show"]

_UNNAMED = re.compile(r"#[0-9]+")


def rule_label(name: str, position: int) -> str:
    """A rule's label: its name, or ``#N`` (1-based position in its file) when it has none."""
    return name if name else f"#{position}"


def _show_rule(label: str) -> str:
    return label if _UNNAMED.fullmatch(label) else repr(label)


def render(message: str, *, file: str = "", rule: str = "", field: str = "") -> str:
    """``file: rule R field 'F': message`` with absent parts omitted."""
    where = []
    if file:
        where.append(f"{file}:")
    if rule:
        where.append(f"rule {_show_rule(rule)}")
    if field:
        where.append(f"field {field!r}")
    if not where:
        return message
    head = " ".join(where)
    return f"{head} {message}" if head.endswith(":") else f"{head}: {message}"


class RuleProblem(msgspec.Struct, frozen=True):
    """One problem found in a rules file. ``str()`` gives the full one-line message.

    ``rule`` is the rule's name, or ``#3`` for the third rule of a file when it has none
    (rendered ``rule 'daily'`` / ``rule #3``); ``field`` is the
    dotted path inside the rule (``match.data.rows``), empty for whole-file problems.
    """

    file: str
    rule: str
    field: str
    message: str

    def __str__(self) -> str:
        return render(self.message, file=self.file, rule=self.rule, field=self.field)

    def error(self) -> RuleError:
        """This problem as a :class:`RuleError` (the message is :meth:`__str__`)."""
        return RuleError(str(self), file=self.file, rule=self.rule, field=self.field)


class Invalid(Exception):
    """Raised inside compilation; carries the dotted field path and the bare message.

    Internal: it never leaves the package (it becomes a RuleProblem or a RuleError)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def show(value: Any) -> str:
    """A value as messages print it: strings quoted, null/true/false as in JSON and TOML."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def kind(value: Any) -> str:
    """A value's type as messages name it: string, number, boolean, null, table, list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__
