"""EventBridge-style event patterns, compiled once.

A pattern is an object whose keys are event fields. Every key must match (AND):

* a list (or, as a convenience, a single scalar) is a *leaf*: the field's value must match
  one of the items (see :mod:`orchestrator.triggers.operators`);
* an object descends into the field (``data = { dataset = [...] }``);
* ``$or`` holds a list of sub-patterns over the same object; one of them must match.

:func:`compile_pattern` validates the whole pattern and returns a :class:`CompiledPattern`:
``matches`` is one generated function (:mod:`.codegen`) that never looks at the pattern
again; ``explain`` names the first failing clause in pattern order (slower; for
``rules explain`` and tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.errors import RuleError
from orchestrator.triggers.codegen import generate
from orchestrator.triggers.nodes import Compiler, Node, Test
from orchestrator.triggers.problems import Invalid, render, show

__all__ = ["CompiledPattern", "compile_pattern", "compile_problems"]


class CompiledPattern:
    """A validated pattern.

    ``matches(event)`` is a plain function call returning a bool; ``explain(event)`` returns
    None when the event matches, else the first failing clause in pattern order, e.g.
    ``"data.dataset: 'demo.customers' is not one of ['demo.orders']"``.
    """

    __slots__ = ("_root", "matches", "pattern")

    matches: Test
    pattern: Mapping[str, Any]

    def __init__(self, root: Node, pattern: Mapping[str, Any]) -> None:
        self._root = root
        self.matches = generate(root)
        self.pattern = pattern

    @property
    def root(self) -> Node:
        """The validated pattern tree (:mod:`.nodes`)."""
        return self._root

    @property
    def reference(self) -> Test:
        """The closure-tree matcher ``matches`` was generated from (same answers, slower)."""
        return self._root.test

    def explain(self, event: Mapping[str, Any]) -> str | None:
        """None when ``event`` matches, else why not (the first failing clause)."""
        return self._root.explain(event)

    def __repr__(self) -> str:
        return f"CompiledPattern({show(self.pattern)})"


def compile_problems(
    pattern: Any, *, where: str = "", allow_empty: bool = False
) -> tuple[CompiledPattern | None, list[Invalid]]:
    """Compile ``pattern`` and return every problem found (field paths start with ``where``).

    The pattern is None when there are problems. ``allow_empty`` accepts ``{}``, which
    matches every event; the rule index uses it for what is left after an indexed clause.
    """
    if not isinstance(pattern, Mapping):
        return None, [Invalid(where, f"expected a table of fields, got {show(pattern)}")]
    if not pattern and not allow_empty:
        message = (
            "the pattern is empty, so it would match every event; add at least one "
            'condition, e.g. type = ["data.arrived"]'
        )
        return None, [Invalid(where, message)]
    compiler = Compiler()
    root = compiler.object(pattern, where, "", allow_empty=allow_empty)
    if compiler.problems:
        return None, compiler.problems
    return CompiledPattern(root, pattern), []


def compile_pattern(pattern: Mapping[str, Any], *, where: str = "") -> CompiledPattern:
    """Validate and compile ``pattern``; raise :class:`RuleError` on the first problem.

    ``where`` prefixes field paths in messages and in ``RuleError.field``: with
    ``where="match"`` a bad ``data.rows`` is reported as
    ``field 'match.data.rows': numeric expects ...``.
    """
    compiled, problems = compile_problems(pattern, where=where)
    if compiled is None:
        first = problems[0]
        raise RuleError(render(first.message, field=first.field), field=first.field)
    return compiled
