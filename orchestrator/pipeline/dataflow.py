"""Typed data flow between steps: type hints, conversion of inputs, names of mapped items.

A parameter named after an upstream step receives that step's output converted with
``msgspec.convert`` to the parameter's annotation, whether the output was returned a moment
ago in this process or decoded from its stored JSON on resume. So a step sees the same
types either way, and a mismatch fails it at once (not retryable) with a message that names
both steps and the expected type.

The items of a mapped step ``load`` are recorded as steps named ``load[0]``, ``load[1]``, ...
(see :func:`item_name`), so the store needs no notion of items.
"""

from __future__ import annotations

import collections.abc
import logging
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from orchestrator.errors import NonRetryableError

__all__ = [
    "convert_input",
    "convert_item",
    "hints",
    "is_list_type",
    "item_name",
    "join_json",
    "parse_item",
    "type_name",
    "usable_input_type",
]

_log = logging.getLogger(__name__)

_ITEM = re.compile(r"^(?P<step>.+)\[(?P<index>0|[1-9][0-9]*)\]$")
_LIST_TYPES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def item_name(step: str, index: int) -> str:
    """The record name of item ``index`` of mapped step ``step``: ``load[3]``."""
    return f"{step}[{index}]"


def parse_item(name: str) -> tuple[str, int] | None:
    """``("load", 3)`` for ``"load[3]"``; ``None`` for a name that is not an item's."""
    found = _ITEM.match(name)
    return (found["step"], int(found["index"])) if found else None


def join_json(parts: Iterable[bytes]) -> bytes:
    """The JSON array of already encoded JSON values (a mapped step's output)."""
    return b"[" + b",".join(parts) + b"]"


def hints(fn: Callable[..., Any], where: str) -> dict[str, Any]:
    """``typing.get_type_hints(fn)``, or ``{}`` (with a warning) when they do not resolve."""
    try:
        return typing.get_type_hints(fn)
    except Exception as exc:  # annotations that do not resolve at run time
        _log.warning(
            "%s: annotations not resolvable (%s); stored output decodes as plain JSON and"
            " inputs are passed unconverted",
            where,
            exc,
        )
        return {}


def usable_input_type(tp: Any, where: str) -> Any:
    """``tp`` if ``msgspec.convert`` can check values against it, else ``Any`` (warned)."""
    if tp is Any or tp is object:
        return Any
    try:
        msgspec.inspect.type_info(tp)
    except (TypeError, ValueError) as exc:
        _log.warning("%s: annotation %r is not checked (%s)", where, tp, exc)
        return Any
    return tp


def is_list_type(tp: Any) -> bool:
    """Whether a return annotation promises a list (or any sequence) — or promises nothing."""
    return tp is Any or (typing.get_origin(tp) or tp) in _LIST_TYPES


def type_name(tp: Any) -> str:
    """How a message shows an annotation: ``Batch``, ``list[Batch]``, ``Batch | None``."""
    if tp is Any:
        return "Any"
    if tp is None or tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and not args:
        return tp.__qualname__
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{type_name(origin)}[{', '.join(type_name(a) for a in args)}]"
    return repr(tp).replace("typing.", "")


_AS_IS = frozenset({bool, bytes, float, int, str})
"""Types whose exact instances ``msgspec.convert`` returns unchanged (no constraints)."""


def convert_input(value: Any, tp: Any, *, step: str, param: str) -> Any:
    """``value`` (the output of step ``param``) as the annotation ``tp`` of ``step``'s parameter.

    Raises :class:`NonRetryableError` naming both steps and the expected type.
    """
    if tp is Any or (type(value) is tp and tp in _AS_IS):
        return value
    try:
        return msgspec.convert(value, tp)
    except (msgspec.ValidationError, TypeError) as exc:
        raise NonRetryableError(
            f"step {step!r}: the output of step {param!r} does not match the annotation of"
            f" parameter {param!r}, expected {type_name(tp)}: {exc}; fix the annotation or the"
            f" return value of step {param!r}"
        ) from None


def convert_item(value: Any, tp: Any, *, step: str, source: str, index: int) -> Any:
    """Item ``index`` of step ``source``'s list as the item annotation ``tp`` of ``step``."""
    if tp is Any or (type(value) is tp and tp in _AS_IS):
        return value
    try:
        return msgspec.convert(value, tp)
    except (msgspec.ValidationError, TypeError) as exc:
        raise NonRetryableError(
            f"step {step!r}: item {index} of the output of step {source!r} does not match the"
            f" item parameter's annotation, expected {type_name(tp)}: {exc}"
        ) from None
