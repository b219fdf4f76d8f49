"""The pattern tree: validation and the reference (closure) matcher.

``Compiler`` walks a pattern once, validating every clause, and builds a tree:

* ``Field``: ``key = [values...]``, a leaf (see :mod:`orchestrator.triggers.operators`);
* ``Nested``: ``key = { ... }``, descend into an object (any element when it is a list);
* ``Or``: ``$or = [ {...}, {...} ]``, one alternative must match the same object;
* ``Node``: all clauses of one object (AND).

Every node has ``test`` (the reference semantics: plain methods, slow, used for unusual
shapes and by tests) and ``explain`` (the first failing clause, in pattern order).
:mod:`.codegen` turns a tree into one fast function per pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.triggers.operators import MISSING, Leaf, compile_leaf
from orchestrator.triggers.predicates import OPERATORS
from orchestrator.triggers.problems import Invalid, show

__all__ = ["Clause", "Compiler", "Field", "Nested", "Node", "Or", "Test", "join"]

Test = Callable[[Mapping[str, Any]], bool]


def join(base: str, key: str) -> str:
    """Dotted path: ``join("match", "data")`` is ``match.data``; ``join("", "x")`` is ``x``."""
    return f"{base}.{key}" if base else key


class Field:
    """``key = [values...]``: a leaf."""

    __slots__ = ("key", "leaf", "path")

    def __init__(self, key: str, path: str, leaf: Leaf) -> None:
        self.key, self.path, self.leaf = key, path, leaf

    def test(self, obj: Mapping[str, Any]) -> bool:
        return self.leaf.value_test(obj.get(self.key, MISSING))

    def explain(self, obj: Mapping[str, Any]) -> str | None:
        why = self.leaf.explain_value(obj.get(self.key, MISSING))
        return None if why is None else f"{self.path}: {why}"


class Nested:
    """``key = { ... }``: descend into an object field (any element when it is a list)."""

    __slots__ = ("key", "on_missing", "path", "sub")

    def __init__(self, key: str, path: str, sub: Node) -> None:
        self.key, self.path, self.sub = key, path, sub
        # No object at this path: every leaf below is absent, a fixed answer.
        self.on_missing = sub.test({})

    def test(self, obj: Mapping[str, Any]) -> bool:
        return self.other(obj.get(self.key, MISSING))

    def other(self, value: Any) -> bool:
        """The clause applied to the field's content (any content, also absent)."""
        if isinstance(value, Mapping):
            return self.sub.test(value)
        if isinstance(value, list | tuple):
            objects = _objects(value)
            return any(map(self.sub.test, objects)) if objects else self.on_missing
        return self.on_missing

    def explain(self, obj: Mapping[str, Any]) -> str | None:
        value = obj.get(self.key, MISSING)
        if isinstance(value, Mapping):
            return self.sub.explain(value)
        objects = _objects(value) if isinstance(value, list | tuple) else []
        if not objects:
            return self.sub.explain({})
        if self.test(obj):
            return None
        first = self.sub.explain(objects[0])
        return f"{self.path}: no element of the list matches (first element: {first})"


def _objects(value: list[Any] | tuple[Any, ...]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for item in value:
        if isinstance(item, Mapping):
            out.append(item)
        elif isinstance(item, list | tuple):
            out.extend(_objects(item))
    return out


class Or:
    """``$or = [ {...}, {...} ]``: one alternative must match the same object."""

    __slots__ = ("alternatives", "path")

    def __init__(self, path: str, alternatives: list[Node]) -> None:
        self.path, self.alternatives = path, alternatives

    def test(self, obj: Mapping[str, Any]) -> bool:
        return any(alternative.test(obj) for alternative in self.alternatives)

    def explain(self, obj: Mapping[str, Any]) -> str | None:
        if self.test(obj):
            return None
        reasons = "; ".join(f"({i}) {a.explain(obj)}" for i, a in enumerate(self.alternatives))
        where = f"{self.path}: " if self.path else ""
        return f"{where}no $or alternative matches: {reasons}"


Clause = Field | Nested | Or


class Node:
    """All clauses of one pattern object (AND)."""

    __slots__ = ("clauses", "ordered")

    def __init__(self, clauses: list[Clause]) -> None:
        self.clauses = clauses
        # Cheap, selective clauses first (generated code follows this order);
        # explain() keeps the pattern order.
        self.ordered = sorted(clauses, key=_cost)

    def test(self, obj: Mapping[str, Any]) -> bool:
        return all(clause.test(obj) for clause in self.ordered)

    def explain(self, obj: Mapping[str, Any]) -> str | None:
        for clause in self.clauses:
            why = clause.explain(obj)
            if why is not None:
                return why
        return None


def _cost(clause: Clause) -> int:
    if isinstance(clause, Field):
        return 0 if clause.leaf.exact_only else 1
    return 2 if isinstance(clause, Nested) else 3


class Compiler:
    """Walks a pattern once, collecting every problem (one per leaf) instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[Invalid] = []

    def object(self, pattern: Any, loc: str, path: str, *, allow_empty: bool = False) -> Node:
        if not isinstance(pattern, Mapping):
            self.problems.append(Invalid(loc, f"expected a table of fields, got {show(pattern)}"))
            return Node([])
        if not pattern and not allow_empty:
            self.problems.append(
                Invalid(loc, "an empty table has no conditions; add fields or remove it")
            )
        clauses: list[Clause] = []
        for key, value in pattern.items():
            try:
                clauses.append(self.clause(key, value, loc, path))
            except Invalid as problem:
                self.problems.append(problem)
        return Node(clauses)

    def clause(self, key: Any, value: Any, loc: str, path: str) -> Clause:
        if not isinstance(key, str):
            raise Invalid(loc, f"field names must be strings, got {show(key)}")
        if key == "$or":
            return self.alternatives(value, join(loc, key), path)
        if key.startswith("$"):
            raise Invalid(join(loc, key), f"unknown operator {key!r}; only $or is supported")
        if key in OPERATORS:
            target = loc.rsplit(".", 1)[-1] if loc else "field"
            raise Invalid(
                loc,
                f"{key!r} is an operator, so it goes inside the value list: "
                f"{target} = [{{ {key} = ... }}]",
            )
        sub_loc, sub_path = join(loc, key), join(path, key)
        if isinstance(value, Mapping):
            return Nested(key, sub_path, self.object(value, sub_loc, sub_path))
        items = value if isinstance(value, list | tuple) else [value]
        return Field(key, sub_path, compile_leaf(items, sub_loc))

    def alternatives(self, value: Any, loc: str, path: str) -> Or:
        if not isinstance(value, list | tuple) or not value:
            raise Invalid(
                loc,
                f"$or expects a non-empty list of tables, got {show(value)}; "
                'e.g. $or = [{ type = ["a"] }, { source = ["b"] }]',
            )
        alternatives = [self.object(alt, f"{loc}[{i}]", path) for i, alt in enumerate(value)]
        return Or(path, alternatives)
