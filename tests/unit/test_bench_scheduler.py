"""``python -m bench.scheduler`` drives the real scheduler, runner and writer: every run's
attempts are encoded as the store would send them, and every outcome is reported."""

from __future__ import annotations

import pytest

from bench.pipelines import chain3, single
from bench.scheduler import measure

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("pipeline", "steps"), [(chain3, 3), (single, 1)])
async def test_every_step_of_every_run_is_written(pipeline: object, steps: int) -> None:
    cpu, store = await measure(pipeline, runs=25, batch=10)  # type: ignore[arg-type]
    assert store.attempts == 25 * steps
    assert store.bytes > 0
    assert cpu > 0
