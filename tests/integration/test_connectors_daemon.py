from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import Pipeline, StepContext
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio


async def test_file_dropped_runs_pipeline_that_writes_via_connector(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    out.mkdir()
    p = Pipeline("copy")

    @p.step()
    async def copy(ctx: StepContext) -> int:
        src = ctx.event.data.uri or ""
        text = await anyio.Path(src.removeprefix("file://")).read_text()
        return await ctx.connectors["out"].write_text(f"{ctx.event.data.partition}.csv", text)

    rules = RuleSet.build([Rule(name="r", pipeline="copy", match={"data": {"dataset": ["sales"]}})])
    settings = make_settings(
        kafka_bootstrap,
        topic,
        pg_dsn,
        pg_schema.name,
        connectors={
            "out": {"kind": "files", "root": str(out)},
            "landing": {
                "kind": "file_watcher",
                "dir": str(landing),
                "glob": "*.csv",
                "dataset": "sales",
                "partition_regex": r"(\d{4}-\d{2}-\d{2})",
            },
        },
    )
    traced = Traced()
    async with running_daemon(settings, {"copy": p}, rules, traced) as daemon:
        watcher = daemon.connectors["landing"]
        with anyio.fail_after(10):
            await watcher.ready.wait()
        (landing / ".2026-11-24.csv.part").write_text("id\n1\n")
        (landing / ".2026-11-24.csv.part").rename(landing / "2026-11-24.csv")

        async def done() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return bool(rows) and rows[0]["status"] == "succeeded"

        await wait_for(done, within=30)
    assert (out / "2026-11-24.csv").read_text() == "id\n1\n"
    assert daemon.connectors["out"].state == "closed"


async def test_produced_dataset_chains_a_downstream_pipeline_in_the_same_trace(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    import msgspec

    from orchestrator import new_arrival
    from orchestrator.kafka import open_producer, publish_event

    upstream = Pipeline("rollup")

    @upstream.step(produces="sales.daily_rollup")
    async def build(ctx: StepContext) -> dict[str, Any]:
        return {"partition": ctx.event.data.partition, "rows": 7, "uri": "pg://rollup"}

    downstream = Pipeline("report")

    @downstream.step()
    async def report(ctx: StepContext) -> dict[str, Any]:
        d = ctx.event.data
        return {"dataset": d.dataset, "partition": d.partition, "rows": d.rows, "uri": d.uri}

    rules = RuleSet.build(
        [
            Rule(name="up", pipeline="rollup", match={"data": {"dataset": ["sales.orders"]}}),
            Rule(
                name="down", pipeline="report", match={"data": {"dataset": ["sales.daily_rollup"]}}
            ),
        ]
    )
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {"rollup": upstream, "report": downstream}, rules, traced):
        async with open_producer(settings) as producer:
            await publish_event(
                producer,
                topic,
                new_arrival("sales.orders", partition="d1"),
                traced.telemetry.tracer,
            )

        async def both() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(both, what="the upstream and the chained downstream run")
    (out,) = await fetch(
        pg_dsn, pg_schema.name, "SELECT output FROM step_attempts WHERE step = 'report'"
    )
    assert msgspec.json.decode(out["output"]) == {
        "dataset": "sales.daily_rollup",
        "partition": "d1",
        "rows": 7,
        "uri": "pg://rollup",
    }
    (outbox,) = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM outbox")
    assert outbox["published_at"] is not None
    assert outbox["step"] == "build"
    spans = traced.spans.get_finished_spans()
    run_up = next(s for s in spans if s.name == "run rollup")
    run_down = next(s for s in spans if s.name == "run report")
    assert run_down.context.trace_id == run_up.context.trace_id


async def test_emit_publishes_only_what_a_successful_attempt_announced(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    from orchestrator import RetryPolicy, new_arrival
    from orchestrator.kafka import open_producer, publish_event

    attempts: list[int] = []
    upstream = Pipeline("export")

    @upstream.step(retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=0))
    async def export(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        ctx.emit("exports.file", partition=f"try-{ctx.attempt}", rows=ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("disk full")  # this attempt's announcement must not go out

    seen: list[str | None] = []
    downstream = Pipeline("load")

    @downstream.step()
    async def load(ctx: StepContext) -> None:
        seen.append(ctx.event.data.partition)

    rules = RuleSet.build(
        [
            Rule(name="up", pipeline="export", match={"data": {"dataset": ["raw"]}}),
            Rule(name="down", pipeline="load", match={"data": {"dataset": ["exports.file"]}}),
        ]
    )
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {"export": upstream, "load": downstream}, rules, traced):
        async with open_producer(settings) as producer:
            await publish_event(producer, topic, new_arrival("raw"), traced.telemetry.tracer)

        async def both() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(both, what="the export and the load it announced")
    assert attempts == [1, 2]
    assert seen == ["try-2"]
    outbox = await fetch(pg_dsn, pg_schema.name, "SELECT step, published_at FROM outbox")
    assert [(o["step"], o["published_at"] is not None) for o in outbox] == [("export", True)]
