"""Pipelines for the fault suite. Every step execution appends ``run step attempt pid`` to
the file named by ``ORCH_FAULT_EFFECTS`` (one ``write`` with O_APPEND, atomic across the
daemon processes), so the test can count executions against recorded attempts."""

from __future__ import annotations

import os
import random

import anyio

from orchestrator import Pipeline, StepContext


def _effect(ctx: StepContext) -> None:
    fd = os.open(os.environ["ORCH_FAULT_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{ctx.run_id} {ctx.step} {ctx.attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def _work(ctx: StepContext) -> None:
    _effect(ctx)
    delay = float(os.environ.get("ORCH_FAULT_STEP_SECONDS", "0.004"))
    await anyio.sleep(random.uniform(0, 2 * delay))


chain = Pipeline("chain", description="three chained steps")


@chain.step()
async def first(ctx: StepContext) -> int:
    await _work(ctx)
    return ctx.event.data.rows or 0


@chain.step()
async def second(ctx: StepContext, first: int) -> int:
    await _work(ctx)
    return first + 1


@chain.step()
async def third(ctx: StepContext, second: int) -> int:
    await _work(ctx)
    return second + 1


side = Pipeline("side", description="one step, for events with many rows")


@side.step()
async def only(ctx: StepContext) -> str:
    await _work(ctx)
    return ctx.event.data.dataset
