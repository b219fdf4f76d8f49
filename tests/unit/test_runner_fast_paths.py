"""The runner's cheap paths: chains run inline, and no step spans when the tracer never records.

Same harness as ``test_runner.py``; the tracer of the runner under test is swapped for one
whose sampler is ``ALWAYS_OFF`` (what the daemon installs without an exporter).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from orchestrator.errors import StoreError
from orchestrator.pipeline import Pipeline, Runner, RunOutcome, StepContext
from orchestrator.pipeline.deadlines import Deadlines
from orchestrator.telemetry import inject_headers
from tests.unit.test_runner import Harness

pytestmark = pytest.mark.anyio


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.meter_provider.shutdown()
    harness.tracer_provider.shutdown()


@pytest.fixture
def quiet(h: Harness) -> Iterator[Harness]:
    """The harness with a runner whose tracer never records."""
    provider = TracerProvider(sampler=sampling.ALWAYS_OFF)
    h.tracer = provider.get_tracer("quiet")
    h.runner = h.make_runner()
    yield h
    provider.shutdown()


def _diamond(seen: dict[str, Any]) -> Pipeline:
    """``first`` then ``left`` and ``right`` concurrently: not a chain."""
    p = Pipeline("orders")

    def observe(ctx: StepContext) -> None:
        seen[ctx.step] = (ctx.span, trace.get_current_span(), inject_headers())

    @p.step
    async def first(ctx: StepContext) -> int:
        observe(ctx)
        return 1

    @p.step
    async def left(ctx: StepContext, first: int) -> int:
        observe(ctx)
        return first

    @p.step
    async def right(ctx: StepContext, first: int) -> int:
        observe(ctx)
        return first

    return p


def _chain(seen: dict[str, Any]) -> Pipeline:
    p = Pipeline("orders")

    @p.step
    async def first(ctx: StepContext) -> int:
        seen[ctx.step] = (ctx.span, trace.get_current_span(), inject_headers())
        return 1

    @p.step
    async def second(ctx: StepContext, first: int) -> int:
        seen[ctx.step] = (ctx.span, trace.get_current_span(), inject_headers())
        return first + 1

    return p


@pytest.mark.parametrize("build", [_chain, _diamond], ids=["chain", "dag"])
async def test_a_tracer_that_never_records_runs_steps_under_the_run_span(
    quiet: Harness, build: Any
) -> None:
    """Steps see the run's (non-recording) span as theirs and as the current one, so the
    trace context they inject carries the run's trace."""
    seen: dict[str, Any] = {}
    p = build(seen)
    with quiet.tracer.start_as_current_span("run orders") as run_span:
        outcome = await quiet.run(p)
    assert outcome == RunOutcome("succeeded")
    assert not run_span.is_recording()
    run_context = run_span.get_span_context()
    assert seen
    for span, current, headers in seen.values():
        assert span is run_span
        assert current is run_span
        assert dict(headers)["traceparent"].decode().split("-")[1] == f"{run_context.trace_id:032x}"
    assert quiet.spans() == []
    assert {r.status for r in quiet.recorder.finished} == {"succeeded"}


async def test_a_recording_parent_is_not_handed_to_steps_of_a_quiet_tracer(
    quiet: Harness,
) -> None:
    """A parent span from a recording provider: steps get non-recording spans of its trace."""
    seen: dict[str, Any] = {}
    with quiet.tracer_provider.get_tracer("other").start_as_current_span("run") as parent:
        assert await quiet.run(_chain(seen)) == RunOutcome("succeeded")
    for span, current, _ in seen.values():
        assert span is not parent
        assert current is span
        assert not span.is_recording()
        assert span.get_span_context().trace_id == parent.get_span_context().trace_id


async def test_without_a_run_span_steps_of_a_quiet_tracer_get_spans_of_their_own(
    quiet: Harness,
) -> None:
    seen: dict[str, Any] = {}
    assert await quiet.run(_chain(seen)) == RunOutcome("succeeded")
    for span, current, _ in seen.values():
        assert current is span
        assert span.get_span_context().is_valid
        assert not span.get_span_context().trace_flags.sampled


async def test_a_sampled_remote_parent_is_not_handed_to_steps_of_a_quiet_tracer(
    quiet: Harness,
) -> None:
    """The steps' spans are unsampled (``ALWAYS_OFF``), unlike the parent: they stay."""
    parent = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=trace.TraceFlags(1)
        )
    )
    seen: dict[str, Any] = {}
    with trace.use_span(parent):
        assert await quiet.run(_chain(seen)) == RunOutcome("succeeded")
    for span, current, headers in seen.values():
        assert span is not parent
        assert current is span
        assert span.get_span_context().trace_id == 0x1234
        assert dict(headers)["traceparent"].decode().endswith("-00")


async def test_items_of_a_mapped_step_under_a_quiet_tracer(quiet: Harness) -> None:
    p = Pipeline("orders")
    spans: list[trace.Span] = []

    @p.step
    async def parts(ctx: StepContext) -> list[int]:
        return [1, 2, 3]

    @p.step(map_over=parts)
    async def load(ctx: StepContext, part: int) -> int:
        spans.append(ctx.span)
        return part * 2

    with quiet.tracer.start_as_current_span("run orders") as run_span:
        assert await quiet.run(p) == RunOutcome("succeeded")
    assert len(spans) == 3
    trace_id = run_span.get_span_context().trace_id
    assert all(not s.is_recording() for s in spans)
    assert all(s.get_span_context().trace_id == trace_id for s in spans)
    assert [r.output for r in quiet.recorder.of("load")] == [b"[2,4,6]"]


async def test_step_durations_are_recorded_under_a_quiet_tracer(quiet: Harness) -> None:
    assert await quiet.run(_chain({})) == RunOutcome("succeeded")
    data = quiet.reader.get_metrics_data()
    assert data is not None
    points = [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "orchestrator.step.duration"
        for point in metric.data.data_points
    ]
    assert sorted(dict(p.attributes or {})["orchestrator.step"] for p in points) == [
        "first",
        "second",
    ]


async def test_recorder_failure_in_a_chain_stops_it_and_propagates(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def first(ctx: StepContext) -> int:
        return 1

    @p.step
    async def second(ctx: StepContext, first: int) -> int:
        raise AssertionError("must not run: its start could not be recorded")

    @p.step
    async def third(ctx: StepContext, second: int) -> None:
        raise AssertionError("must not run")

    h.recorder.fail_on_start.add("second")
    with pytest.raises(StoreError, match="postgres went away"):
        await h.run(p)
    assert h.recorder.statuses() == {"first": ["succeeded"]}


async def test_a_step_timeout_shorter_than_the_run_timeout_still_applies(h: Harness) -> None:
    p = Pipeline("orders", timeout=60)

    @p.step(timeout=0.01, retry=1)
    async def slow(ctx: StepContext) -> None:
        await anyio.Event().wait()

    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert "did not finish within 0.01s" in outcome.error


async def test_finished_attempts_leave_no_deadline_behind(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(timeout=30)
    async def first(ctx: StepContext) -> int:
        return 1

    @p.step(timeout=30)
    async def second(ctx: StepContext, first: int) -> None:
        raise ValueError("boom")

    for _ in range(3):
        await h.run(p)
    deadlines = h.runner.deadlines()
    assert deadlines is not None
    assert len(deadlines) == 0


async def test_only_steps_that_can_wait_get_a_timeout_scope(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step without await, async with or async for cannot be interrupted: a timeout scope
    # around it would only cost its creation, entry and exit.
    noted: list[float] = []
    add = Deadlines.add

    def noting(self: Deadlines, scope: anyio.CancelScope, deadline: float) -> int:
        noted.append(deadline)
        return add(self, scope, deadline)

    monkeypatch.setattr(Deadlines, "add", noting)
    p = Pipeline("orders")

    @p.step(timeout=30)
    async def pure(ctx: StepContext) -> int:
        return 1

    @p.step(timeout=30)
    async def waits(ctx: StepContext, pure: int) -> int:
        await anyio.sleep(0.001)
        return pure + 1

    @p.step(timeout=30)
    async def last(ctx: StepContext, waits: int) -> int:
        return waits + 1

    outcome = await h.run(p)
    assert outcome.status == "succeeded"
    assert {n: s.never_waits for n, s in p.steps.items()} == {
        "pure": True,
        "waits": False,
        "last": True,
    }
    assert len(noted) == 1  # the attempt of `waits`
    assert h.recorder.statuses() == {n: ["succeeded"] for n in ("pure", "waits", "last")}


async def test_a_step_that_cannot_wait_runs_to_its_end_past_its_timeout(h: Harness) -> None:
    # Nothing interrupts a step that never waits, with or without a scope: it succeeds.
    p = Pipeline("orders")

    @p.step(timeout=0.01, retry=1)
    async def busy(ctx: StepContext) -> str:
        time.sleep(0.03)  # noqa: ASYNC251 - past its timeout, without ever waiting
        return "done"

    outcome = await h.run(p)
    assert outcome.status == "succeeded"
    assert h.recorder.statuses() == {"busy": ["succeeded"]}


async def test_no_duration_is_taken_for_a_meter_that_keeps_nothing(h: Harness) -> None:
    # The API's no-op meter (the daemon's without a metrics exporter) drops every value:
    # attempts then take no duration at all. An SDK meter still gets one per attempt.
    recorded: list[float] = []

    class Spy(metrics.NoOpHistogram):
        def record(self, amount: float, *args: Any, **kwargs: Any) -> None:
            recorded.append(amount)

    class NoOp(metrics.NoOpMeter):
        def create_histogram(self, *args: Any, **kwargs: Any) -> metrics.Histogram:
            return Spy("spy")

    p = Pipeline("orders")

    @p.step
    async def first(ctx: StepContext) -> int:
        return 1

    assert h.runner.measures  # the harness's SDK meter
    h.runner = Runner(h.recorder, tracer=h.tracer, meter=NoOp("noop"), sleep=h.sleep)
    assert not h.runner.measures
    await h.run(p)
    assert recorded == []
    assert h.recorder.statuses() == {"first": ["succeeded"]}


async def test_runs_leave_no_garbage_for_the_cycle_collector(h: Harness) -> None:
    # Objects in reference cycles wait for the cyclic collector; each of its passes walks
    # every young object, and with a cycle per run that cost the daemon a tenth of its CPU.
    p = Pipeline("orders")

    @p.step
    async def first(ctx: StepContext) -> int:
        return 1

    @p.step
    async def second(ctx: StepContext, first: int) -> int:
        await anyio.sleep(0.001)
        return first + 1

    @p.step(timeout=60)
    async def third(ctx: StepContext, second: int) -> int:
        await anyio.sleep(0.001)
        return second + 1

    runs = 50
    await h.run(p)  # first-run caches (the plan, decoders) are not per-run garbage
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            outcome = await h.run(p)
            assert outcome.status == "succeeded"
        found = gc.collect()
    finally:
        gc.enable()
    assert found < runs, f"{found} objects in cycles after {runs} runs"


async def test_off_asyncio_a_step_timeout_is_its_scope_deadline(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without an asyncio loop (trio) there are no shared deadlines: each scope keeps its own.
    monkeypatch.setattr(h.runner, "deadlines", lambda: None)
    p = Pipeline("orders")

    @p.step(timeout=0.01, retry=1)
    async def slow(ctx: StepContext) -> None:
        await anyio.Event().wait()

    with anyio.fail_after(5):
        outcome = await h.run(p)
    assert outcome.status == "failed"
    assert "did not finish within 0.01s" in (outcome.error or "")


def test_the_context_log_is_built_on_first_use_with_the_run_fields() -> None:
    custom = logging.getLogger("tests.custom")
    ctx = StepContext.create(run_id=3, pipeline="p", step="s", attempt=2, logger=custom)
    assert ctx.log is ctx.log
    assert ctx.log.logger is custom
    assert ctx.log.extra == {"run_id": 3, "pipeline": "p", "step": "s", "attempt": 2}
    default = StepContext.create(run_id=3, pipeline="p", step="s")
    assert default.log.logger is logging.getLogger("orchestrator.steps.p")


async def test_a_step_that_swallows_its_timeout_leaves_the_run_uncancelled(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(timeout=0.01, retry=1)
    async def stubborn(ctx: StepContext) -> str:
        try:
            await anyio.sleep(5)
        except BaseException:  # the point: it ignores the timeout
            return "ignored"
        return "slept"

    @p.step
    async def after(ctx: StepContext, stubborn: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0  # no cancellation left pending
        await anyio.sleep(0.02)
        return stubborn

    outcome = await h.run(p)
    assert outcome.status == "succeeded"
    assert h.recorder.statuses() == {"stubborn": ["succeeded"], "after": ["succeeded"]}


async def test_a_cancellation_arriving_with_a_step_timeout_propagates(h: Harness) -> None:
    p = Pipeline("orders")
    scope = anyio.CancelScope()

    @p.step(timeout=0.01, retry=2)
    async def slow(ctx: StepContext) -> None:
        scope.cancel()
        time.sleep(0.03)  # noqa: ASYNC251 - past the deadline: both fire at the next await
        await anyio.sleep(5)

    outcomes: list[RunOutcome] = []
    with anyio.fail_after(5):
        with scope:
            outcomes.append(await h.run(p))
    assert outcomes == []
    assert scope.cancelled_caught
    assert h.recorder.statuses() == {"slow": ["cancelled"]}


async def test_a_step_timeout_waits_for_a_shielded_section_of_the_step(h: Harness) -> None:
    # Connectors release what they hold under a shield: a timeout must not cut that short.
    p = Pipeline("orders")
    finished: list[str] = []

    @p.step(timeout=0.01, retry=1)
    async def careful(ctx: StepContext) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.05)
            finished.append("shielded")
        await anyio.sleep(5)

    outcome = await h.run(p)
    assert finished == ["shielded"]
    assert outcome.status == "failed"
    assert "did not finish within 0.01s" in (outcome.error or "")


async def test_steps_under_an_unsampled_parent_start_no_span_of_a_parent_based_tracer(
    h: Harness,
) -> None:
    """The SDK's default sampler records nothing under an unsampled parent: the steps use
    the parent itself, as a tracer that never records does; a sampled parent still gets
    its step spans."""
    seen: dict[str, Any] = {}
    unsampled_parent = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=5, span_id=6, is_remote=True, trace_flags=trace.TraceFlags(0))
    )
    with trace.use_span(unsampled_parent):
        assert await h.run(_chain(seen)) == RunOutcome("succeeded")
    for span, current, headers in seen.values():
        assert span is unsampled_parent
        assert current is unsampled_parent
        assert dict(headers)["traceparent"] == f"00-{5:032x}-{6:016x}-00".encode()
    assert h.spans() == []
    seen.clear()
    with h.tracer.start_as_current_span("run orders") as sampled_parent:
        assert await h.run(_chain(seen)) == RunOutcome("succeeded")
    assert all(span is not sampled_parent for span, _, _ in seen.values())
    assert sorted(s.name for s in h.spans()) == ["run orders", "step first", "step second"]


async def test_a_stand_in_span_handed_over_serves_as_the_steps_span(h: Harness) -> None:
    """The scheduler hands over the unrecorded run span it made current: the steps use it
    without looking at the context, as they would have found it; a tracer that would record
    under it ignores the hand-over."""
    seen: dict[str, Any] = {}
    run_span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=5, span_id=7, is_remote=False, trace_flags=trace.TraceFlags(0))
    )
    pipeline = _chain(seen)
    with trace.use_span(run_span):
        outcome = await h.runner.execute(h.spec(pipeline), stand_in=run_span)
    assert outcome == RunOutcome("succeeded")
    assert [span for span, _, _ in seen.values()] == [run_span, run_span]
    assert h.spans() == []
    seen.clear()
    always = TracerProvider(sampler=sampling.ALWAYS_ON)
    h.tracer = always.get_tracer("always")
    recording = h.make_runner()
    always.add_span_processor(SimpleSpanProcessor(h.exporter))
    with trace.use_span(run_span):
        assert await recording.execute(h.spec(pipeline), stand_in=run_span) == RunOutcome(
            "succeeded"
        )
    assert not recording.skips_unsampled
    assert all(
        s is not run_span and s.get_span_context().trace_flags.sampled for s, _, _ in seen.values()
    )
    assert sorted(s.name for s in h.spans()) == ["step first", "step second"]
    always.shutdown()
