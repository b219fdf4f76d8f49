"""Skip conditions, the per-run timeout and typed data flow between steps.

Same harness as ``test_runner.py``; nothing waits on wall-clock time except the run-timeout
tests, whose timeouts are a few hundredths of a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry.trace import StatusCode

from orchestrator.pipeline import Pipeline, RetryPolicy, RunOutcome, StepContext
from tests.unit.test_runner import Harness

pytestmark = pytest.mark.anyio


class Batch(msgspec.Struct, frozen=True):
    ids: list[int]
    source: str


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.meter_provider.shutdown()
    harness.tracer_provider.shutdown()


# -- skip_if ---------------------------------------------------------------------------------


async def test_skipped_step_records_a_null_success_and_dependents_receive_none(
    h: Harness,
) -> None:
    p = Pipeline("orders")
    asked: list[StepContext] = []
    received: list[Any] = []

    def dry_run(ctx: StepContext) -> bool:
        asked.append(ctx)
        return bool(ctx.params.get("dry_run"))

    @p.step(skip_if=dry_run)
    async def export(ctx: StepContext) -> list[int]:
        raise AssertionError("skipped: must not run")

    @p.step
    async def notify(ctx: StepContext, export: list[int]) -> str:
        received.extend([export, dict(ctx.upstream)])
        return "sent"

    outcome = await h.run(p, params={"dry_run": True}, prior_attempts={"export": 2})
    assert outcome == RunOutcome("succeeded")
    assert received == [None, {"export": None}]
    assert (asked[0].step, asked[0].attempt, dict(asked[0].params)) == (
        "export",
        3,
        {"dry_run": True},
    )
    assert h.recorder.started == [("export", 3), ("notify", 1)]
    (skipped,) = h.recorder.of("export")
    assert (skipped.status, skipped.output, skipped.error, skipped.skipped) == (
        "succeeded",
        b"null",
        None,
        True,
    )
    assert h.recorder.of("notify")[0].skipped is False
    spans = {s.name: dict(s.attributes or {}) for s in h.spans()}
    assert spans["step export"]["orchestrator.step.skipped"] is True
    assert spans["step export"]["orchestrator.step.status"] == "succeeded"
    assert "orchestrator.step.skipped" not in spans["step notify"]


async def test_a_false_condition_runs_the_step_with_normal_attempt_numbers(h: Harness) -> None:
    p = Pipeline("orders")
    attempts: list[int] = []

    @p.step(skip_if=lambda ctx: ctx.params.get("dry_run", False))
    async def export(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)

    assert await h.run(p) == RunOutcome("succeeded")
    assert attempts == [1]
    assert h.recorder.started == [("export", 1)]
    assert h.recorder.of("export")[0].skipped is False


@pytest.mark.parametrize(("rows", "skipped"), [([], True), ([4, 5], False)])
async def test_skip_if_reads_upstream_outputs_by_parameter_name(
    h: Harness, rows: list[int], skipped: bool
) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return rows

    @p.step(skip_if=lambda ctx, extract: not extract)
    async def load(ctx: StepContext) -> int:
        return len(ctx.upstream["extract"])

    assert p.steps["load"].depends_on == ("extract",)
    assert await h.run(p) == RunOutcome("succeeded")
    (record,) = h.recorder.of("load")
    assert record.skipped is skipped
    assert record.output == (b"null" if skipped else b"2")


async def test_a_skip_condition_that_raises_fails_the_step_without_retry(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step(retry=3, skip_if=lambda ctx: 1 / 0)
    async def export(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    outcome = await h.run(p)
    assert outcome.failed_step == "export"
    assert (outcome.error or "").startswith(
        "NonRetryableError: skip_if of step 'export' raised ZeroDivisionError: division by zero"
    )
    assert h.recorder.statuses() == {"export": ["failed"]}


async def test_skipping_the_step_a_map_reads_maps_nothing(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []

    @p.step(skip_if=lambda ctx: True)
    async def extract(ctx: StepContext) -> list[int]:
        return [1]

    @p.step(map_over="extract")
    async def load(ctx: StepContext, item: int) -> int:
        raise AssertionError("no item")

    @p.step
    async def report(ctx: StepContext, load: list[int]) -> None:
        received.append(load)

    assert await h.run(p) == RunOutcome("succeeded")
    assert received == [[]]


async def test_a_skipped_step_stored_as_null_is_passed_as_none_on_resume(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []

    @p.step(skip_if=lambda ctx: True)
    async def extract(ctx: StepContext) -> Batch:
        raise AssertionError("completed")

    @p.step
    async def count(ctx: StepContext, extract: Batch) -> int:
        received.append(extract)
        return 0

    assert await h.run(p, completed={"extract": b"null"}) == RunOutcome("succeeded")
    assert received == [None]


# -- run timeout -----------------------------------------------------------------------------


async def test_run_timeout_fails_the_run_and_records_attempts_in_flight(h: Harness) -> None:
    p = Pipeline("orders", timeout=0.05)

    @p.step
    async def quick(ctx: StepContext) -> int:
        return 1

    @p.step
    async def stuck(ctx: StepContext, quick: int) -> None:
        await anyio.Event().wait()

    @p.step
    async def after(ctx: StepContext, stuck: None) -> None:
        raise AssertionError("must not start")

    t0 = time.monotonic()
    outcome = await h.run(p)
    assert time.monotonic() - t0 < 1
    assert outcome == RunOutcome("failed", "stuck", "run timed out after 0.05 s")
    assert h.recorder.statuses() == {"quick": ["succeeded"], "stuck": ["failed"]}
    (record,) = h.recorder.of("stuck")
    assert (record.error, record.output) == ("run timed out after 0.05 s", None)
    (span,) = [s for s in h.spans() if s.name == "step stuck"]
    assert (span.attributes or {})["orchestrator.step.status"] == "failed"
    assert span.status.status_code is StatusCode.ERROR


async def test_run_timeout_reaches_items_and_steps_waiting_to_retry(h: Harness) -> None:
    p = Pipeline("orders", timeout=0.05)

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return [0, 1]

    @p.step(map_over="extract")
    async def load(ctx: StepContext, item: int) -> int:
        if item == 1:
            await anyio.Event().wait()
        return item

    @p.step(retry=RetryPolicy(max_attempts=3))
    async def flaky(ctx: StepContext) -> None:
        raise RuntimeError("transient")

    async def never() -> None:
        await anyio.Event().wait()

    h.sleep_gate = never
    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.failed_step in {"load", "flaky"}
    assert outcome.error == "run timed out after 0.05 s"
    assert h.recorder.statuses() == {
        "extract": ["succeeded"],
        "flaky": ["failed"],
        "load[0]": ["succeeded"],
        "load[1]": ["failed"],
    }
    assert h.recorder.of("load[1]")[0].error == "run timed out after 0.05 s"
    assert (h.recorder.of("flaky")[0].error or "").startswith("RuntimeError: transient")


async def test_a_run_within_its_timeout_is_unaffected(h: Harness) -> None:
    p = Pipeline("orders", timeout=60)

    @p.step
    async def only(ctx: StepContext) -> int:
        return 1

    assert await h.run(p) == RunOutcome("succeeded")


async def test_cancellation_from_outside_is_not_taken_for_a_timeout(h: Harness) -> None:
    p = Pipeline("orders", timeout=60)
    running = anyio.Event()

    @p.step
    async def long(ctx: StepContext) -> None:
        running.set()
        await anyio.Event().wait()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runner.execute, h.spec(p))
            await running.wait()
            scope.cancel()
    assert h.recorder.statuses() == {"long": ["cancelled"]}


# -- typed data flow -------------------------------------------------------------------------


async def test_fresh_outputs_are_converted_to_the_parameter_annotation(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []
    batch = Batch(ids=[1], source="kept as is")

    @p.step
    async def extract(ctx: StepContext) -> dict[str, Any]:
        return {"ids": [4, 5], "source": "s3://bucket/orders"}

    @p.step
    async def same(ctx: StepContext) -> Batch:
        return batch

    @p.step
    async def count(ctx: StepContext, extract: Batch, same: Batch) -> float:
        received.extend([extract, same, ctx.upstream["extract"]])
        return len(extract.ids)

    @p.step
    async def half(ctx: StepContext, count: float) -> float:
        received.append(count)
        return count / 2

    assert await h.run(p) == RunOutcome("succeeded")
    assert received[0] == Batch(ids=[4, 5], source="s3://bucket/orders")
    assert received[1] is batch  # values of the right type pass as they are
    assert received[2] == {"ids": [4, 5], "source": "s3://bucket/orders"}  # ctx.upstream: raw
    assert received[3] == 2.0
    assert isinstance(received[3], float)


@pytest.mark.parametrize("resumed", [False, True])
async def test_a_type_mismatch_fails_the_consumer_without_retry_naming_both_steps(
    h: Harness, resumed: bool
) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> Any:
        return "not a batch"

    @p.step(retry=RetryPolicy(max_attempts=3))
    async def count(ctx: StepContext, extract: Batch) -> int:
        raise AssertionError("must not run")

    completed = {"extract": b'"not a batch"'} if resumed else {}
    outcome = await h.run(p, completed=completed)
    assert outcome.failed_step == "count"
    error = outcome.error or ""
    assert error.startswith(
        "NonRetryableError: step 'count': the output of step 'extract' does not match the"
        " annotation of parameter 'extract', expected Batch: Expected `object`, got `str`"
    )
    assert h.recorder.statuses()["count"] == ["failed"]
    assert h.delays == []


async def test_resumed_untyped_outputs_are_converted_like_fresh_ones(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []

    @p.step
    async def extract(ctx: StepContext):  # type: ignore[no-untyped-def]
        raise AssertionError("completed")

    @p.step
    async def count(ctx: StepContext, extract: Batch, stamp: list[int]) -> None:
        received.extend([extract, stamp])

    @p.step
    async def stamp(ctx: StepContext) -> tuple[int, ...]:
        return (1, 2)

    stored = {"extract": b'{"ids": [3], "source": "s"}'}
    assert await h.run(p, completed=stored) == RunOutcome("succeeded")
    assert received == [Batch(ids=[3], source="s"), [1, 2]]
