"""docs/pipelines.md runs: its Python examples execute in order, as one module, and the
``test_*`` coroutines they define pass. Blocks marked ``<!-- fragment ... -->`` are excerpts
(they name objects of the daemon) and are only compiled."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.pipeline import Pipeline

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipelines.md"
BLOCK = re.compile(r"(?P<marker><!-- fragment[^>]*-->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def blocks() -> list[tuple[int, str, bool]]:
    """(line, code, is_fragment) of every Python block, in order."""
    text = DOC.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m["code"], m["marker"] is not None)
        for m in BLOCK.finditer(text)
    ]


@pytest.fixture
def module() -> Iterator[types.ModuleType]:
    """A real module, so that msgspec and typing resolve the examples' annotations."""
    mod = types.ModuleType("docs_pipelines")
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


async def test_examples_run_in_order_and_their_tests_pass(module: types.ModuleType) -> None:
    found = blocks()
    assert len(found) >= 8
    for line, code, fragment in found:
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if fragment else 0  # excerpts of coroutines
        compiled = compile(code, f"{DOC}:{line}", "exec", flags=flags)
        if not fragment:
            exec(compiled, module.__dict__)
    pipelines = [v for v in vars(module).values() if isinstance(v, Pipeline)]
    assert {p.name for p in pipelines} >= {"orders", "daily_load", "typed", "nightly"}
    for pipeline in pipelines:
        pipeline.validate()
    tests = [
        fn
        for name, fn in vars(module).items()
        if name.startswith("test_") and inspect.iscoroutinefunction(fn)
    ]
    assert [fn.__name__ for fn in tests] == ["test_total", "test_daily_load"]
    for fn in tests:
        await fn()


def test_every_option_is_documented() -> None:
    text = DOC.read_text()
    step_options = [
        name
        for name, param in inspect.signature(Pipeline.step).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    pipeline_options = [
        name
        for name, param in inspect.signature(Pipeline).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert {"map_over", "concurrency", "skip_if"} <= set(step_options)
    assert {"timeout", "max_concurrent_runs"} <= set(pipeline_options)
    missing = [o for o in (*step_options, *pipeline_options) if f"| `{o}` |" not in text]
    assert not missing, f"docs/pipelines.md has no table row for {missing}"
