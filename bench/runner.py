"""Runner microbenchmark: CPU per run of ``Runner.execute`` for trivial chained steps.

Run ``python -m bench.runner`` from the repository root. It executes ``--runs`` runs of a
3-step chain ``a -> b -> c`` and of a 1-step pipeline, ``--concurrency`` at once, under
uvloop, with what the daemon uses without an exporter: a tracer from a ``TracerProvider``
with the ``ALWAYS_OFF`` sampler, the API's no-op meter (``--sdk-meter``: an SDK
``MeterProvider`` without readers, what every histogram record costs with one), and a
recorder that only appends what it is given to a list (as the daemon's recorder hands
attempts to its group-commit writer). Each run executes inside a ``run <pipeline>`` span,
as the scheduler does.

Prints µs of CPU and of wall time per run (best of ``--repeat``) and runs/s, and writes
``bench/results/runner-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider, sampling

from bench.report import git_commit, write_stamped
from orchestrator.events import new_arrival
from orchestrator.pipeline import Pipeline, Runner, RunSpec, StepContext, StepRecord


class ListRecorder:
    """Appends every call to a list, like the daemon's recorder handing rows to its writer;
    the list is emptied every ``FLUSH`` rows, as the writer's batches are."""

    FLUSH = 512

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.count = 0

    def _add(self, row: Any) -> None:
        rows = self.rows
        rows.append(row)
        if len(rows) >= self.FLUSH:
            self.count += len(rows)
            rows.clear()

    async def step_started(
        self, run_id: int, step: str, attempt: int, started_at: datetime
    ) -> None:
        self._add((run_id, step, attempt, "running", started_at))

    async def step_finished(self, record: StepRecord) -> None:
        self._add(record)

    def total(self) -> int:
        return self.count + len(self.rows)


def chain(steps: int) -> Pipeline:
    p = Pipeline(f"chain{steps}")
    previous: str | None = None
    for i in range(steps):

        async def fn(ctx: StepContext) -> int:
            return 1

        name = f"s{i}"
        p.step(name=name, depends_on=[previous] if previous else [])(fn)
        previous = name
    p.validate()
    return p


async def measure(
    runner: Runner, tracer: trace.Tracer, pipeline: Pipeline, runs: int, concurrency: int
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``runs`` runs, ``concurrency`` at once."""
    event = new_arrival("orders", partition="2026-11-25", id="evt-1")
    specs = [
        RunSpec(run_id=i, pipeline=pipeline, events=(event,), params={"day": "2026-11-25"})
        for i in range(runs)
    ]
    todo = iter(specs)
    gc.collect()
    gc.freeze()  # the prepared specs and everything before: not the collector's work

    async def worker() -> None:
        for spec in todo:
            with tracer.start_as_current_span(f"run {pipeline.name}"):
                outcome = await runner.execute(spec)
            if outcome.status != "succeeded":
                raise AssertionError(f"run {spec.run_id}: {outcome}")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    finally:
        gc.unfreeze()
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    tracer = TracerProvider(sampler=sampling.ALWAYS_OFF).get_tracer("bench")
    meter = (
        MeterProvider().get_meter("bench")
        if args.sdk_meter
        else metrics.NoOpMeterProvider().get_meter("bench")
    )
    recorder = ListRecorder()
    runner = Runner(recorder, tracer=tracer, meter=meter)
    figures = []
    for steps in (3, 1):
        pipeline = chain(steps)
        await measure(runner, tracer, pipeline, min(args.runs, 2000), args.concurrency)
        best_cpu = best_wall = float("inf")
        for _ in range(args.repeat):
            recorder.rows.clear()
            recorder.count = 0
            cpu, wall = await measure(runner, tracer, pipeline, args.runs, args.concurrency)
            best_cpu, best_wall = min(best_cpu, cpu), min(best_wall, wall)
        assert recorder.total() == 2 * steps * args.runs
        row = {
            "steps": steps,
            "runs": args.runs,
            "concurrency": args.concurrency,
            "cpu_us_per_run": round(best_cpu / args.runs * 1e6, 1),
            "wall_us_per_run": round(best_wall / args.runs * 1e6, 1),
            "runs_per_second": round(args.runs / best_wall),
        }
        figures.append(row)
        print(
            f"{steps} step(s): {row['cpu_us_per_run']:>7.1f} µs CPU/run"
            f" {row['wall_us_per_run']:>7.1f} µs wall/run {row['runs_per_second']:>9,} runs/s"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__)
    parser.add_argument("--runs", type=int, default=20_000, help="runs per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="runs executing at once")
    parser.add_argument("--repeat", type=int, default=3, help="measurements; the best counts")
    parser.add_argument(
        "--sdk-meter", action="store_true", help="an SDK meter provider instead of the no-op"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    figures = anyio.run(bench, args, backend_options={"use_uvloop": True})
    now = datetime.now(UTC)
    report = {
        "benchmark": "runner",
        "date": now.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "method": f"best of {args.repeat}; CPU = process time over the whole measurement",
        "meter": "sdk" if args.sdk_meter else "no-op",
        "figures": figures,
    }
    if not args.no_write:
        print(f"wrote {write_stamped('runner', report, now)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
