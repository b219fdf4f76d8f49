"""Whether a step's coroutine can wait at all.

A coroutine is suspended only where its own code yields: every ``await``, ``async with``
and ``async for`` compiles to a yield of its frame, and nothing it calls can suspend it
otherwise. An ``async def`` whose code has none of them runs to its end the first time it
is resumed, so nothing can interrupt it: not its timeout, not a cancellation. The runner
gives such a step no timeout scope, whose creation, entry and exit would cost more than a
trivial step (a pure transformation, a decision, a lookup in memory).

The answer is conservative: anything but a plain ``async def`` function (or a method of
one), such as a ``functools.partial`` or a callable object, counts as able to wait.
"""

from __future__ import annotations

import dis
import inspect
from types import FunctionType, MethodType

__all__ = ["never_waits"]

_WAITING_OPS = frozenset(
    {
        "YIELD_VALUE",
        "INSTRUMENTED_YIELD_VALUE",
        "YIELD_FROM",
        "SEND",
        "GET_AWAITABLE",
        "BEFORE_ASYNC_WITH",
        "GET_AITER",
        "GET_ANEXT",
        "END_ASYNC_FOR",
        "ASYNC_GEN_WRAP",
    }
)
"""Operations of every ``await``, ``async with`` and ``async for``, across Python versions."""


def never_waits(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine that finishes without ever yielding."""
    if isinstance(fn, MethodType):
        fn = fn.__func__
    if type(fn) is not FunctionType:
        return False
    code = fn.__code__
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(op.opname in _WAITING_OPS for op in dis.get_instructions(code))
