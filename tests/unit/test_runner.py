"""The run executor against an in-memory recorder, a fake sleep and in-memory telemetry.

Ordering and overlap are proven with events, never with sleeps; ``fail_after`` guards turn a
scheduling bug into a fast failure instead of a hang.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from orchestrator.errors import NonRetryableError, PipelineError, StepError, StoreError
from orchestrator.events import CloudEvent, new_arrival
from orchestrator.pipeline import (
    CancelStatus,
    Pipeline,
    RetryPolicy,
    Runner,
    RunOutcome,
    RunSpec,
    StepContext,
    StepRecord,
)

pytestmark = pytest.mark.anyio

EVENT = new_arrival("orders", partition="2026-11-24", id="evt-1")
GUARD = 5  # seconds: a deadlock fails the test instead of hanging it


class Batch(msgspec.Struct, frozen=True):
    ids: list[int]
    source: str


class MemoryRecorder:
    """Keeps every call; awaits a checkpoint so unshielded calls under cancellation fail."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.finished: list[StepRecord] = []
        self.fail_on_start: set[str] = set()
        self._events: dict[tuple[str, str], anyio.Event] = {}

    def on_finished(self, step: str, status: str) -> anyio.Event:
        """Set once ``step`` has an attempt recorded with ``status``."""
        return self._events.setdefault((step, status), anyio.Event())

    async def step_started(
        self, run_id: int, step: str, attempt: int, started_at: datetime
    ) -> None:
        await anyio.lowlevel.checkpoint()
        if step in self.fail_on_start:
            raise StoreError("postgres went away")
        self.started.append((step, attempt))

    async def step_finished(self, record: StepRecord) -> None:
        await anyio.lowlevel.checkpoint()
        self.finished.append(record)
        self.on_finished(record.step, record.status).set()

    def statuses(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.finished:
            out.setdefault(r.step, []).append(r.status)
        return out

    def of(self, step: str) -> list[StepRecord]:
        return [r for r in self.finished if r.step == step]


class Harness:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.tracer_provider.get_tracer("test")
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.recorder = MemoryRecorder()
        self.delays: list[float] = []
        self.sleep_gate: Callable[[], Awaitable[None]] | None = None
        self._now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
        self.runner = self.make_runner()

    def make_runner(self, **kwargs: Any) -> Runner:
        return Runner(
            self.recorder,
            tracer=self.tracer,
            meter=self.meter_provider.get_meter("test"),
            sleep=self.sleep,
            clock=self.clock,
            **kwargs,
        )

    def clock(self) -> datetime:
        self._now += timedelta(seconds=1)
        return self._now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.sleep_gate is not None:
            await self.sleep_gate()
        await anyio.lowlevel.checkpoint()

    def spec(self, pipeline: Pipeline, **kwargs: Any) -> RunSpec:
        base: dict[str, Any] = {"run_id": 7, "events": (EVENT,), "params": {}, "completed": {}}
        return RunSpec(pipeline=pipeline, **(base | kwargs))

    async def run(self, pipeline: Pipeline, **kwargs: Any) -> RunOutcome:
        with anyio.fail_after(GUARD):
            return await self.runner.execute(self.spec(pipeline, **kwargs))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.meter_provider.shutdown()
    harness.tracer_provider.shutdown()


# -- order, concurrency, outputs ----------------------------------------------------------


async def test_outputs_flow_by_parameter_name_in_dependency_order(h: Harness) -> None:
    p = Pipeline("orders")
    seen: dict[str, Any] = {}

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return [1, 2, 3]

    @p.step
    async def total(ctx: StepContext, extract: list[int]) -> int:
        return sum(extract)

    @p.step(depends_on=[total])
    async def publish(ctx: StepContext) -> None:
        seen["publish"] = dict(ctx.upstream)

    @p.step
    async def report(ctx: StepContext, extract: list[int], total: int) -> str:
        return f"{len(extract)} rows, total {total}"

    assert await h.run(p) == RunOutcome("succeeded")
    started = [step for step, _ in h.recorder.started]
    assert started[0] == "extract"
    assert started.index("total") < started.index("publish")
    assert seen["publish"] == {"total": 6}
    outputs = {r.step: r.output for r in h.recorder.finished}
    assert outputs == {
        "extract": b"[1,2,3]",
        "total": b"6",
        "publish": b"null",
        "report": b'"3 rows, total 6"',
    }
    assert all(r.status == "succeeded" and r.error is None for r in h.recorder.finished)
    assert all(r.started_at < r.finished_at for r in h.recorder.finished)


async def test_independent_steps_run_concurrently(h: Harness) -> None:
    p = Pipeline("p")
    a_running, b_running = anyio.Event(), anyio.Event()

    @p.step
    async def a(ctx: StepContext) -> None:
        a_running.set()
        await b_running.wait()

    @p.step
    async def b(ctx: StepContext) -> None:
        b_running.set()
        await a_running.wait()

    assert await h.run(p) == RunOutcome("succeeded")


async def test_a_step_starts_once_its_own_dependencies_succeed(h: Harness) -> None:
    """Not level by level: ``after_fast`` runs while ``slow`` (same level as ``fast``) waits."""
    p = Pipeline("p")
    after_fast_ran = anyio.Event()

    @p.step
    async def fast(ctx: StepContext) -> int:
        return 1

    @p.step
    async def slow(ctx: StepContext) -> int:
        await after_fast_ran.wait()
        return 2

    @p.step
    async def after_fast(ctx: StepContext, fast: int) -> int:
        after_fast_ran.set()
        return fast + 1

    assert await h.run(p) == RunOutcome("succeeded")


async def test_context_carries_the_run(h: Harness) -> None:
    p = Pipeline("orders")
    seen: list[StepContext] = []
    second = new_arrival("orders", partition="2026-11-25", id="evt-2")

    @p.step
    async def first(ctx: StepContext) -> int:
        return 41

    @p.step
    async def load(ctx: StepContext, first: int) -> None:
        seen.append(ctx)

    outcome = await h.run(
        p, events=(EVENT, second), params={"full": True}, connectors={"warehouse": "conn"}
    )
    assert outcome.status == "succeeded"
    ctx = seen[0]
    assert (ctx.run_id, ctx.pipeline, ctx.step, ctx.attempt) == (7, "orders", "load", 1)
    assert ctx.events == (EVENT, second)
    assert ctx.event is EVENT
    assert dict(ctx.params) == {"full": True}
    assert dict(ctx.upstream) == {"first": 41}
    assert dict(ctx.connectors) == {"warehouse": "conn"}
    assert ctx.log.extra == {"run_id": 7, "pipeline": "orders", "step": "load", "attempt": 1}
    assert ctx.span.get_span_context().is_valid


# -- resume ---------------------------------------------------------------------------------


async def test_resume_skips_completed_steps_and_decodes_their_typed_output(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []

    @p.step
    async def extract(ctx: StepContext) -> Batch:
        raise AssertionError("a completed step must not run again")

    @p.step
    async def count(ctx: StepContext, extract: Batch) -> int:
        received.append(extract)
        received.append(ctx.upstream["extract"])
        return len(extract.ids)

    stored = msgspec.json.encode(Batch(ids=[4, 5], source="s3://bucket/orders"))
    outcome = await h.run(p, completed={"extract": stored, "renamed_long_ago": b"1"})
    assert outcome == RunOutcome("succeeded")
    assert received == [Batch(ids=[4, 5], source="s3://bucket/orders")] * 2
    assert isinstance(received[0], Batch)
    assert h.recorder.started == [("count", 1)]
    assert h.recorder.of("count")[0].output == b"2"


async def test_resume_with_every_step_completed_runs_nothing(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def only(ctx: StepContext) -> int:
        raise AssertionError("must not run")

    assert await h.run(p, completed={"only": b"1"}) == RunOutcome("succeeded")
    assert h.recorder.started == []


async def test_undecodable_stored_output_fails_the_run_before_any_attempt(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> Batch:
        return Batch(ids=[], source="")

    @p.step
    async def count(ctx: StepContext, extract: Batch) -> int:
        return 0

    outcome = await h.run(p, completed={"extract": b'"not a batch"'})
    assert outcome.status == "failed"
    assert outcome.failed_step == "extract"
    assert "stored output of step 'extract' does not decode as" in (outcome.error or "")
    assert h.recorder.started == []


async def test_attempt_numbers_continue_after_prior_attempts(h: Harness) -> None:
    p = Pipeline("orders")
    attempts: list[int] = []

    @p.step
    async def load(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)

    assert await h.run(p, prior_attempts={"load": 2}) == RunOutcome("succeeded")
    assert attempts == [3]
    assert h.recorder.started == [("load", 3)]


# -- retries and timeouts -------------------------------------------------------------------


async def test_retry_then_success_records_every_attempt_and_backoff(h: Harness) -> None:
    p = Pipeline("orders")
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.5, jitter=0.0)

    @p.step(retry=policy)
    async def flaky(ctx: StepContext) -> str:
        if ctx.attempt < 3:
            raise StepError(f"broker busy on attempt {ctx.attempt}")
        return "ok"

    assert await h.run(p) == RunOutcome("succeeded")
    records = h.recorder.of("flaky")
    assert [(r.attempt, r.status) for r in records] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert (records[0].error or "").startswith("StepError: broker busy on attempt 1\n")
    assert "in flaky" in (records[0].error or "")  # the traceback tail names the frame
    assert records[2].output == b'"ok"'
    assert h.delays == [0.5, 1.0]


async def test_runner_default_retry_applies_to_steps_without_policy(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def flaky(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("transient")

    h.runner = h.make_runner(default_retry=RetryPolicy(max_attempts=2, jitter=0.0))
    assert await h.run(p) == RunOutcome("succeeded")
    assert h.recorder.statuses() == {"flaky": ["failed", "succeeded"]}
    assert h.delays == [1.0]


@pytest.mark.parametrize(
    "error",
    [NonRetryableError("bad input"), StepError("bad input", retryable=False), KeyError("k")],
)
async def test_non_retryable_errors_stop_at_once(h: Harness, error: Exception) -> None:
    p = Pipeline("orders")

    @p.step(retry=RetryPolicy(max_attempts=5, non_retryable=(KeyError,)))
    async def load(ctx: StepContext) -> None:
        raise error

    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.failed_step == "load"
    assert (outcome.error or "").startswith(f"{type(error).__name__}: ")
    assert h.recorder.statuses() == {"load": ["failed"]}
    assert h.delays == []


async def test_exhausted_attempts_fail_with_the_last_error(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=RetryPolicy(max_attempts=2, jitter=0.0))
    async def load(ctx: StepContext) -> None:
        raise RuntimeError(f"down (attempt {ctx.attempt})")

    outcome = await h.run(p)
    assert outcome.failed_step == "load"
    assert (outcome.error or "").startswith("RuntimeError: down (attempt 2)")
    assert h.recorder.statuses() == {"load": ["failed", "failed"]}


async def test_timeout_fails_the_attempt_and_is_retried(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=RetryPolicy(max_attempts=2, jitter=0.0), timeout=0.01)
    async def slow(ctx: StepContext) -> str:
        if ctx.attempt == 1:
            await anyio.Event().wait()
        return "done"

    assert await h.run(p) == RunOutcome("succeeded")
    first, second = h.recorder.of("slow")
    assert first.status == "failed"
    assert (first.error or "").startswith("TimeoutError: step 'slow' did not finish within 0.01s")
    assert second.status == "succeeded"


async def test_runner_default_timeout_applies(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def stuck(ctx: StepContext) -> None:
        await anyio.Event().wait()

    h.runner = h.make_runner(default_timeout=0.01)
    outcome = await h.run(p)
    assert outcome.failed_step == "stuck"
    assert "did not finish within 0.01s" in (outcome.error or "")


async def test_timeout_error_raised_by_the_step_keeps_its_message(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(timeout=60)
    async def call(ctx: StepContext) -> None:
        raise TimeoutError("upstream API timed out")

    outcome = await h.run(p)
    assert (outcome.error or "").startswith("TimeoutError: upstream API timed out")


async def test_unserializable_output_is_a_non_retryable_failure(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=3)
    async def opaque(ctx: StepContext) -> Any:
        return object()

    outcome = await h.run(p)
    assert outcome.failed_step == "opaque"
    assert "step 'opaque' returned object, which is not msgspec-serializable" in (
        outcome.error or ""
    )
    assert h.recorder.statuses() == {"opaque": ["failed"]}


async def test_an_output_with_a_nul_character_is_a_non_retryable_failure(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=3)
    async def nul(ctx: StepContext) -> Any:
        return {"key\x00": "value"}

    @p.step()
    async def fine(ctx: StepContext) -> str:
        return "a\\u0000 is six characters here, not a NUL"

    outcome = await h.run(p)
    assert outcome.failed_step == "nul"
    assert "step 'nul' returned a string with a NUL character" in (outcome.error or "")
    assert h.recorder.statuses() == {"nul": ["failed"], "fine": ["succeeded"]}


# -- failures ------------------------------------------------------------------------------


async def test_failure_blocks_dependents_but_running_siblings_finish(h: Harness) -> None:
    p = Pipeline("orders")
    sibling_running = anyio.Event()

    @p.step
    async def bad(ctx: StepContext) -> int:
        await sibling_running.wait()
        raise NonRetryableError("schema mismatch")

    @p.step
    async def sibling(ctx: StepContext) -> int:
        sibling_running.set()
        await h.recorder.on_finished("bad", "failed").wait()
        return 1

    @p.step
    async def after_bad(ctx: StepContext, bad: int) -> None:
        raise AssertionError("must not start")

    @p.step
    async def after_sibling(ctx: StepContext, sibling: int) -> None:
        raise AssertionError("must not start once the run failed")

    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.failed_step == "bad"
    assert (outcome.error or "").startswith("NonRetryableError: schema mismatch")
    assert h.recorder.statuses() == {"bad": ["failed"], "sibling": ["succeeded"]}


async def test_a_step_in_backoff_is_not_retried_once_the_run_failed(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=RetryPolicy(max_attempts=5, jitter=0.0))
    async def flaky(ctx: StepContext) -> None:
        raise RuntimeError("transient")

    @p.step
    async def bad(ctx: StepContext) -> None:
        await h.recorder.on_finished("flaky", "failed").wait()
        raise NonRetryableError("fatal")

    h.sleep_gate = h.recorder.on_finished("bad", "failed").wait
    outcome = await h.run(p)
    assert outcome.failed_step == "bad"
    assert h.recorder.statuses() == {"flaky": ["failed"], "bad": ["failed"]}
    assert h.delays == [1.0]


async def test_step_errors_never_escape_as_exception_groups(h: Harness) -> None:
    p = Pipeline("orders")
    both_running = [anyio.Event(), anyio.Event()]

    @p.step
    async def one(ctx: StepContext) -> None:
        both_running[0].set()
        await both_running[1].wait()
        raise ValueError("one")

    @p.step
    async def two(ctx: StepContext) -> None:
        both_running[1].set()
        await both_running[0].wait()
        raise ExceptionGroup("nested", [ValueError("two")])

    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.failed_step in {"one", "two"}
    assert h.recorder.statuses() == {"one": ["failed"], "two": ["failed"]}


async def test_invalid_pipeline_raises_before_any_attempt(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def load(ctx: StepContext, missing: int) -> None: ...

    with pytest.raises(PipelineError, match="'missing' names no step"):
        await h.run(p)
    assert h.recorder.started == []


async def test_recorder_failure_stops_the_run_and_propagates(h: Harness) -> None:
    p = Pipeline("orders")
    waiting_running = anyio.Event()

    @p.step
    async def waiting(ctx: StepContext) -> None:
        waiting_running.set()
        await anyio.Event().wait()

    @p.step
    async def gate(ctx: StepContext) -> None:
        await waiting_running.wait()

    @p.step(depends_on=[gate])
    async def recorded_late(ctx: StepContext) -> None:
        raise AssertionError("must not run: its start could not be recorded")

    h.recorder.fail_on_start.add("recorded_late")
    with pytest.raises(StoreError, match="postgres went away"):
        await h.run(p)
    assert h.recorder.statuses() == {"waiting": ["interrupted"], "gate": ["succeeded"]}


# -- cancellation ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["cancelled", "interrupted"])
async def test_cancellation_records_in_flight_attempts_and_propagates(
    h: Harness, status: CancelStatus
) -> None:
    p = Pipeline("orders")
    running = anyio.Event()

    @p.step
    async def done(ctx: StepContext) -> int:
        return 1

    @p.step
    async def long(ctx: StepContext, done: int) -> None:
        running.set()
        await anyio.Event().wait()

    @p.step
    async def never(ctx: StepContext, long: None) -> None:
        raise AssertionError("must not start")

    outcomes: list[RunOutcome] = []
    scope = anyio.CancelScope()

    async def execute() -> None:
        with scope:
            outcomes.append(await h.runner.execute(h.spec(p), cancel_status=lambda: status))
            outcomes.append(RunOutcome("succeeded", None, "execute swallowed the cancellation"))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(execute)
            await running.wait()
            scope.cancel()

    assert outcomes == []
    assert scope.cancelled_caught
    assert h.recorder.statuses() == {"done": ["succeeded"], "long": [status]}
    record = h.recorder.of("long")[0]
    assert record.output is None
    assert record.error is not None
    assert status in record.error
    (span,) = [s for s in h.spans() if s.name == "step long"]
    assert span.attributes is not None
    assert span.attributes["orchestrator.step.status"] == status
    assert span.status.status_code is StatusCode.UNSET


async def test_cancellation_during_backoff_propagates_without_a_new_attempt(h: Harness) -> None:
    p = Pipeline("orders")
    in_backoff = anyio.Event()

    @p.step(retry=RetryPolicy(max_attempts=3))
    async def flaky(ctx: StepContext) -> None:
        raise RuntimeError("transient")

    async def gate() -> None:
        in_backoff.set()
        await anyio.Event().wait()

    h.sleep_gate = gate
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.runner.execute, h.spec(p))
                await in_backoff.wait()
                scope.cancel()
    assert scope.cancelled_caught
    assert h.recorder.statuses() == {"flaky": ["failed"]}


# -- telemetry ---------------------------------------------------------------------------------


async def test_step_spans_are_children_of_the_run_span_with_attributes(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> int:
        return 1

    @p.step(retry=RetryPolicy(max_attempts=2, jitter=0.0))
    async def load(ctx: StepContext, extract: int) -> None:
        if ctx.attempt == 1:
            raise StepError("warehouse busy")

    with h.tracer.start_as_current_span("run orders") as run_span:
        assert await h.run(p) == RunOutcome("succeeded")

    spans = {(s.name, (s.attributes or {}).get("orchestrator.attempt")): s for s in h.spans()}
    run_id = run_span.get_span_context().span_id
    step_spans = [spans["step extract", 1], spans["step load", 1], spans["step load", 2]]
    for span in step_spans:
        assert span.kind is SpanKind.INTERNAL
        assert span.parent is not None
        assert span.parent.span_id == run_id
        assert span.context is not None
        assert span.context.trace_id == run_span.get_span_context().trace_id
    assert dict(spans["step load", 1].attributes or {}) == {
        "orchestrator.run_id": 7,
        "orchestrator.pipeline": "orders",
        "orchestrator.step": "load",
        "orchestrator.attempt": 1,
        "orchestrator.step.status": "failed",
    }
    failed = spans["step load", 1]
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.status.description or "").startswith("StepError: warehouse busy")
    assert [e.name for e in failed.events] == ["exception"]
    ok = spans["step load", 2]
    assert ok.status.status_code is StatusCode.UNSET
    assert (ok.attributes or {})["orchestrator.step.status"] == "succeeded"


async def test_step_durations_are_recorded_by_status(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=RetryPolicy(max_attempts=2, jitter=0.0))
    async def load(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise StepError("busy")

    await h.run(p)
    data = h.reader.get_metrics_data()
    assert data is not None
    points: list[HistogramDataPoint] = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "orchestrator.step.duration":
                    assert metric.unit == "s"
                    points.extend(p for p in metric.data.data_points)  # type: ignore[misc]
    counts = {dict(pt.attributes or {})["orchestrator.step.status"]: pt.count for pt in points}
    assert counts == {"failed": 1, "succeeded": 1}
    assert {dict(pt.attributes or {})["orchestrator.step"] for pt in points} == {"load"}
    assert {dict(pt.attributes or {})["orchestrator.pipeline"] for pt in points} == {"orders"}


def test_event_fixture_is_a_cloud_event() -> None:
    assert isinstance(EVENT, CloudEvent)
