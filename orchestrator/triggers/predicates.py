"""Value predicates: one compiled operator object (``{ prefix = "eu" }``, ``{ numeric =
[">", 0] }``...) as a function of one scalar leaf value.

Each builder validates its argument (raising :class:`Invalid` with a message that states the
fact and the fix) and returns a closure. ``prefix``, ``suffix``, ``equals-ignore-case``,
``wildcard`` and ``cidr`` only match strings; ``numeric`` only numbers (not booleans);
``anything-but`` matches every value its argument does not.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from orchestrator.triggers.problems import Invalid, kind, show

__all__ = ["BUILDERS", "OPERATORS", "Predicate", "numeric_bounds"]

Predicate = Callable[[Any], bool]

OPERATORS: Final = frozenset(
    {
        "anything-but",
        "cidr",
        "equals-ignore-case",
        "exists",
        "numeric",
        "prefix",
        "suffix",
        "wildcard",
    }
)
"""Every operator name (``exists`` is handled by the leaf itself, not by a predicate)."""

_ANYTHING_BUT_INNER = ("prefix", "suffix", "equals-ignore-case", "wildcard")
_LOWER = {">": False, ">=": True}  # operator -> bound is inclusive
_UPPER = {"<": False, "<=": True}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- string operators -------------------------------------------------------------------


def _text(name: str, arg: Any, field: str, *, ignore_case_form: bool = False) -> str:
    if isinstance(arg, str):
        return arg
    hint = ' or { equals-ignore-case = "..." }' if ignore_case_form else ""
    raise Invalid(field, f"{name} expects a string{hint}, got {kind(arg)} {show(arg)}")


def _affix(name: str, arg: Any, field: str) -> Predicate:
    folded = False
    if isinstance(arg, Mapping) and len(arg) == 1 and "equals-ignore-case" in arg:
        arg, folded = arg["equals-ignore-case"], True
    text = _text(name, arg, field, ignore_case_form=True)
    if folded:
        text = text.casefold()
    if name == "prefix":
        if folded:
            return lambda v: isinstance(v, str) and v.casefold().startswith(text)
        return lambda v: isinstance(v, str) and v.startswith(text)
    if folded:
        return lambda v: isinstance(v, str) and v.casefold().endswith(text)
    return lambda v: isinstance(v, str) and v.endswith(text)


def _prefix(arg: Any, field: str) -> Predicate:
    return _affix("prefix", arg, field)


def _suffix(arg: Any, field: str) -> Predicate:
    return _affix("suffix", arg, field)


def _equals_ignore_case(arg: Any, field: str) -> Predicate:
    text = _text("equals-ignore-case", arg, field).casefold()
    return lambda v: isinstance(v, str) and v.casefold() == text


def _wildcard(arg: Any, field: str) -> Predicate:
    text = _text("wildcard", arg, field)
    parts: list[str] = []
    buf: list[str] = []
    i, after_star = 0, False
    while i < len(text):
        char = text[i]
        if char == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt not in ("*", "\\"):
                escaped = repr(nxt) if nxt else "the end"
                raise Invalid(
                    field,
                    f"wildcard {text!r} has a backslash before {escaped} at position {i}; "
                    "only \\* (a literal star) and \\\\ (a literal backslash) are escapes",
                )
            buf.append(nxt)
            i, after_star = i + 2, False
            continue
        if char == "*":
            if after_star:
                raise Invalid(
                    field,
                    f"wildcard {text!r} has consecutive '*' at position {i}; "
                    "one '*' already matches any run of characters",
                )
            parts.append("".join(buf))
            buf, after_star = [], True
        else:
            buf.append(char)
            after_star = False
        i += 1
    parts.append("".join(buf))
    if len(parts) == 1:
        literal = parts[0]
        return lambda v: v == literal and isinstance(v, str)
    if len(parts) == 2 and not parts[1]:
        head = parts[0]
        return lambda v: isinstance(v, str) and v.startswith(head)
    if len(parts) == 2 and not parts[0]:
        tail = parts[1]
        return lambda v: isinstance(v, str) and v.endswith(tail)
    regex = re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)
    return lambda v: isinstance(v, str) and regex.fullmatch(v) is not None


def _cidr(arg: Any, field: str) -> Predicate:
    text = _text("cidr", arg, field)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise Invalid(
            field, f"cidr {text!r} is not an IP network like '10.0.0.0/24' ({exc})"
        ) from None

    def in_network(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        try:
            return ipaddress.ip_address(v) in network
        except ValueError:
            return False

    return in_network


# --- numeric ----------------------------------------------------------------------------


def numeric_bounds(arg: Any, field: str) -> list[tuple[str, float]]:
    """Validated comparisons: one ``(op, bound)``, or lower then upper bound."""
    usage = 'like ["<", 10] or [">", 0, "<=", 5] (operators =, <, <=, >, >=)'
    if not isinstance(arg, list | tuple) or not arg:
        raise Invalid(field, f"numeric expects operator/number pairs {usage}, got {show(arg)}")
    if len(arg) % 2:
        raise Invalid(
            field,
            f"numeric expects operator/number pairs {usage}, got an odd number of items "
            f"({len(arg)}): {show(arg)}",
        )
    if len(arg) > 4:
        raise Invalid(
            field,
            f"numeric takes at most two comparisons (one lower and one upper bound), "
            f"got {len(arg) // 2}: {show(arg)}",
        )
    pairs: list[tuple[str, float]] = []
    for op, bound in zip(arg[::2], arg[1::2], strict=True):
        if op not in ("=", "<", "<=", ">", ">="):
            raise Invalid(
                field, f"numeric operator {show(op)} is not one of '=', '<', '<=', '>', '>='"
            )
        if not _is_number(bound):
            raise Invalid(
                field, f"numeric expects a number after {op!r}, got {kind(bound)} {show(bound)}"
            )
        if not math.isfinite(bound):
            raise Invalid(field, f"numeric bound after {op!r} must be finite, got {bound}")
        pairs.append((op, float(bound)))
    if len(pairs) == 1:
        return pairs
    (op1, b1), (op2, b2) = pairs
    if op1 in _UPPER and op2 in _LOWER:
        (op1, b1), (op2, b2) = (op2, b2), (op1, b1)
    if op1 not in _LOWER or op2 not in _UPPER:
        raise Invalid(
            field,
            f"numeric range needs one lower bound (> or >=) and one upper bound (< or <=), "
            f"got {op1!r} and {op2!r}",
        )
    if b1 > b2 or (b1 == b2 and not (_LOWER[op1] and _UPPER[op2])):
        raise Invalid(field, f"numeric range is empty: no number is {op1} {b1:g} and {op2} {b2:g}")
    return [(op1, b1), (op2, b2)]


def _numeric(arg: Any, field: str) -> Predicate:
    bounds = numeric_bounds(arg, field)
    if len(bounds) == 1:
        return _single_bound(*bounds[0])
    (low_op, low), (high_op, high) = bounds
    return _range(low, _LOWER[low_op], high, _UPPER[high_op])


_NUMBER: Final[frozenset[Any]] = frozenset({int, float})  # exact classes: bool is not a number here


def _single_bound(op: str, bound: float) -> Predicate:
    number = _NUMBER
    if op == "=":
        return lambda v: v.__class__ in number and v == bound
    if op == "<":
        return lambda v: v.__class__ in number and v < bound
    if op == "<=":
        return lambda v: v.__class__ in number and v <= bound
    if op == ">":
        return lambda v: v.__class__ in number and v > bound
    return lambda v: v.__class__ in number and v >= bound


def _range(low: float, low_incl: bool, high: float, high_incl: bool) -> Predicate:
    number = _NUMBER
    if low_incl and high_incl:
        return lambda v: v.__class__ in number and low <= v <= high
    if low_incl:
        return lambda v: v.__class__ in number and low <= v < high
    if high_incl:
        return lambda v: v.__class__ in number and low < v <= high
    return lambda v: v.__class__ in number and low < v < high


# --- anything-but -----------------------------------------------------------------------


def _anything_but(arg: Any, field: str) -> Predicate:
    if isinstance(arg, Mapping):
        if len(arg) != 1 or next(iter(arg)) not in _ANYTHING_BUT_INNER:
            keys = ", ".join(repr(k) for k in arg) or "nothing"
            raise Invalid(
                field,
                f"anything-but accepts one of {', '.join(_ANYTHING_BUT_INNER)} inside it, "
                f"got {keys}",
            )
        ((name, inner_arg),) = arg.items()
        values = inner_arg if isinstance(inner_arg, list | tuple) else [inner_arg]
        if not values:
            raise Invalid(field, f"anything-but {name} list is empty; list what to exclude")
        builder = BUILDERS[name]
        inner = tuple(builder(_text(f"anything-but {name}", v, field), field) for v in values)
        if len(inner) == 1:
            one = inner[0]
            return lambda v: not one(v)
        return lambda v: not any(p(v) for p in inner)
    values = arg if isinstance(arg, list | tuple) else [arg]
    if not values:
        raise Invalid(field, "anything-but list is empty; list the values to exclude")
    kinds = {kind(v) for v in values}
    if not kinds <= {"string", "number"}:
        raise Invalid(
            field,
            "anything-but expects a string, a number, a list of either, or "
            f"{{ prefix | suffix | equals-ignore-case | wildcard = ... }}, got {show(arg)}",
        )
    if len(kinds) > 1:
        raise Invalid(
            field,
            f"anything-but list mixes strings and numbers ({show(arg)}); "
            "use only strings or only numbers",
        )
    excluded = frozenset(values)
    return lambda v: v.__class__ is bool or v not in excluded


BUILDERS: dict[str, Callable[[Any, str], Predicate]] = {
    "anything-but": _anything_but,
    "cidr": _cidr,
    "equals-ignore-case": _equals_ignore_case,
    "numeric": _numeric,
    "prefix": _prefix,
    "suffix": _suffix,
    "wildcard": _wildcard,
}
