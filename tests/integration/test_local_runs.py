"""Runs the intake creates are leased to the ingesting daemon and executed there at once;
the intake fetches no more while they wait; a stopping daemon gives back what it did not
start. Also: without an exporter, the producer's trace context is carried as is."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from orchestrator import Pipeline, StepContext, new_arrival
from orchestrator.kafka import open_producer, publish_event
from orchestrator.telemetry import Telemetry
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio

RULES = RuleSet.build(
    [Rule(name="gate", pipeline="gated", match={"data": {"dataset": ["local.feed"]}})]
)


TRACER = trace.NoOpTracer()


class Gate:
    """A pipeline whose step waits until the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.started: list[int] = []
        self.pipeline = Pipeline("gated")

        @self.pipeline.step()
        async def wait(ctx: StepContext) -> int:
            self.started.append(ctx.run_id)
            await self.open.wait()
            return ctx.run_id


async def count(dsn: str, schema: str, query: str) -> int:
    return int((await fetch(dsn, schema, query))[0]["n"])


async def test_without_an_exporter_runs_continue_the_producers_trace_context(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[trace.SpanContext] = []
    pipeline = Pipeline("gated")

    @pipeline.step()
    async def look(ctx: StepContext) -> None:
        seen.append(trace.get_current_span().get_span_context())

    quiet = Telemetry.from_providers(TracerProvider(sampler=ALWAYS_OFF), MeterProvider())
    assert not quiet.recording
    producer_side = Traced()  # records: the producer's span is sampled
    assert producer_side.telemetry.recording
    traced = Traced()
    traced.telemetry = quiet
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {"gated": pipeline}, RULES, traced):
        async with open_producer(settings) as producer:
            event = new_arrival("local.feed", partition="p1")
            await publish_event(producer, topic, event, producer_side.telemetry.tracer)

        async def done() -> int:
            return await count(
                pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs WHERE status='succeeded'"
            )

        await wait_for(done, what="the run to succeed")

    (publish,) = producer_side.spans.get_finished_spans()
    c = publish.context
    assert c.trace_flags.sampled
    expected = f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"
    (run,) = await fetch(pg_dsn, pg_schema.name, "SELECT * FROM runs")
    (stored,) = await fetch(pg_dsn, pg_schema.name, "SELECT traceparent FROM events")
    assert run["traceparent"] == stored["traceparent"] == expected
    (ctx,) = seen
    assert ctx.trace_id == publish.context.trace_id  # the step runs in the producer's trace


async def test_a_recording_daemon_starts_no_span_for_an_unsampled_producer(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    """With the SDK's default (parent-based) sampler, the spans of an unsampled producer's
    trace would all be non-recording: the daemon starts none, carries the producer's
    context along, and still records every span of a sampled producer's trace."""
    seen: dict[int, trace.SpanContext] = {}
    pipeline = Pipeline("gated")

    @pipeline.step()
    async def look(ctx: StepContext) -> None:
        seen[ctx.run_id] = trace.get_current_span().get_span_context()

    daemon = Traced()  # records, with the SDK's default sampler
    assert daemon.telemetry.recording
    assert daemon.telemetry.skips_unsampled
    sampled_side = Traced()
    unsampled_side = TracerProvider(sampler=ALWAYS_OFF)
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {"gated": pipeline}, RULES, daemon):
        async with open_producer(settings) as producer:
            for tracer in (unsampled_side.get_tracer("p"), sampled_side.telemetry.tracer):
                await publish_event(producer, topic, new_arrival("local.feed"), tracer)

        async def done() -> bool:
            n = await count(
                pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs WHERE status='succeeded'"
            )
            return n == 2

        await wait_for(done, what="both runs to succeed")
    (published,) = sampled_side.spans.get_finished_spans()
    sampled_trace = published.context.trace_id
    spans = daemon.spans.get_finished_spans()
    assert sorted(s.name for s in spans) == sorted([f"{topic} process", "run gated", "step look"])
    assert {s.context.trace_id for s in spans} == {sampled_trace}
    runs = await fetch(pg_dsn, pg_schema.name, "SELECT id, traceparent FROM runs ORDER BY id")
    (quiet_run,) = [r for r in runs if r["traceparent"].split("-")[1] != f"{sampled_trace:032x}"]
    assert not int(quiet_run["traceparent"][-2:], 16) & 1  # the producer's own, unsampled
    quiet_trace = int(quiet_run["traceparent"].split("-")[1], 16)
    assert seen[quiet_run["id"]].trace_id == quiet_trace  # the step ran in the producer's trace
    assert not seen[quiet_run["id"]].trace_flags.sampled


async def test_intake_runs_are_leased_here_and_intake_waits_while_they_queue(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    gate = Gate()
    settings = make_settings(
        kafka_bootstrap,
        topic,
        pg_dsn,
        pg_schema.name,
        kafka={"max_batch": 5},
        runner={"max_concurrent_runs": 2, "queue_depth": 3, "lease_seconds": 6},
    )
    events = 60
    async with running_daemon(settings, {"gated": gate.pipeline}, RULES, Traced(), owner="d1"):
        async with open_producer(settings) as producer:
            for i in range(events):
                await publish_event(
                    producer, topic, new_arrival("local.feed", partition=str(i)), TRACER
                )

        async def two_started() -> bool:
            return len(gate.started) == 2

        await wait_for(two_started, what="both workers to start a run")
        # Created claimed by the ingesting daemon, in the intake's transaction.
        held = await fetch(
            pg_dsn,
            pg_schema.name,
            "SELECT status, lease_owner, claims, started_at = created_at AS at_once FROM runs",
        )
        assert held
        assert {(r["status"], r["lease_owner"], r["claims"], r["at_once"]) for r in held} == {
            ("running", "d1", 1, True)
        }
        # Backpressure: with both workers busy the intake stops fetching once queue_depth
        # runs wait, so the backlog stays in Kafka instead of piling up as runs
        # (2 executing + fewer than 3 queued + one more batch of 5).
        await anyio.sleep(1.0)
        stored = await count(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
        assert stored <= 2 + 2 + 5, f"{stored} of {events} events ingested while workers blocked"

        gate.open.set()

        async def all_done() -> bool:
            n = await count(
                pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs WHERE status='succeeded'"
            )
            return n == events

        await wait_for(all_done, within=60, what="every run to succeed")
    assert len(set(gate.started)) == events


async def test_a_stopping_daemon_returns_runs_it_did_not_start(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    kafka_group_settings: dict[str, int],
) -> None:
    gate = Gate()
    settings = make_settings(
        kafka_bootstrap,
        topic,
        pg_dsn,
        pg_schema.name,
        kafka={"max_batch": 10, **kafka_group_settings},
        runner={"max_concurrent_runs": 2, "lease_seconds": 30, "shutdown_grace_seconds": 0.5},
    )
    async with running_daemon(settings, {"gated": gate.pipeline}, RULES, Traced(), owner="d1"):
        async with open_producer(settings) as producer:
            for i in range(10):
                await publish_event(
                    producer, topic, new_arrival("local.feed", partition=str(i)), TRACER
                )

        async def queued() -> bool:
            n = await count(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs")
            return len(gate.started) == 2 and n > 2

        await wait_for(queued, what="two runs executing and more queued")
        created = await count(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs")
    # Shutdown: queued runs given back at once, the two executing ones interrupted after the
    # grace; all are pending with no lease, long before their 30 s leases would expire.
    rows = await fetch(pg_dsn, pg_schema.name, "SELECT status, lease_owner FROM runs")
    assert len(rows) == created
    assert {(r["status"], r["lease_owner"]) for r in rows} == {("pending", None)}
    assert len(gate.started) == 2

    gate.open.set()
    async with running_daemon(settings, {"gated": gate.pipeline}, RULES, Traced(), owner="d2"):

        async def all_done() -> bool:
            n = await count(
                pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs WHERE status='succeeded'"
            )
            return n == 10

        await wait_for(all_done, within=60, what="the second daemon to finish every run")


async def _attempt_of_a_failing_run(
    kafka_bootstrap: str, topic: str, pg_dsn: str, schema: str, pipeline: Pipeline
) -> Any:
    """Publish one event to a daemon running ``pipeline`` (one step), wait until its run
    has failed, and return the step's only attempt row (status, error)."""
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, schema)
    async with running_daemon(settings, {"gated": pipeline}, RULES, Traced()):
        async with open_producer(settings) as producer:
            await publish_event(producer, topic, new_arrival("local.feed"), TRACER)

        async def failed() -> int:
            return await count(
                pg_dsn, schema, "SELECT count(*) AS n FROM runs WHERE status='failed'"
            )

        await wait_for(failed, within=20, what="the run to fail with its error recorded")
    (attempt,) = await fetch(pg_dsn, schema, "SELECT status, error FROM step_attempts")
    return attempt


async def test_a_step_error_with_a_nul_character_is_recorded(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    pipeline = Pipeline("gated")

    @pipeline.step()
    async def fail(ctx: StepContext) -> None:
        raise RuntimeError("bad\x00byte")  # Postgres text cannot hold NUL

    attempt = await _attempt_of_a_failing_run(
        kafka_bootstrap, topic, pg_dsn, pg_schema.name, pipeline
    )
    assert attempt["status"] == "failed"
    assert "RuntimeError: bad\ufffdbyte" in attempt["error"]


async def test_a_step_output_postgres_cannot_store_fails_the_step_with_a_clear_error(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    pipeline = Pipeline("gated")

    @pipeline.step()
    async def nul(ctx: StepContext) -> str:
        return "a\x00b"  # JSON "\u0000": jsonb cannot hold it

    # It used to be refused by Postgres with the rows written with it, again and again.
    attempt = await _attempt_of_a_failing_run(
        kafka_bootstrap, topic, pg_dsn, pg_schema.name, pipeline
    )
    assert attempt["status"] == "failed"
    assert "returned a string with a NUL character" in attempt["error"]


def one_worker(
    kafka_bootstrap: str, topic: str, pg_dsn: str, schema: str, group: dict[str, int]
) -> Any:
    return make_settings(
        kafka_bootstrap, topic, pg_dsn, schema, kafka=group, runner={"max_concurrent_runs": 1}
    )


async def attempts_by_run(dsn: str, schema: str) -> dict[int, tuple[str, int, int]]:
    """(status, attempts, succeeded attempts) of each run."""
    rows = await fetch(
        dsn,
        schema,
        """SELECT r.id, r.status, count(a.run_id) AS attempts,
                  count(*) FILTER (WHERE a.status = 'succeeded') AS succeeded
           FROM runs r LEFT JOIN step_attempts a ON a.run_id = r.id GROUP BY r.id""",
    )
    return {r["id"]: (r["status"], r["attempts"], r["succeeded"]) for r in rows}


async def test_a_run_cancelled_while_queued_ends_cancelled_without_starting(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    kafka_group_settings: dict[str, int],
) -> None:
    gate = Gate()
    settings = one_worker(kafka_bootstrap, topic, pg_dsn, pg_schema.name, kafka_group_settings)
    async with running_daemon(settings, {"gated": gate.pipeline}, RULES, Traced()) as daemon:
        async with open_producer(settings) as producer:
            for partition in ("a", "b"):
                await publish_event(
                    producer, topic, new_arrival("local.feed", partition=partition), TRACER
                )

        async def one_queued() -> bool:
            n = await count(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM runs")
            return len(gate.started) == 1 and n == 2

        await wait_for(one_queued, what="one run executing and one queued behind it")
        (queued,) = await fetch(
            pg_dsn, pg_schema.name, "SELECT id FROM runs WHERE id <> $1", gate.started[0]
        )
        assert daemon.scheduler is not None
        assert daemon.scheduler.cancel_run(queued["id"])
        gate.open.set()

        async def ended() -> bool:
            n = await count(
                pg_dsn,
                pg_schema.name,
                "SELECT count(*) AS n FROM runs WHERE finished_at IS NOT NULL",
            )
            return n == 2

        await wait_for(ended, within=20, what="both runs to end")
    got = await attempts_by_run(pg_dsn, pg_schema.name)
    assert got == {gate.started[0]: ("succeeded", 1, 1), queued["id"]: ("cancelled", 0, 0)}
    assert len(gate.started) == 1  # the cancelled run never started


RUNS = 8


async def test_a_cancel_after_the_runs_last_await_reaches_no_other_run(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    kafka_group_settings: dict[str, int],
) -> None:
    """One worker executes queued runs back to back in one cancel scope. A cancel that comes
    after a run's last await lets that run end as it would have, and must not be delivered
    to the next run, whose step awaits at once. Every other run cancels itself so: the
    worker yields to the event loop now and then between runs, which would hide a
    cancellation left pending for one pair, not for all."""
    order: list[int] = []
    holder: dict[str, Any] = {}
    pipeline = Pipeline("gated")

    @pipeline.step()
    async def step(ctx: StepContext) -> int:
        await anyio.lowlevel.checkpoint()  # a pending cancellation would be delivered here
        order.append(ctx.run_id)
        if len(order) % 2 == 0:  # asks to cancel its own run, with no await left
            assert holder["daemon"].scheduler.cancel_run(ctx.run_id)
        return ctx.run_id

    settings = one_worker(kafka_bootstrap, topic, pg_dsn, pg_schema.name, kafka_group_settings)
    # Published first, on one key: the intake takes them in one batch and queues them together.
    async with open_producer(settings) as producer:
        for _ in range(RUNS):
            await publish_event(producer, topic, new_arrival("local.feed", partition="p"), TRACER)
    async with running_daemon(settings, {"gated": pipeline}, RULES, Traced()) as daemon:
        holder["daemon"] = daemon

        async def ended() -> bool:
            n = await count(
                pg_dsn,
                pg_schema.name,
                "SELECT count(*) AS n FROM runs WHERE finished_at IS NOT NULL",
            )
            return n == RUNS

        await wait_for(ended, within=20, what="every run to end")
    assert len(order) == RUNS
    got = await attempts_by_run(pg_dsn, pg_schema.name)
    assert got == {run_id: ("succeeded", 1, 1) for run_id in order}
