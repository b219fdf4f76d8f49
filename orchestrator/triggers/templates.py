"""Dotted paths into events, correlation keys and ``params`` templates.

A *path* is dot-separated names, ``data.partition`` or ``data.attributes.region``; a
segment of digits also indexes a list (``data.files.0``). ``params`` strings may hold
``{path}`` placeholders that :func:`render_params` fills from an event::

    render_params({"day": "{data.partition}", "rows": "{data.rows}", "n": "{data.rows} rows"},
                  {"data": {"partition": "2026-11-24", "rows": 10}})
    # {"day": "2026-11-24", "rows": 10, "n": "10 rows"}

A value that is exactly one placeholder keeps the event value's type (``10`` stays an
integer; a missing path gives ``None``). Inside a longer string a value is written as JSON
(strings without quotes) and a missing path as ``""``. ``{{`` and ``}}`` are literal braces;
a lone ``}`` or an unclosed ``{`` is an error, reported by ``rules check``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import msgspec

from orchestrator.triggers.operators import MISSING

if TYPE_CHECKING:
    from orchestrator.triggers.rules import Rule

__all__ = ["is_path", "key_of", "lookup", "render_params", "template_problem"]

_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_encode: Final = msgspec.json.Encoder().encode

_Part = str | tuple[str, ...]
"""A literal piece of a template, or a placeholder's path segments."""


def is_path(text: Any) -> bool:
    """Whether ``text`` is a dotted path like ``data.partition``."""
    return isinstance(text, str) and _PATH.fullmatch(text) is not None


@lru_cache(maxsize=1024)
def _segments(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def lookup(event: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` in ``event``, or :data:`MISSING`."""
    return _at(event, _segments(path))


def _at(event: Mapping[str, Any], segments: tuple[str, ...]) -> Any:
    value: Any = event
    for segment in segments:
        if isinstance(value, Mapping):
            value = value.get(segment, MISSING)
        elif isinstance(value, list | tuple) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return MISSING
    return value


def key_of(rule: Rule, event: Mapping[str, Any]) -> str | None:
    """The value of ``rule.key`` in ``event`` as a string; None when it is absent or null.

    Strings are returned as they are, numbers and booleans as JSON (``7``, ``true``); an
    object or a list is not a key (None).
    """
    value = lookup(event, rule.key)
    if isinstance(value, str):
        return value
    if value is None or value is MISSING or isinstance(value, Mapping | list | tuple):
        return None
    if isinstance(value, bool | int | float):
        return _encode(value).decode()
    return str(value)


@lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[tuple[_Part, ...], str | None]:
    """A template's parts, and a problem (None when it is well formed)."""
    parts: list[_Part] = []
    literal: list[str] = []
    i, size = 0, len(text)
    while i < size:
        char = text[i]
        if char in "{}" and text.startswith(char * 2, i):
            literal.append(char)
            i += 2
            continue
        if char == "}":
            return (), f"a single '}}' at position {i}; write '}}}}' for a literal brace"
        if char != "{":
            literal.append(char)
            i += 1
            continue
        end = text.find("}", i + 1)
        if end < 0:
            return (), (
                f"the '{{' at position {i} opens a placeholder that is never closed; "
                "write '{{' for a literal brace"
            )
        path = text[i + 1 : end]
        if not is_path(path):
            return (), (
                f"placeholder {{{path}}} is not a dotted path into the event like "
                "{data.partition}; write '{{' and '}}' for literal braces"
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_segments(path))
        i = end + 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts), None


def template_problem(text: str) -> str | None:
    """Why ``text`` is not a well-formed template, or None."""
    return _parse(text)[1]


def _render(text: str, event: Mapping[str, Any]) -> Any:
    if "{" not in text and "}" not in text:
        return text
    parts, problem = _parse(text)
    if problem is not None:
        raise ValueError(f"{problem}: {text!r}")
    if len(parts) == 1 and isinstance(parts[0], tuple):
        value = _at(event, parts[0])
        return None if value is MISSING else value
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = _at(event, part)
        if value is MISSING or value is None:
            continue
        out.append(value if isinstance(value, str) else _encode(value).decode())
    return "".join(out)


def _walk(value: Any, event: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return _render(value, event)
    if isinstance(value, Mapping):
        return {k: _walk(v, event) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v, event) for v in value]
    return value


def render_params(params: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every ``{path}`` placeholder filled from ``event`` (see module doc).

    Strings are templated wherever they are, inside lists and tables too; keys are not.
    Raises ``ValueError`` for a malformed template (``load_rules`` rejects those earlier).
    """
    return {k: _walk(v, event) for k, v in params.items()}
