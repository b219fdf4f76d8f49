"""The sales example: a daily rollup once orders and customers of a day have both landed,
written to the warehouse and announced as ``sales.daily_rollup``; a report pipeline on that
dataset calls a webhook.

Connectors used (configured in orchestrator.toml): ``data`` (files under examples/data),
``warehouse`` (Postgres) and ``hooks`` (HTTP).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import msgspec

from connectors.http import idempotency_key
from orchestrator import NonRetryableError, Pipeline, RetryPolicy, StepContext


class DayTotals(msgspec.Struct, frozen=True):
    day: str
    orders: int
    revenue: float
    customers: int
    revenue_by_region: dict[str, float]


rollup = Pipeline("daily_rollup", description="Roll up a day of orders by customer region")


async def _rows(ctx: StepContext, dataset: str) -> list[dict[str, str]]:
    event = next((e for e in ctx.events if e.data.dataset == dataset), None)
    if event is None or event.data.partition is None:
        raise NonRetryableError(f"no {dataset} partition among the triggering events")
    text = await ctx.connectors["data"].read_text(f"{dataset}/{event.data.partition}.csv")
    return list(csv.DictReader(io.StringIO(text)))


@rollup.step(retry=RetryPolicy(max_attempts=3, initial_backoff=0.5))
async def orders(ctx: StepContext) -> list[dict[str, str]]:
    return await _rows(ctx, "sales.orders")


@rollup.step(retry=RetryPolicy(max_attempts=3, initial_backoff=0.5))
async def customers(ctx: StepContext) -> list[dict[str, str]]:
    return await _rows(ctx, "sales.customers")


@rollup.step()
async def totals(
    ctx: StepContext, orders: list[dict[str, str]], customers: list[dict[str, str]]
) -> DayTotals:
    region = {c["customer_id"]: c["region"] for c in customers}
    by_region: dict[str, float] = {}
    for o in orders:
        key = region.get(o["customer_id"], "unknown")
        by_region[key] = round(by_region.get(key, 0.0) + float(o["amount"]), 2)
    return DayTotals(
        day=str(ctx.params["day"]),
        orders=len(orders),
        revenue=round(sum(float(o["amount"]) for o in orders), 2),
        customers=len({o["customer_id"] for o in orders}),
        revenue_by_region=by_region,
    )


@rollup.step(produces="sales.daily_rollup")
async def store(ctx: StepContext, totals: DayTotals) -> dict[str, Any]:
    """Upsert by day: re-running the step (at least once) leaves one row per day."""
    warehouse = ctx.connectors["warehouse"]
    await warehouse.execute(
        """CREATE TABLE IF NOT EXISTS daily_rollup (
               day text PRIMARY KEY, orders integer, revenue numeric, customers integer,
               revenue_by_region jsonb, run_id bigint)"""
    )
    await warehouse.execute(
        """INSERT INTO daily_rollup VALUES ($1, $2, $3, $4, $5::jsonb, $6)
           ON CONFLICT (day) DO UPDATE SET orders = $2, revenue = $3, customers = $4,
               revenue_by_region = $5::jsonb, run_id = $6""",
        totals.day,
        totals.orders,
        totals.revenue,
        totals.customers,
        msgspec.json.encode(totals.revenue_by_region).decode(),
        ctx.run_id,
    )
    return {"partition": totals.day, "rows": 1, "uri": f"postgres:daily_rollup?day={totals.day}"}


report = Pipeline("rollup_report", description="Send the day's rollup to the sales webhook")


@report.step(retry=RetryPolicy(max_attempts=5, initial_backoff=1.0))
async def notify(ctx: StepContext) -> dict[str, Any]:
    day = ctx.event.data.partition
    response = await ctx.connectors["hooks"].post(
        "/sales/daily-rollup",
        json={
            "day": day,
            "dataset": ctx.event.data.dataset,
            "uri": ctx.event.data.uri,
            "params": dict(ctx.params),
        },
        idempotency_key=idempotency_key(ctx),
    )
    return {"day": day, "status": response.status, "attempts": response.attempts}
