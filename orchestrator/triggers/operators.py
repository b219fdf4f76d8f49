"""Leaf matching: the list of values and operators that one event field is compared with.

``data.rows = [{ numeric = [">", 0] }, 7]`` is a *leaf*: a list whose items are OR-ed. An
item is an exact value (string, number, boolean or null) or an operator object with exactly
one key (``prefix``, ``suffix``, ``equals-ignore-case``, ``wildcard``, ``anything-but``,
``numeric``, ``exists``, ``cidr``). Semantics follow Amazon EventBridge content filtering:

* operators test *leaf values* (scalars). An event field holding an object, an empty list or
  nothing at all has no leaf value: only ``exists = false`` matches it;
* when the field holds a list, the leaf matches if any element matches;
* exact values are typed: ``"5"`` does not match ``5``, ``true`` does not match ``1``,
  numbers compare by value (``5`` matches ``5.0``), ``null`` only matches null;
* ``prefix``, ``suffix``, ``equals-ignore-case``, ``wildcard`` and ``cidr`` only match strings,
  ``numeric`` only matches numbers; ``anything-but`` matches every leaf value (of any type)
  that its argument does not match, and never matches an absent field.

:func:`compile_leaf` validates once and returns a :class:`Leaf` whose closures do no pattern
walking at match time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from orchestrator.triggers.predicates import BUILDERS, OPERATORS, Predicate, numeric_bounds
from orchestrator.triggers.problems import Invalid, kind, show

__all__ = ["MISSING", "Inline", "Leaf", "compile_leaf", "leaf_values"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()
"""Stands for an absent field (distinct from an explicit ``null``)."""

_ABSENT = "the field to be absent"
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def leaf_values(value: list[Any] | tuple[Any, ...]) -> list[Any]:
    """The scalar leaves of an event list, nested lists flattened, objects skipped."""
    out: list[Any] = []
    for item in value:
        if isinstance(item, list | tuple):
            out.extend(leaf_values(item))
        elif not isinstance(item, Mapping):
            out.append(item)
    return out


class Inline(NamedTuple):
    """How generated code can test a leaf without a call: ``expr`` (over ``{v}`` and the
    constants ``{c0}``, ``{c1}``...) is exact for values whose class is in ``guard``
    (``"str"``, ``"num"`` or ``"scalar"``); other values go to :attr:`Leaf.value_test`."""

    guard: str
    expr: str
    consts: tuple[Any, ...]


class Leaf:
    """One compiled value list.

    ``test`` takes one scalar leaf value; ``value_test`` takes a field's whole content (or
    :data:`MISSING`) and applies EventBridge's leaf rules (lists: any element; objects and
    absent fields: only ``exists = false``); ``inline`` is the code generator's fast path.
    """

    __slots__ = ("exact_only", "expect", "inline", "on_absent", "test")

    def __init__(
        self,
        test: Predicate,
        *,
        on_absent: bool,
        expect: str,
        exact_only: bool,
        inline: Inline | None = None,
    ) -> None:
        self.test = test
        self.on_absent = on_absent
        self.expect = expect
        self.exact_only = exact_only
        self.inline = inline or Inline("scalar", "{c0}({v})", (test,))

    def value_test(self, value: Any) -> bool:
        """The leaf applied to a field's whole content (or :data:`MISSING`)."""
        if value.__class__ in _SCALARS:
            return self.test(value)
        if value is MISSING:
            return self.on_absent
        if isinstance(value, list | tuple):
            leaves = leaf_values(value)
            return any(map(self.test, leaves)) if leaves else self.on_absent
        if isinstance(value, Mapping):
            return self.on_absent
        return self.test(value)

    def explain_value(self, value: Any) -> str | None:
        """Why ``value`` (the field's content, or MISSING) fails, or None if it matches."""
        if self.value_test(value):
            return None
        present = value is not MISSING and not isinstance(value, Mapping)
        leaves = leaf_values(value) if isinstance(value, list | tuple) else None
        if present and leaves != []:
            if self.expect == _ABSENT:
                return f"field is present ({show(value)}); expected it to be absent"
            if leaves is not None:
                verb = "is" if self.exact_only else "matches"
                return f"no element of {show(value)} {verb} {self.expect}"
            verb = "is not" if self.exact_only else "does not match"
            return f"{show(value)} {verb} {self.expect}"
        if value is MISSING:
            return f"field is missing; expected {self.expect}"
        if isinstance(value, Mapping):
            return f"holds an object, not a value; expected {self.expect}"
        return f"holds {show(value)}, which has no values; expected {self.expect}"


def compile_leaf(items: Sequence[Any], field: str) -> Leaf:
    """Compile the value list of one field; raise :class:`Invalid` naming ``field``."""
    if not items:
        raise Invalid(field, "an empty list matches nothing; list at least one value or operator")
    strings: set[str] = set()
    numbers: set[int | float] = set()
    booleans: set[bool] = set()
    null = False
    exists: set[bool] = set()
    predicates: list[Predicate] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, Mapping):
            name, arg = _operator(item, field)
            texts.append(f"{name} {show(arg)}")
            if name == "exists":
                if not isinstance(arg, bool):
                    raise Invalid(
                        field, f"exists expects true or false, got {kind(arg)} {show(arg)}"
                    )
                exists.add(arg)
            else:
                predicates.append(BUILDERS[name](arg, field))
            continue
        texts.append(show(item))
        if isinstance(item, bool):
            booleans.add(item)
        elif item is None:
            null = True
        elif isinstance(item, str):
            strings.add(item)
        elif isinstance(item, int | float):
            numbers.add(item)
        elif isinstance(item, list | tuple):
            raise Invalid(
                field,
                f"a list inside a value list is not allowed, got {show(item)}; "
                'use one flat list, e.g. ["a", "b"]',
            )
        else:
            raise Invalid(
                field,
                f"values must be strings, numbers, booleans or null, got {kind(item)} "
                f"{item!s}; quote it to match its text form",
            )
    exact_only = not (predicates or exists)
    if exact_only:
        expect = f"one of [{', '.join(texts)}]"
    elif len(texts) == 1 and exists:
        expect = "the field to exist" if True in exists else _ABSENT
    elif len(texts) == 1:
        expect = texts[0]
    else:
        expect = f"any of [{', '.join(texts)}]"
    test = _combine(strings, numbers, booleans, null, predicates, any_value=True in exists)
    inline = None
    if exact_only and not (numbers or booleans or null):
        inline = Inline("str", "{v} in {c0}", (frozenset(strings),))
    elif len(items) == 1 and predicates:
        inline = _inline_operator(*next(iter(items[0].items())))
    return Leaf(
        test, on_absent=False in exists, expect=expect, exact_only=exact_only, inline=inline
    )


def _inline_operator(name: str, arg: Any) -> Inline | None:
    if name == "prefix" and isinstance(arg, str):
        return Inline("str", "{v}.startswith({c0})", (arg,))
    if name == "suffix" and isinstance(arg, str):
        return Inline("str", "{v}.endswith({c0})", (arg,))
    if name == "numeric":
        bounds = numeric_bounds(arg, "")
        if len(bounds) == 1:
            op, bound = bounds[0]
            return Inline("num", f"{{v}} {'==' if op == '=' else op} {{c0}}", (bound,))
        (low_op, low), (high_op, high) = bounds
        low_cmp = "<" if low_op == ">" else "<="
        return Inline("num", f"{{c0}} {low_cmp} {{v}} {high_op} {{c1}}", (low, high))
    return None


def _combine(
    strings: set[str],
    numbers: set[int | float],
    booleans: set[bool],
    null: bool,
    predicates: list[Predicate],
    *,
    any_value: bool,
) -> Predicate:
    if any_value:  # exists = true: every leaf value matches
        return lambda value: True
    exact = frozenset(strings | numbers)
    if not (numbers or booleans or null):
        in_exact: Predicate = exact.__contains__  # only strings: nothing else can be equal
    else:
        bools, has_null = frozenset(booleans), null

        def in_exact(value: Any) -> bool:
            if value.__class__ is bool:
                return value in bools
            if value is None:
                return has_null
            return value in exact

    if not predicates:
        return in_exact
    preds = tuple(predicates)
    if len(preds) == 1:
        (one,) = preds
        any_pred: Predicate = one
    elif len(preds) == 2:
        first, second = preds
        any_pred = lambda value: first(value) or second(value)  # noqa: E731
    else:
        any_pred = lambda value: any(p(value) for p in preds)  # noqa: E731
    if not exact and not booleans and not null:
        return any_pred
    return lambda value: in_exact(value) or any_pred(value)


def _operator(item: Mapping[str, Any], field: str) -> tuple[str, Any]:
    if len(item) != 1:
        keys = ", ".join(repr(k) for k in item) or "none"
        raise Invalid(
            field,
            f"an operator object has exactly one key, got {keys}; write one object per "
            'operator, e.g. [{ prefix = "a" }, { suffix = "b" }]',
        )
    ((name, arg),) = item.items()
    if name not in OPERATORS:
        raise Invalid(
            field, f"unknown operator {name!r}; use one of: {', '.join(sorted(OPERATORS))}"
        )
    return name, arg
