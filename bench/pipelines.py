"""The benchmark's pipelines: trivial steps, so what is measured is the orchestrator itself.

Loaded by the daemon under test through ``[pipelines] modules = ["bench.pipelines"]``.

* ``chain3``: three chained steps ``a -> b -> c`` (each receives its upstream's output);
* ``single``: one step.
"""

from __future__ import annotations

from orchestrator import Pipeline, StepContext

__all__ = ["FIRST_STEP", "chain3", "single"]

chain3 = Pipeline("chain3", description="benchmark: three chained trivial steps")
single = Pipeline("single", description="benchmark: one trivial step")

FIRST_STEP = {"chain3": "a", "single": "only"}
"""The first step of each pipeline (its attempt 1 start is the latency end point)."""


@chain3.step
async def a(ctx: StepContext) -> int:
    return 1


@chain3.step
async def b(ctx: StepContext, a: int) -> int:
    return a + 1


@chain3.step
async def c(ctx: StepContext, b: int) -> int:
    return b + 1


@single.step
async def only(ctx: StepContext) -> int:
    return 1
