"""Declaring pipelines: the step decorator, dependencies, validation, the step context."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

import orchestrator.pipeline
from orchestrator.errors import PipelineError
from orchestrator.events import new_arrival
from orchestrator.pipeline import Pipeline, RetryPolicy, StepContext
from orchestrator.pipeline.model import DEFAULT_MAP_CONCURRENCY

pytestmark = pytest.mark.anyio


class Summary(msgspec.Struct, frozen=True):
    rows: int


def test_public_names_are_pinned() -> None:
    assert sorted(orchestrator.pipeline.__all__) == [
        "CancelStatus",
        "Pipeline",
        "RetryPolicy",
        "RunOutcome",
        "RunRecorder",
        "RunSpec",
        "Runner",
        "Step",
        "StepContext",
        "StepRecord",
        "StepStatus",
    ]
    for name in orchestrator.pipeline.__all__:
        assert getattr(orchestrator.pipeline, name) is not None


def ctx_for(step: str, **kwargs: Any) -> StepContext:
    return StepContext.create(run_id=1, pipeline="orders", step=step, **kwargs)


async def test_decorated_functions_are_returned_unchanged_and_callable() -> None:
    orders = Pipeline("orders", description="daily orders")

    async def extract(ctx: StepContext) -> list[int]:
        return [1, 2, 3]

    async def total(ctx: StepContext, extract: list[int]) -> int:
        return sum(extract)

    assert orders.step(extract) is extract
    assert orders.step(retry=2)(total) is total
    assert await total(ctx_for("total"), await extract(ctx_for("extract"))) == 6
    assert orders.description == "daily orders"
    assert list(orders.steps) == ["extract", "total"]


def test_dependencies_are_depends_on_then_parameters() -> None:
    p = Pipeline("p")

    @p.step()
    async def a(ctx: StepContext) -> int:
        return 1

    @p.step(name="bee")
    async def b(ctx: StepContext) -> int:
        return 2

    @p.step(depends_on=[b, "a"])
    async def c(ctx: StepContext, a: int) -> None:
        return None

    @p.step(depends_on="c")
    async def d(ctx: StepContext) -> None:
        return None

    step = p.steps["c"]
    assert step.depends_on == ("bee", "a")
    assert step.inputs == ("a",)
    assert p.steps["d"].depends_on == ("c",)
    assert "bee" in p.steps
    assert "b" not in p.steps


def test_retry_and_timeout_options() -> None:
    p = Pipeline("p")
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.5)

    @p.step
    async def plain(ctx: StepContext) -> None: ...

    @p.step(retry=3, timeout=30)
    async def counted(ctx: StepContext) -> None: ...

    @p.step(retry=policy, timeout=1.5)
    async def full(ctx: StepContext) -> None: ...

    assert (p.steps["plain"].retry, p.steps["plain"].timeout) == (None, None)
    assert p.steps["counted"].retry == RetryPolicy(max_attempts=3)
    assert p.steps["counted"].timeout == 30.0
    assert p.steps["full"].retry is policy


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": 0}, "retry=0: invalid RetryPolicy: max_attempts must be >= 1"),
        ({"retry": True}, "retry must be a RetryPolicy or a number of attempts"),
        ({"retry": "3"}, "retry must be a RetryPolicy or a number of attempts"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0"),
        ({"timeout": "30s"}, "timeout must be a number of seconds > 0"),
        ({"depends_on": [""]}, "depends_on contains an empty step name"),
        ({"depends_on": [42]}, "depends_on entries must be step names or step functions"),
    ],
)
def test_invalid_step_options_name_pipeline_and_step(options: dict[str, Any], message: str) -> None:
    p = Pipeline("orders")

    async def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=rf"pipeline 'orders' step 'load': {message}"):
        p.step(**options)(load)


def test_sync_function_is_rejected() -> None:
    p = Pipeline("orders")

    def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"pipeline 'orders' step 'load': .*`async def`"):
        p.step(load)  # type: ignore[type-var]


def test_missing_context_parameter_is_rejected() -> None:
    p = Pipeline("orders")

    async def load() -> None: ...

    async def keyword_only(*, ctx: StepContext) -> None: ...

    for fn in (load, keyword_only):
        with pytest.raises(PipelineError, match="first parameter must be the step context"):
            p.step(fn)


def test_variadic_parameters_are_rejected() -> None:
    p = Pipeline("orders")

    async def load(ctx: StepContext, *upstream: Any) -> None: ...

    with pytest.raises(PipelineError, match=r"parameter 'upstream' must be an ordinary"):
        p.step(load)


def test_duplicate_step_name_is_rejected() -> None:
    p = Pipeline("orders")

    @p.step
    async def load(ctx: StepContext) -> None: ...

    async def other(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"step 'load': the name is already taken by .*load"):
        p.step(name="load")(other)


def test_depends_on_a_function_that_is_not_a_step() -> None:
    p = Pipeline("orders")

    async def helper(ctx: StepContext) -> None: ...

    async def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"step 'load': depends_on names '.*helper'"):
        p.step(depends_on=[helper])(load)


def test_unknown_dependency_fails_validation_with_a_suggestion() -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return []

    @p.step
    async def total(ctx: StepContext, extrct: list[int]) -> int:
        return 0

    with pytest.raises(PipelineError) as info:
        p.validate()
    message = str(info.value)
    assert "pipeline 'orders' step 'total'" in message
    assert "its parameter 'extrct' names no step" in message
    assert "did you mean 'extract'?" in message


def test_unknown_depends_on_name_fails_validation() -> None:
    p = Pipeline("orders")

    @p.step(depends_on=["publish"])
    async def extract(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"step 'extract': depends_on 'publish' names no step"):
        p.validate()


def test_cycle_is_reported_with_its_path() -> None:
    p = Pipeline("orders")

    @p.step
    async def start(ctx: StepContext) -> None: ...

    @p.step(depends_on=["c", start])
    async def a(ctx: StepContext) -> None: ...

    @p.step
    async def b(ctx: StepContext, a: None) -> None: ...

    @p.step
    async def c(ctx: StepContext, b: None) -> None: ...

    with pytest.raises(PipelineError) as info:
        p.validate()
    assert "pipeline 'orders' step 'a': dependency cycle a -> c -> b -> a" in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    p = Pipeline("orders")

    @p.step(depends_on=["loop"])
    async def loop(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match="dependency cycle loop -> loop"):
        p.validate()


def test_empty_pipeline_is_invalid() -> None:
    with pytest.raises(PipelineError, match="pipeline 'empty' has no steps"):
        Pipeline("empty").validate()
    with pytest.raises(PipelineError, match="non-empty name"):
        Pipeline("  ")


def test_unstorable_return_annotation_is_rejected() -> None:
    p = Pipeline("orders")

    @p.step
    async def handle(ctx: StepContext) -> logging.Logger:
        return logging.getLogger()

    with pytest.raises(
        PipelineError, match=r"step 'handle': return annotation .* cannot be stored"
    ):
        p.validate()


def test_plan_orders_dependencies_first_and_resolves_output_types() -> None:
    p = Pipeline("orders")

    @p.step
    async def report(ctx: StepContext, summary: Summary, raw: list[int]) -> str:
        return ""

    @p.step
    async def summary(ctx: StepContext, raw: list[int]) -> Summary:
        return Summary(rows=len(raw))

    @p.step
    async def raw(ctx: StepContext) -> list[int]:
        return []

    @p.step
    async def untyped(ctx: StepContext):  # type: ignore[no-untyped-def]
        return None

    plan = p.plan()
    assert plan.order.index("raw") < plan.order.index("summary") < plan.order.index("report")
    assert plan.dependents["raw"] == ("report", "summary")
    assert plan.output_types["summary"] is Summary
    assert plan.output_types["untyped"] is Any
    assert plan.decoders["summary"].decode(b'{"rows": 3}') == Summary(rows=3)
    assert p.plan() is plan


def test_unresolvable_annotation_falls_back_to_any(caplog: pytest.LogCaptureFixture) -> None:
    p = Pipeline("orders")

    @p.step
    async def load(ctx: StepContext) -> NotDefinedAnywhere:  # type: ignore[name-defined]  # noqa: F821
        return None

    plan = p.plan()
    assert plan.output_types["load"] is Any
    assert "decodes as plain JSON" in caplog.text


def test_adding_a_step_invalidates_the_plan() -> None:
    p = Pipeline("orders")

    @p.step
    async def a(ctx: StepContext) -> None: ...

    first = p.plan()

    @p.step
    async def b(ctx: StepContext, a: None) -> None: ...

    assert p.plan() is not first
    assert p.plan().order == ("a", "b")


def test_context_exposes_run_data_read_only(caplog: pytest.LogCaptureFixture) -> None:
    event = new_arrival("orders", partition="2026-11-24")
    ctx = ctx_for("load", attempt=2, events=(event,), params={"full": True}, upstream={"a": 1})
    assert ctx.event is event
    assert ctx.attempt == 2
    with pytest.raises(TypeError):
        ctx.params["full"] = False  # type: ignore[index]
    with pytest.raises(TypeError):
        ctx.upstream["a"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        ctx.attempt = 3  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="orchestrator.steps.orders"):
        ctx.log.info("loaded %d rows", 5)
    record = caplog.records[-1]
    assert record.getMessage() == "loaded 5 rows"
    assert (record.run_id, record.step, record.attempt) == (1, "load", 2)  # type: ignore[attr-defined]


def test_context_event_without_events_explains() -> None:
    with pytest.raises(PipelineError, match="has no triggering event"):
        _ = ctx_for("load").event


# -- fan-out, skip conditions, pipeline options ------------------------------------------------


def test_mapped_step_takes_its_item_after_the_context() -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[Summary]:
        return []

    @p.step
    async def config(ctx: StepContext) -> dict[str, int]:
        return {}

    @p.step(map_over=extract)
    async def load(ctx: StepContext, part: Summary, config: dict[str, int]) -> int:
        return part.rows

    @p.step(map_over="extract", concurrency=2, depends_on=["config"])
    async def check(ctx: StepContext, part: Summary) -> None: ...

    step = p.steps["load"]
    assert (step.map_over, step.item, step.inputs) == ("extract", "part", ("config",))
    assert step.depends_on == ("extract", "config")
    assert step.concurrency == DEFAULT_MAP_CONCURRENCY == 8
    assert p.steps["check"].concurrency == 2
    assert p.steps["check"].depends_on == ("config", "extract")
    assert p.steps["extract"].map_over is None
    assert p.steps["extract"].concurrency is None
    plan = p.plan()
    assert plan.output_types["load"] == list[int]
    assert plan.decoders["load"].decode(b"[1,2]") == [1, 2]
    assert plan.item_decoders["load"].decode(b"3") == 3
    assert plan.item_types["load"] is Summary
    assert plan.input_types["load"] == {"config": dict[str, int]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"map_over": "extract", "concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"map_over": "extract", "concurrency": 1.5}, "concurrency must be an integer >= 1"),
        ({"concurrency": 4}, "concurrency bounds the items of a mapped step; pass map_over"),
        ({"map_over": ""}, "map_over is an empty step name"),
        ({"map_over": 42}, "map_over must be step names or step functions"),
        ({"skip_if": True}, "skip_if must be a function of the context"),
        ({"skip_if": lambda: True}, "the first parameter of skip_if must be the step context"),
        (
            {"skip_if": lambda ctx, *rest: True},
            "parameter 'rest' of skip_if must be an ordinary named parameter",
        ),
    ],
)
def test_invalid_fanout_and_skip_options(options: dict[str, Any], message: str) -> None:
    p = Pipeline("orders")

    async def load(ctx: StepContext, item: int) -> None: ...

    with pytest.raises(PipelineError, match=rf"pipeline 'orders' step 'load': {message}"):
        p.step(**options)(load)


def test_mapped_step_without_an_item_parameter_is_rejected() -> None:
    p = Pipeline("orders")

    async def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match="a mapped step takes one item after the context"):
        p.step(map_over="extract")(load)


def test_async_skip_condition_is_rejected() -> None:
    p = Pipeline("orders")

    async def holiday(ctx: StepContext) -> bool:
        return True

    async def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"skip_if must be a plain \(not async\) function"):
        p.step(skip_if=holiday)(load)


def test_item_names_are_reserved() -> None:
    p = Pipeline("orders")

    async def load(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineError, match=r"names ending in \[n\] are reserved"):
        p.step(name="load[0]")(load)
    p.step(name="load[x]")(load)  # only [digits] is an item's


def test_skip_condition_parameters_are_dependencies() -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext) -> list[int]:
        return []

    @p.step(skip_if=lambda ctx, extrct: not extrct)
    async def load(ctx: StepContext) -> None: ...

    assert p.steps["load"].skip_inputs == ("extrct",)
    with pytest.raises(PipelineError, match=r"the parameter 'extrct' of skip_if names no step"):
        p.validate()


def test_mapping_over_an_unknown_step_or_a_non_list_fails_validation() -> None:
    p = Pipeline("orders")

    @p.step
    async def count(ctx: StepContext) -> int:
        return 0

    @p.step(map_over="cuont")
    async def load(ctx: StepContext, item: int) -> None: ...

    with pytest.raises(PipelineError, match=r"map_over 'cuont' names no step.*'count'\?"):
        p.validate()

    q = Pipeline("orders")
    q.step(count)
    q.step(map_over="count")(load)
    with pytest.raises(
        PipelineError, match=r"step 'load': map_over 'count' names a step that returns int, not"
    ):
        q.validate()


def test_mapping_over_a_mapped_step_or_an_untyped_step_is_valid() -> None:
    p = Pipeline("orders")

    @p.step
    async def extract(ctx: StepContext):  # type: ignore[no-untyped-def]
        return []

    @p.step(map_over="extract")
    async def first(ctx: StepContext, item: int) -> list[int]:
        return [item]

    @p.step(map_over="first")
    async def second(ctx: StepContext, item: list[int]) -> int:
        return len(item)

    assert p.plan().output_types["second"] == list[int]


def test_pipeline_timeout_and_max_concurrent_runs() -> None:
    p = Pipeline("orders", timeout=3600, max_concurrent_runs=2)
    assert (p.timeout, p.max_concurrent_runs) == (3600.0, 2)
    assert (Pipeline("p").timeout, Pipeline("p").max_concurrent_runs) == (None, None)
    for bad in (0, -1, "1h", True):
        with pytest.raises(PipelineError, match=r"pipeline 'p': timeout must be a number"):
            Pipeline("p", timeout=bad)  # type: ignore[arg-type]
    for bad in (0, 1.5, "2", True):
        with pytest.raises(PipelineError, match=r"pipeline 'p': max_concurrent_runs must be"):
            Pipeline("p", max_concurrent_runs=bad)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p.timeout = 5  # type: ignore[misc]


def test_context_map_index_defaults_to_none() -> None:
    assert ctx_for("load").map_index is None
    assert ctx_for("load[3]", map_index=3).map_index == 3


def test_steps_that_never_wait_are_told_apart_conservatively() -> None:
    import functools

    from orchestrator.pipeline.suspension import never_waits

    async def pure(ctx: StepContext) -> int:
        return 1

    async def sleeps(ctx: StepContext) -> None:
        await asyncio.sleep(0)

    async def enters(ctx: StepContext, lock: asyncio.Lock) -> None:
        async with lock:
            pass

    async def iterates(ctx: StepContext, rows: Any) -> list[Any]:
        return [r async for r in rows]

    async def spawns(ctx: StepContext) -> int:
        async def inner() -> int:
            return 1

        inner().close()  # a nested coroutine's awaits are its own
        return 1

    @functools.wraps(pure)
    async def wrapped(ctx: StepContext) -> int:
        return await pure(ctx)

    class Steps:
        async def method(self, ctx: StepContext) -> int:
            return 1

        async def __call__(self, ctx: StepContext) -> int:
            return 1

    assert never_waits(pure)
    assert never_waits(spawns)
    assert never_waits(Steps().method)
    assert not never_waits(sleeps)
    assert not never_waits(enters)
    assert not never_waits(iterates)
    assert not never_waits(wrapped)  # what is called is the wrapper, which awaits
    assert not never_waits(Steps())  # not a function: assumed to wait
    assert not never_waits(functools.partial(pure))
    assert not never_waits(lambda ctx: pure(ctx))  # noqa: PLW0108 - a plain function returning an awaitable

    p = Pipeline("p")
    p.step(pure)
    p.step(sleeps, name="sleeps")
    assert p.steps["pure"].never_waits
    assert not p.steps["sleeps"].never_waits
