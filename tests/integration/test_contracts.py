"""A contract breach is quarantined: dead letter + stored event; rules block or flag it."""

from __future__ import annotations

import msgspec
import pytest

from orchestrator import Pipeline, StepContext, new_arrival
from orchestrator.kafka import open_producer, publish_event
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio


async def test_contract_breach_is_quarantined_blocked_or_flagged(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    p = Pipeline("p")

    @p.step()
    async def note(ctx: StepContext) -> str:
        return str(ctx.params.get("contract_error", "clean"))

    match = {"data": {"dataset": ["sales.orders"]}}
    rules = RuleSet.build(
        [
            Rule(name="blocked", pipeline="p", match=match),
            msgspec.convert(
                {"name": "flagged", "pipeline": "p", "match": match, "contract": "flag"}, Rule
            ),
        ]
    )
    settings = make_settings(
        kafka_bootstrap,
        topic,
        pg_dsn,
        pg_schema.name,
        contracts={"sales.orders": {"required": ["rows"], "min_rows": 1}},
    )
    traced = Traced()
    bad = new_arrival("sales.orders", partition="d1")  # no rows: breaks the contract
    good = new_arrival("sales.orders", partition="d2", rows=3)
    async with running_daemon(settings, {"p": p}, rules, traced):
        async with open_producer(settings) as producer:
            for ev in (bad, good):
                await publish_event(producer, topic, ev, traced.telemetry.tracer)

        async def settled() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return len(rows) == 3 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(settled, what="two runs for the good event, one flagged run")
    runs = await fetch(
        pg_dsn,
        pg_schema.name,
        """SELECT r.rule, e.event_id, s.output FROM runs r
           JOIN events e ON e.id = r.event_ids[1]
           JOIN step_attempts s ON s.run_id = r.id ORDER BY r.rule, e.event_id""",
    )
    outcome = {(r["rule"], r["event_id"]): msgspec.json.decode(r["output"]) for r in runs}
    assert outcome == {
        ("blocked", good.id): "clean",
        ("flagged", good.id): "clean",
        ("flagged", bad.id): "required field 'rows' is missing",
    }
    (dead,) = await fetch(pg_dsn, pg_schema.name, "SELECT reason FROM dead_letters")
    assert dead["reason"] == "contract sales.orders: required field 'rows' is missing"
    stored = await fetch(
        pg_dsn, pg_schema.name, "SELECT event_id, contract_error FROM events ORDER BY id"
    )
    assert {s["event_id"]: s["contract_error"] for s in stored} == {
        bad.id: "required field 'rows' is missing",
        good.id: None,
    }
