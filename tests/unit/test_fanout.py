"""Fan-out: a mapped step runs once per item of its upstream list, under a concurrency bound.

Same harness as ``test_runner.py`` (in-memory recorder, fake sleep, in-memory telemetry);
overlap and order are forced with events and bounded waits on conditions, never sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from orchestrator.errors import NonRetryableError, StepError, StoreError
from orchestrator.pipeline import Pipeline, RetryPolicy, RunOutcome, StepContext
from tests.unit.test_runner import GUARD, Harness

pytestmark = pytest.mark.anyio


class Partition(msgspec.Struct, frozen=True):
    name: str
    rows: int


class Loaded(msgspec.Struct, frozen=True):
    partition: str
    rows: int


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.meter_provider.shutdown()
    harness.tracer_provider.shutdown()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield to the other tasks until ``condition`` holds (bounded by the test's guard)."""
    while not condition():
        await anyio.lowlevel.checkpoint()


async def let_others_run(rounds: int = 50) -> None:
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


def partitions(n: int) -> list[Partition]:
    return [Partition(name=f"2026-11-{i + 10}", rows=i) for i in range(n)]


async def test_items_run_per_element_and_the_reduce_receives_outputs_in_item_order(
    h: Harness,
) -> None:
    p = Pipeline("orders")
    contexts: list[StepContext] = []
    finished: list[int] = []
    may_finish = [anyio.Event() for _ in range(3)]
    received: list[Any] = []

    @p.step
    async def extract(ctx: StepContext) -> list[Partition]:
        return partitions(3)

    @p.step(map_over="extract", concurrency=3)
    async def load(ctx: StepContext, part: Partition) -> Loaded:
        contexts.append(ctx)
        await may_finish[part.rows].wait()  # finish in reverse order: 2, 1, 0
        finished.append(part.rows)
        if part.rows > 0:
            may_finish[part.rows - 1].set()
        return Loaded(partition=part.name, rows=part.rows * 10)

    @p.step
    async def report(ctx: StepContext, load: list[Loaded]) -> int:
        received.append(load)
        return sum(x.rows for x in load)

    may_finish[2].set()
    assert await h.run(p) == RunOutcome("succeeded")
    assert finished == [2, 1, 0]
    assert received == [[Loaded(f"2026-11-{10 + i}", i * 10) for i in range(3)]]
    assert sorted((c.step, c.map_index) for c in contexts) == [
        ("load[0]", 0),
        ("load[1]", 1),
        ("load[2]", 2),
    ]
    assert {c.attempt for c in contexts} == {1}
    assert all(dict(c.upstream) == {"extract": partitions(3)} for c in contexts)
    statuses = h.recorder.statuses()
    assert statuses == {
        "extract": ["succeeded"],
        "load[2]": ["succeeded"],
        "load[1]": ["succeeded"],
        "load[0]": ["succeeded"],
        "load": ["succeeded"],
        "report": ["succeeded"],
    }
    (own,) = h.recorder.of("load")
    assert own.attempt == 1
    assert msgspec.json.decode(own.output or b"", type=list[Loaded]) == received[0]
    assert ("load", 1) not in h.recorder.started  # the step's own record: step_finished only
    assert h.recorder.of("report")[0].output == b"30"


async def test_at_most_concurrency_items_are_in_flight(h: Harness) -> None:
    p = Pipeline("orders")
    running = 0
    peak = 0
    started: list[int] = []
    release = [anyio.Event() for _ in range(10)]

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return list(range(10))

    @p.step(map_over=extract, concurrency=3)
    async def load(ctx: StepContext, item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        started.append(item)
        try:
            await release[item].wait()
        finally:
            running -= 1
        return item

    outcome: list[RunOutcome] = []

    async def execute() -> None:
        outcome.append(await h.runner.execute(h.spec(p)))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(execute)
            await wait_until(lambda: running == 3)
            await let_others_run()  # a runner ignoring the bound would start more now
            assert started == [0, 1, 2]
            for done in range(10):  # free one slot at a time: exactly one more item starts
                release[started[done]].set()
                expected = min(done + 4, 10)
                await wait_until(lambda n=expected: len(started) == n)  # type: ignore[misc]
                await let_others_run()
                assert len(started) == expected
                assert running <= 3

    assert outcome == [RunOutcome("succeeded")]
    assert peak == 3
    assert started == list(range(10))  # items start in list order
    assert h.recorder.of("load")[0].output == b"[0,1,2,3,4,5,6,7,8,9]"


async def test_each_item_has_its_own_retries_timeouts_attempts_and_span(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[str]:
        return ["a", "b", "c"]

    @p.step(map_over="extract", retry=RetryPolicy(max_attempts=2, jitter=0.0), timeout=0.01)
    async def load(ctx: StepContext, item: str) -> str:
        if item == "b" and ctx.attempt == 1:
            raise StepError("warehouse busy")
        if item == "c" and ctx.attempt == 1:
            await anyio.Event().wait()  # runs out of time once
        return item.upper()

    with h.tracer.start_as_current_span("run orders"):
        assert await h.run(p) == RunOutcome("succeeded")
    assert h.recorder.statuses() == {
        "extract": ["succeeded"],
        "load[0]": ["succeeded"],
        "load[1]": ["failed", "succeeded"],
        "load[2]": ["failed", "succeeded"],
        "load": ["succeeded"],
    }
    timed_out = h.recorder.of("load[2]")[0]
    assert (timed_out.error or "").startswith(
        "TimeoutError: step 'load[2]' did not finish within 0.01s"
    )
    assert sorted(s for s in h.recorder.started if s[0] != "extract") == [
        ("load[0]", 1),
        ("load[1]", 1),
        ("load[1]", 2),
        ("load[2]", 1),
        ("load[2]", 2),
    ]
    assert h.delays == [1.0, 1.0]
    assert h.recorder.of("load")[0].output == b'["A","B","C"]'

    spans = {(s.name, (s.attributes or {}).get("orchestrator.attempt")): s for s in h.spans()}
    mapped = spans["step load", 1]
    assert (mapped.attributes or {})["orchestrator.step.items"] == 3
    assert (mapped.attributes or {})["orchestrator.step.status"] == "succeeded"
    item = spans["step load[1]", 2]
    assert item.parent is not None
    assert mapped.context is not None
    assert item.parent.span_id == mapped.context.span_id
    assert dict(item.attributes or {}) == {
        "orchestrator.run_id": 7,
        "orchestrator.pipeline": "orders",
        "orchestrator.step": "load[1]",
        "orchestrator.attempt": 2,
        "orchestrator.step.index": 1,
        "orchestrator.step.status": "succeeded",
    }


async def test_resume_runs_only_the_items_without_a_stored_output(h: Harness) -> None:
    p = Pipeline("orders")
    ran: list[tuple[str, int]] = []
    received: list[list[Loaded]] = []

    @p.step
    async def extract(ctx: StepContext) -> list[Partition]:
        raise AssertionError("completed: must not run again")

    @p.step(map_over="extract")
    async def load(ctx: StepContext, part: Partition) -> Loaded:
        ran.append((part.name, ctx.attempt))
        return Loaded(partition=part.name, rows=part.rows)

    @p.step
    async def report(ctx: StepContext, load: list[Loaded]) -> None:
        received.append(load)

    stored = {
        "extract": msgspec.json.encode(partitions(4)),
        "load[0]": msgspec.json.encode(Loaded("stored-0", 100)),
        "load[2]": msgspec.json.encode(Loaded("stored-2", 102)),
        "load[9]": b'{"partition": "from a longer list", "rows": 0}',  # beyond the list
    }
    outcome = await h.run(p, completed=stored, prior_attempts={"load[1]": 1})
    assert outcome == RunOutcome("succeeded")
    assert ran == [("2026-11-11", 2), ("2026-11-13", 1)]
    assert h.recorder.started == [("load[1]", 2), ("load[3]", 1), ("report", 1)]
    expected = [
        Loaded("stored-0", 100),
        Loaded("2026-11-11", 1),
        Loaded("stored-2", 102),
        Loaded("2026-11-13", 3),
    ]
    assert received == [expected]
    assert all(isinstance(x, Loaded) for x in received[0])
    (own,) = h.recorder.of("load")
    assert msgspec.json.decode(own.output or b"", type=list[Loaded]) == expected


async def test_resume_with_every_item_stored_records_the_step_without_running_items(
    h: Harness,
) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return []

    @p.step(map_over="extract")
    async def load(ctx: StepContext, item: int) -> int:
        raise AssertionError("every item is stored")

    stored = {"extract": b"[1,2]", "load[0]": b"10", "load[1]": b"20"}
    assert await h.run(p, completed=stored, prior_attempts={"load": 1}) == RunOutcome("succeeded")
    assert h.recorder.started == []
    ((step, attempt, output),) = [(r.step, r.attempt, r.output) for r in h.recorder.finished]
    assert (step, attempt, output) == ("load", 2, b"[10,20]")


async def test_a_completed_mapped_step_is_not_rerun(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[list[int]] = []

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        raise AssertionError("completed")

    @p.step(map_over="extract")
    async def load(ctx: StepContext, item: int) -> int:
        raise AssertionError("completed")

    @p.step
    async def report(ctx: StepContext, load: list[int]) -> None:
        received.append(load)

    stored = {"extract": b"[1,2]", "load[0]": b"10", "load[1]": b"20", "load": b"[10,20]"}
    assert await h.run(p, completed=stored) == RunOutcome("succeeded")
    assert received == [[10, 20]]
    assert h.recorder.started == [("report", 1)]


async def test_a_failing_item_fails_the_step_naming_its_index(h: Harness) -> None:
    p = Pipeline("orders")
    started: list[int] = []

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return list(range(6))

    @p.step(map_over="extract", concurrency=2, retry=3)
    async def load(ctx: StepContext, item: int) -> int:
        started.append(item)
        if item == 1:
            raise NonRetryableError("partition 1 has no schema")
        await h.recorder.on_finished("load[1]", "failed").wait()  # in flight at the failure
        return item

    @p.step
    async def report(ctx: StepContext, load: list[int]) -> None:
        raise AssertionError("must not start")

    outcome = await h.run(p)
    assert outcome.status == "failed"
    assert outcome.failed_step == "load"
    assert (outcome.error or "").startswith(
        "item 1 of 6 failed: NonRetryableError: partition 1 has no schema"
    )
    assert sorted(started) == [0, 1]  # the item in flight finished; no other started
    assert h.recorder.statuses() == {
        "extract": ["succeeded"],
        "load[1]": ["failed"],
        "load[0]": ["succeeded"],
        "load": ["failed"],
    }
    (own,) = h.recorder.of("load")
    assert own.error == outcome.error
    assert own.output is None
    (span,) = [s for s in h.spans() if s.name == "step load"]
    assert (span.attributes or {})["orchestrator.step.status"] == "failed"


async def test_an_item_in_backoff_is_not_retried_once_another_item_failed(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return [0, 1]

    @p.step(map_over="extract", retry=RetryPolicy(max_attempts=5, jitter=0.0))
    async def load(ctx: StepContext, item: int) -> int:
        if item == 0:
            raise StepError("transient")
        await h.recorder.on_finished("load[0]", "failed").wait()
        raise NonRetryableError("fatal")

    h.sleep_gate = h.recorder.on_finished("load[1]", "failed").wait
    outcome = await h.run(p)
    assert outcome.failed_step == "load"
    assert (outcome.error or "").startswith("item 1 of 2 failed: NonRetryableError: fatal")
    assert h.recorder.statuses() == {
        "extract": ["succeeded"],
        "load[0]": ["failed"],
        "load[1]": ["failed"],
        "load": ["failed"],
    }


async def test_an_empty_list_maps_to_an_empty_list(h: Harness) -> None:
    p = Pipeline("orders")
    received: list[Any] = []

    @p.step
    async def extract(ctx: StepContext) -> list[Partition]:
        return []

    @p.step(map_over="extract")
    async def load(ctx: StepContext, part: Partition) -> Loaded:
        raise AssertionError("no item")

    @p.step
    async def report(ctx: StepContext, load: list[Loaded]) -> None:
        received.append(load)

    assert await h.run(p) == RunOutcome("succeeded")
    assert received == [[]]
    assert h.recorder.of("load")[0].output == b"[]"


async def test_mapped_step_takes_other_upstream_outputs_by_name(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def config(ctx: StepContext) -> dict[str, int]:
        return {"factor": 3}

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return [1, 2]

    @p.step(map_over="extract")
    async def scale(ctx: StepContext, value: int, config: dict[str, int]) -> int:
        return value * config["factor"]

    assert p.steps["scale"].depends_on == ("extract", "config")
    assert await h.run(p) == RunOutcome("succeeded")
    assert h.recorder.of("scale")[0].output == b"[3,6]"


async def test_mapping_over_something_not_a_list_fails_the_step(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> Any:
        return {"not": "a list"}

    @p.step(map_over="extract", retry=3)
    async def load(ctx: StepContext, item: Any) -> None:
        raise AssertionError("no item")

    outcome = await h.run(p)
    assert outcome.failed_step == "load"
    assert "maps over the output of step 'extract', which is dict, not a list" in (
        outcome.error or ""
    )
    assert h.recorder.statuses() == {"extract": ["succeeded"], "load": ["failed"]}


async def test_items_are_converted_to_the_item_annotation(h: Harness) -> None:
    p = Pipeline("orders")
    seen: list[Any] = []

    @p.step
    async def extract(ctx: StepContext) -> list[dict[str, Any]]:
        return [{"name": "a", "rows": 1}, {"name": "b", "rows": "many"}]

    @p.step(map_over="extract", retry=3)
    async def load(ctx: StepContext, part: Partition) -> int:
        seen.append(part)
        return part.rows

    outcome = await h.run(p)
    assert seen == [Partition("a", 1)]
    assert outcome.failed_step == "load"
    error = outcome.error or ""
    assert error.startswith("item 1 of 2 failed: NonRetryableError: step 'load': item 1 of")
    assert "step 'extract'" in error
    assert "expected Partition" in error
    assert h.recorder.statuses()["load[1]"] == ["failed"]


async def test_a_recorder_failure_in_an_item_stops_the_run_and_propagates(h: Harness) -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return [0, 1]

    @p.step(map_over="extract")
    async def load(ctx: StepContext, item: int) -> int:
        await anyio.Event().wait()  # item 0 is in flight when item 1 cannot be recorded
        return item

    h.recorder.fail_on_start.add("load[1]")
    with pytest.raises(StoreError, match="postgres went away"):
        await h.run(p)
    assert h.recorder.statuses() == {"extract": ["succeeded"], "load[0]": ["interrupted"]}
