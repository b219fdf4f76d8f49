"""Example pipelines used by `orchestrator dev` and the end-to-end tests.

`orders`: validate the arrival, then profile and price it concurrently, then summarise.
`profile`: a one-step pipeline for large customer drops.
"""

from __future__ import annotations

import msgspec

from orchestrator import Pipeline, RetryPolicy, StepContext

orders = Pipeline("orders", description="Validate, profile and summarise an orders partition")


class Validated(msgspec.Struct, frozen=True):
    dataset: str
    partition: str | None
    rows: int


@orders.step(timeout=30)
async def validate(ctx: StepContext) -> Validated:
    data = ctx.event.data
    rows = data.rows if data.rows is not None else 0
    if rows < 0:
        raise ValueError(f"{data.dataset}: negative row count {rows}")
    ctx.log.info("validated %s/%s with %d rows", data.dataset, data.partition, rows)
    return Validated(dataset=data.dataset, partition=data.partition, rows=rows)


@orders.step(retry=RetryPolicy(max_attempts=3, initial_backoff=0.2))
async def profile(ctx: StepContext, validate: Validated) -> dict[str, int]:
    return {"rows": validate.rows, "null_customer_ids": 0}


@orders.step()
async def price(ctx: StepContext, validate: Validated) -> float:
    return round(validate.rows * 12.5, 2)


@orders.step()
async def summarize(ctx: StepContext, profile: dict[str, int], price: float) -> str:
    return f"{profile['rows']} orders worth {price:.2f}"


profile_pipeline = Pipeline("profile", description="Profile a large customer drop")


@profile_pipeline.step()
async def count(ctx: StepContext) -> int:
    return ctx.event.data.rows or 0
