"""Turn a pattern tree into one Python function, so matching a rule is a single call.

The closure tree in :mod:`.nodes` costs a call per clause, per nesting level and per
operator. Here a tree becomes straight-line code for the shapes events really have
(objects are dicts, values are scalars)::

    def match(o0, M=MISSING, NUM=..., SCALAR=..., c0="type", c1=frozenset({"data.arrived"}), ...):
        v1 = o0.get(c0, M)                       # type = ["data.arrived"]
        if v1.__class__ is str:
            if not (v1 in c1): return False
        elif not c2(v1): return False            # lists, absent, other types: Leaf.value_test
        v2 = o0.get(c3, M)                       # data = { rows = [{ numeric = [">", 0] }] }
        if v2.__class__ is dict:
            ...
        elif not c8(v2): return False            # not a dict: Nested.other
        return True

Anything else takes the reference closures, so both paths give the same answers (a test
checks this on random patterns and events). The source never contains user text: field
names and values are bound as parameter defaults, and code is compiled once per source,
so rules of the same shape share one code object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from types import FunctionType
from typing import Any

from orchestrator.triggers.nodes import Field, Nested, Node, Or, Test
from orchestrator.triggers.operators import MISSING

__all__ = ["Group", "generate", "generate_group"]

Group = Callable[[Mapping[str, Any], Callable[[int], None]], None]

_GUARDS = {
    "str": "{v}.__class__ is str",
    "num": "{v}.__class__ in NUM",
    "scalar": "{v}.__class__ in SCALAR",
}
_FIXED = {
    "M": MISSING,
    "NUM": frozenset({int, float}),
    "SCALAR": frozenset({str, int, float, bool, type(None)}),
}


def generate(node: Node) -> Test:
    """One function equivalent to ``node.test``."""
    writer = _Writer(fail="return False")
    writer.node(node, "o0", 1)
    test: Test = writer.build("match", "o0", [*writer.lines, "    return True"])
    return test


def generate_group(members: Sequence[tuple[int, Node]]) -> Group:
    """One function for several patterns: ``group(event, append)`` calls ``append(i)`` for
    each member ``(i, node)`` whose node matches, in member order.

    A top-level field that several members test is read once, before the members (reading
    a field has no effect, so reading it for a member that fails earlier changes nothing).
    """
    writer = _Writer(fail="break")
    uses: dict[str, int] = {}
    for _, node in members:
        for key in {c.key for c in node.ordered if isinstance(c, Field | Nested)}:
            uses[key] = uses.get(key, 0) + 1
    for key, count in uses.items():
        if count > 1:
            value = writer.var()
            writer.emit(1, f"{value} = o0.get({writer.const(key)}, M)")
            writer.shared[key] = value
    for index, node in members:
        writer.emit(1, "while True:")  # a block to break out of: 'break' means no match
        writer.node(node, "o0", 2)
        writer.emit(2, f"append({writer.const(index)})")
        writer.emit(2, "break")
    if not members:
        writer.emit(1, "pass")
    group: Group = writer.build("group", "o0, append", writer.lines)
    return group


@lru_cache(maxsize=4096)
def _template(source: str) -> FunctionType:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<trigger pattern>", "exec"), namespace)  # source holds no user text
    template: FunctionType = namespace.popitem()[1]
    return template


class _Writer:
    def __init__(self, *, fail: str) -> None:
        self.fail = fail  # the statement that ends a pattern as "no match"
        self.lines: list[str] = []
        self.names: list[str] = []
        self.values: list[Any] = []
        self.shared: dict[str, str] = {}
        """Variables holding top-level fields already read (key -> name)."""
        self._vars = 0

    def build(self, name: str, params: str, body: list[str]) -> Any:
        """A function ``name(params)`` running ``body``, constants bound as defaults.

        Defaults rather than closure cells: local loads, and one tuple per function instead
        of one object per constant (10,000 rules make a lot of objects for the GC). The code
        object is compiled once per distinct source, i.e. per pattern shape.
        """
        constants = ", ".join(f"{n}=None" for n in [*_FIXED, *self.names])
        source = "\n".join([f"def {name}({params}, {constants}):", *body])
        template = _template(source)
        defaults = (*_FIXED.values(), *self.values)
        return FunctionType(template.__code__, template.__globals__, name, defaults)

    def const(self, value: Any) -> str:
        name = f"c{len(self.values)}"
        self.names.append(name)
        self.values.append(value)
        return name

    def var(self) -> str:
        self._vars += 1
        return f"v{self._vars}"

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def node(self, node: Node, obj: str, depth: int) -> None:
        for clause in node.ordered:
            if isinstance(clause, Field):
                self.field(clause, obj, depth)
            elif isinstance(clause, Nested):
                self.nested(clause, obj, depth)
            else:
                self.alternatives(clause, obj, depth)
        if not node.ordered:
            self.emit(depth, "pass")

    def load(self, key: str, obj: str, depth: int) -> str:
        """The variable holding field ``key`` of ``obj``, read here unless already read."""
        if obj == "o0" and key in self.shared:
            return self.shared[key]
        value = self.var()
        self.emit(depth, f"{value} = {obj}.get({self.const(key)}, M)")
        return value

    def field(self, clause: Field, obj: str, depth: int) -> None:
        value = self.load(clause.key, obj, depth)
        guard, expr, consts = clause.leaf.inline
        names = {f"c{i}": self.const(c) for i, c in enumerate(consts)}
        self.emit(depth, f"if {_GUARDS[guard].format(v=value)}:")
        self.emit(depth + 1, f"if not ({expr.format(v=value, **names)}): {self.fail}")
        fallback = self.const(clause.leaf.value_test)
        self.emit(depth, f"elif not {fallback}({value}): {self.fail}")

    def nested(self, clause: Nested, obj: str, depth: int) -> None:
        value = self.load(clause.key, obj, depth)
        self.emit(depth, f"if {value}.__class__ is dict:")
        self.node(clause.sub, value, depth + 1)
        self.emit(depth, f"elif not {self.const(clause.other)}({value}): {self.fail}")

    def alternatives(self, clause: Or, obj: str, depth: int) -> None:
        calls = [f"{self.const(generate(alt))}({obj})" for alt in clause.alternatives]
        self.emit(depth, f"if not ({' or '.join(calls)}): {self.fail}")
