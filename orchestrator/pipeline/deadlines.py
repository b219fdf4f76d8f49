"""Step timeouts without a timer per attempt.

A cancel scope with a deadline arms an event-loop timer when it is entered and disarms it
when it exits. Nearly every attempt finishes long before its timeout (300 s by default), so
that pair was pure cost: about a tenth of the daemon's CPU with trivial steps. Here each
attempt's scope has no deadline of its own; its deadline is noted in a bucket of
:data:`RESOLUTION` seconds, and one timer, armed for the earliest deadline noted, cancels
the scopes whose deadline has passed. Noting and forgetting an attempt are a dict insert
and delete. The scope is cancelled exactly as its own deadline would have cancelled it
(``CancelScope.cancel``, which respects shielded scopes inside the step), and no earlier
than the deadline.
"""

from __future__ import annotations

import asyncio
import math

import anyio

__all__ = ["RESOLUTION", "Deadlines"]

RESOLUTION = 1.0
"""Seconds of deadline per bucket."""


class Deadlines:
    """The deadlines of the attempts in flight on one event loop."""

    __slots__ = ("_armed_for", "_buckets", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, dict[anyio.CancelScope, float]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, scope: anyio.CancelScope, deadline: float) -> int:
        """Cancel ``scope`` once the loop's clock reaches ``deadline``; returns the key for
        :meth:`discard`."""
        key = int(deadline // RESOLUTION)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
        bucket[scope] = deadline
        if deadline < self._armed_for:
            self._arm(deadline)
        return key

    def discard(self, scope: anyio.CancelScope, key: int) -> None:
        """Forget ``scope`` (its attempt ended). The timer stays armed: when it fires for a
        deadline no longer noted, it only re-arms for the next one."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.pop(scope, None)
            if not bucket:
                del self._buckets[key]

    def _arm(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = math.inf
        now = self._loop.time()
        due_until = int(now // RESOLUTION)
        for key in sorted(k for k in self._buckets if k <= due_until):
            bucket = self._buckets[key]
            for scope, deadline in list(bucket.items()):
                if deadline <= now:
                    del bucket[scope]
                    scope.cancel()
            if not bucket:
                del self._buckets[key]
        if self._buckets:
            earliest = self._buckets[min(self._buckets)]
            self._arm(min(earliest.values()))
