"""The daemon end to end in one process: real broker, real Postgres, in-memory trace export."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.trace import SpanKind, StatusCode

from orchestrator import NonRetryableError, Pipeline, RetryPolicy, StepContext, new_arrival
from orchestrator.events import encode_structured
from orchestrator.kafka import open_producer, publish_event
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio


class Totals(msgspec.Struct, frozen=True):
    rows: int
    dataset: str


def build_pipelines(calls: list[tuple[str, int]]) -> dict[str, Pipeline]:
    orders = Pipeline("orders")

    @orders.step()
    async def extract(ctx: StepContext) -> Totals:
        calls.append(("extract", ctx.run_id))
        return Totals(rows=ctx.event.data.rows or 0, dataset=ctx.event.data.dataset)

    @orders.step()
    async def double(ctx: StepContext, extract: Totals) -> int:
        calls.append(("double", ctx.run_id))
        return extract.rows * 2

    @orders.step()
    async def label(ctx: StepContext, extract: Totals) -> str:
        calls.append(("label", ctx.run_id))
        return extract.dataset.upper()

    @orders.step()
    async def report(ctx: StepContext, double: int, label: str) -> dict[str, Any]:
        calls.append(("report", ctx.run_id))
        return {"label": label, "double": double}

    broken = Pipeline("broken")

    @broken.step(retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=0))
    async def flaky(ctx: StepContext) -> int:
        calls.append(("flaky", ctx.run_id))
        raise RuntimeError("warehouse said no")

    @broken.step()
    async def after_flaky(ctx: StepContext, flaky: int) -> int:
        calls.append(("after_flaky", ctx.run_id))
        return flaky

    fatal_pipeline = Pipeline("fatal")

    @fatal_pipeline.step(retry=5)
    async def fatal(ctx: StepContext) -> None:
        raise NonRetryableError("bad input")

    return {"orders": orders, "broken": broken, "fatal": fatal_pipeline}


RULES = RuleSet.build(
    [
        Rule(name="orders", pipeline="orders", match={"data": {"dataset": ["sales.orders"]}}),
        Rule(
            name="also-orders",
            pipeline="orders",
            match={"data": {"dataset": ["sales.orders"], "rows": [{"numeric": [">", 100]}]}},
        ),
        Rule(
            name="broken", pipeline="broken", match={"data": {"dataset": [{"prefix": "broken."}]}}
        ),
        Rule(name="fatal", pipeline="fatal", match={"data": {"dataset": ["fatal.feed"]}}),
    ]
)


async def runs_by_status(pg_dsn: str, schema: str) -> dict[str, int]:
    rows = await fetch(pg_dsn, schema, "SELECT status, count(*) AS n FROM runs GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def test_arrival_runs_pipeline_records_state_and_traces(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    calls: list[tuple[str, int]] = []
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, build_pipelines(calls), RULES, traced):
        async with open_producer(settings) as producer:
            event = new_arrival("sales.orders", partition="2026-11-24", rows=21)
            await publish_event(producer, topic, event, traced.telemetry.tracer)
            other = new_arrival("sales.customers", rows=5)  # matches no rule
            await publish_event(producer, topic, other, traced.telemetry.tracer)

        async def done() -> bool:
            stored = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
            succeeded = (await runs_by_status(pg_dsn, pg_schema.name)).get("succeeded")
            return succeeded == 1 and stored[0]["n"] == 2

        await wait_for(done, what="both events stored and the orders run to succeed")

    (run,) = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM runs")
    assert (run["rule"], run["pipeline"], run["status"]) == ("orders", "orders", "succeeded")
    events = await fetch(pg_dsn, pg_schema.name, "SELECT event_id, dataset FROM events ORDER BY id")
    assert {(e["event_id"], e["dataset"]) for e in events} == {
        (event.id, "sales.orders"),
        (other.id, "sales.customers"),
    }
    steps = await fetch(
        pg_dsn,
        pg_schema.name,
        "SELECT step, attempt, status, output FROM step_attempts WHERE run_id = $1",
        run["id"],
    )
    outputs = {s["step"]: msgspec.json.decode(s["output"]) for s in steps}
    assert outputs == {
        "extract": {"rows": 21, "dataset": "sales.orders"},
        "double": 42,
        "label": "SALES.ORDERS",
        "report": {"label": "SALES.ORDERS", "double": 42},
    }
    assert all(s["status"] == "succeeded" and s["attempt"] == 1 for s in steps)
    assert sorted(name for name, _ in calls) == ["double", "extract", "label", "report"]

    # One trace: publish (PRODUCER) → process (CONSUMER) → run → step x 4.
    spans = traced.spans.get_finished_spans()
    by_name = {s.name: s for s in spans}

    def for_event(name: str) -> Any:
        (span,) = [
            s
            for s in spans
            if s.name == name
            and s.attributes
            and s.attributes.get("messaging.message.id") == event.id
        ]
        return span

    publish = for_event(f"{topic} publish")
    process = for_event(f"{topic} process")
    run_span = by_name["run orders"]
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert run_span.parent is not None
    assert run_span.parent.span_id == process.context.span_id
    step_spans = [s for s in spans if s.name.startswith("step ")]
    assert sorted(s.name for s in step_spans) == [
        "step double",
        "step extract",
        "step label",
        "step report",
    ]
    assert {s.context.trace_id for s in [publish, process, run_span, *step_spans]} == {
        publish.context.trace_id
    }
    assert all(
        s.parent is not None and s.parent.span_id == run_span.context.span_id for s in step_spans
    )
    assert process.attributes is not None
    assert process.attributes["messaging.destination.name"] == topic
    assert process.attributes["messaging.system"] == "kafka"
    assert run["traceparent"].split("-")[1] == f"{publish.context.trace_id:032x}"

    consumed = traced.metric_points("orchestrator.events.consumed")
    assert sum(p.value for p in consumed) == 2
    latency = traced.metric_points("orchestrator.event_to_step.latency")
    assert sum(p.count for p in latency) == 1


async def test_redelivered_and_duplicate_events_create_one_run_per_rule(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    calls: list[tuple[str, int]] = []
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    event = new_arrival("sales.orders", partition="2026-11-25", rows=500)  # matches 2 rules
    async with running_daemon(settings, build_pipelines(calls), RULES, traced):
        async with open_producer(settings) as producer:
            for _ in range(3):  # the same CloudEvents id three times
                await publish_event(producer, topic, event, traced.telemetry.tracer)

        def duplicates() -> int:
            return sum(p.value for p in traced.metric_points("orchestrator.events.duplicate"))

        async def done() -> bool:
            succeeded = (await runs_by_status(pg_dsn, pg_schema.name)).get("succeeded")
            return succeeded == 2 and duplicates() == 2

        await wait_for(done, what="two runs to succeed and two duplicates to be seen")
    runs = await fetch(pg_dsn, pg_schema.name, "SELECT rule FROM runs ORDER BY rule")
    assert [r["rule"] for r in runs] == ["also-orders", "orders"]
    (count,) = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
    assert count["n"] == 1


async def test_failing_step_fails_run_and_skips_dependents(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    calls: list[tuple[str, int]] = []
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, build_pipelines(calls), RULES, traced):
        async with open_producer(settings) as producer:
            for dataset in ("broken.feed", "fatal.feed"):
                await publish_event(producer, topic, new_arrival(dataset), traced.telemetry.tracer)

        async def failed() -> bool:
            return (await runs_by_status(pg_dsn, pg_schema.name)).get("failed") == 2

        await wait_for(failed, what="both runs to fail")
    run, fatal_run = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM runs ORDER BY pipeline")
    assert (run["pipeline"], run["failed_step"]) == ("broken", "flaky")
    assert "warehouse said no" in run["error"]
    assert (fatal_run["pipeline"], fatal_run["failed_step"]) == ("fatal", "fatal")
    attempts = await fetch(
        pg_dsn,
        pg_schema.name,
        "SELECT step, attempt, status, error FROM step_attempts ORDER BY step, attempt",
    )
    by_step: dict[str, list[Any]] = {}
    for a in attempts:
        by_step.setdefault(a["step"], []).append(a)
    assert [a["status"] for a in by_step["flaky"]] == ["failed", "failed"]  # 2 attempts
    assert "RuntimeError: warehouse said no" in by_step["flaky"][-1]["error"]
    assert [a["status"] for a in by_step["fatal"]] == ["failed"]  # non-retryable: 1 attempt
    assert "after_flaky" not in by_step
    assert ("after_flaky", run["id"]) not in calls
    run_span = next(s for s in traced.spans.get_finished_spans() if s.name == "run broken")
    assert run_span.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"{not json", [], "not a CloudEvents JSON envelope"),
        (b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":{}}', [], "dataset"),
        (
            b'{"specversion":"0.3","id":"x","source":"s","type":"t","data":{"dataset":"d"}}',
            [],
            "specversion",
        ),
        (
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":{"dataset":"d","rows":"many"}}',
            [],
            "data.rows",
        ),
        (b"\xff\xfe\xfd", [], "not a CloudEvents JSON envelope"),
        (b"x" * 3000, [], "exceeds the limit"),
        (
            b'{"dataset": 5}',
            [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"s"), ("ce_type", b"t")],
            "binary-mode data",
        ),
    ],
    ids=[
        "malformed-json",
        "missing-dataset",
        "unknown-specversion",
        "wrong-type",
        "invalid-utf8",
        "oversize",
        "binary-wrong-type",
    ],
)
async def test_bad_records_are_dead_lettered_and_the_partition_moves_on(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    value: bytes,
    headers: list[tuple[str, bytes]],
    reason: str,
) -> None:
    traced = Traced()
    settings = make_settings(
        kafka_bootstrap, topic, pg_dsn, pg_schema.name, kafka={"max_record_bytes": 2048}
    )
    good = new_arrival("sales.orders", rows=1)
    async with running_daemon(settings, build_pipelines([]), RULES, traced):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            # Same key → same partition: the good event sits behind the bad record.
            await producer.send_and_wait(topic, value, key=b"k", headers=headers)
            await producer.send_and_wait(topic, encode_structured(good), key=b"k")
        finally:
            await producer.stop()

        async def done() -> bool:
            return (await runs_by_status(pg_dsn, pg_schema.name)).get("succeeded") == 1

        await wait_for(done, what="the good event behind the bad one to run")
    (dead,) = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM dead_letters")
    assert reason in dead["reason"]
    assert dead["topic"] == topic
    assert dead["kafka_offset"] == 0
    assert dead["value_size"] == len(value)
    assert bytes(dead["value"]) == value[: len(dead["value"])]


async def test_binary_mode_event_runs_pipeline(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, build_pipelines([]), RULES, traced):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                topic,
                b'{"dataset": "sales.orders", "partition": "2026-11-24", "rows": 7, "extra": 1}',
                key=b"sales.orders/2026-11-24",
                headers=[
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"bin-1"),
                    ("ce_source", b"kcat"),
                    ("ce_type", b"data.arrived"),
                    ("ce_time", b"2026-11-24T10:00:00Z"),
                    ("content-type", b"application/json"),
                ],
            )
        finally:
            await producer.stop()

        async def done() -> bool:
            return (await runs_by_status(pg_dsn, pg_schema.name)).get("succeeded") == 1

        await wait_for(done, what="the binary-mode event's run")
    (ev,) = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM events")
    assert (ev["source"], ev["event_id"], ev["partition_key"]) == ("kcat", "bin-1", "2026-11-24")
    (out,) = await fetch(
        pg_dsn, pg_schema.name, "SELECT output FROM step_attempts WHERE step = 'double'"
    )
    assert msgspec.json.decode(out["output"]) == 14


async def test_dead_letters_are_copied_to_the_dead_letter_topic(
    kafka_bootstrap: str, new_topic: Any, pg_dsn: str, pg_schema: PgSchema
) -> None:
    from aiokafka import AIOKafkaConsumer

    topic, dlq = await new_topic(), await new_topic(partitions=1)
    traced = Traced()
    settings = make_settings(
        kafka_bootstrap, topic, pg_dsn, pg_schema.name, kafka={"dead_letter_topic": dlq}
    )
    async with running_daemon(settings, build_pipelines([]), RULES, traced):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"{oops", key=b"k", headers=[("h", b"v")])
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            with anyio.fail_after(20):
                record = await consumer.getone()
        finally:
            await consumer.stop()
    assert record.value == b"{oops"
    assert record.key == b"k"
    headers = dict(record.headers)
    assert headers["h"] == b"v"
    assert b"not a CloudEvents JSON envelope" in headers["orchestrator-dead-letter-reason"]
    name, _partition, offset = headers["orchestrator-dead-letter-origin"].decode().split("/")
    assert (name, offset) == (topic, "0")
