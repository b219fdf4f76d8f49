"""Step deadlines noted in buckets, with one timer for the earliest (``pipeline/deadlines.py``)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator.pipeline.deadlines import Deadlines

pytestmark = pytest.mark.anyio


async def test_a_scope_is_cancelled_once_its_deadline_passes_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    scope = anyio.CancelScope()
    start = loop.time()
    deadlines.add(scope, start + 0.05)
    with anyio.fail_after(5), scope:
        await anyio.sleep(5)
    assert scope.cancelled_caught
    assert loop.time() - start >= 0.05
    assert len(deadlines) == 0


async def test_a_discarded_scope_is_not_cancelled() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    scope = anyio.CancelScope()
    key = deadlines.add(scope, loop.time() + 0.02)
    deadlines.discard(scope, key)
    with scope:
        await anyio.sleep(0.1)  # the timer fires meanwhile and finds nothing due
    assert not scope.cancel_called
    assert len(deadlines) == 0


async def test_an_earlier_deadline_noted_later_fires_first() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    late, early = anyio.CancelScope(), anyio.CancelScope()
    late_key = deadlines.add(late, loop.time() + 60)
    deadlines.add(early, loop.time() + 0.03)
    with anyio.fail_after(5), early:
        await anyio.sleep(5)
    assert early.cancelled_caught
    assert not late.cancel_called
    assert len(deadlines) == 1
    deadlines.discard(late, late_key)
    assert len(deadlines) == 0


async def test_deadlines_in_one_bucket_each_fire_at_their_own_time() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    first, second = anyio.CancelScope(), anyio.CancelScope()
    now = loop.time()
    deadlines.add(first, now + 0.02)
    deadlines.add(second, now + 0.3)
    with anyio.fail_after(5), first:
        await anyio.sleep(5)
    assert first.cancelled_caught
    assert not second.cancel_called  # the timer re-armed for the second deadline
    with anyio.fail_after(5), second:
        await anyio.sleep(5)
    assert loop.time() - now >= 0.3
    assert len(deadlines) == 0
