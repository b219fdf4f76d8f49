"""Scheduler microbenchmark: the daemon's CPU per run from intake hand-over to durable outcome,
without Kafka or Postgres.

Run ``python -m bench.scheduler`` from the repository root. It hands ``--runs`` runs of the
benchmark's ``chain3`` (a -> b -> c) and ``single`` pipelines to a :class:`Scheduler` the
way the intake does (:meth:`Scheduler.adopt`, ``--batch`` runs at a time, waiting for room
as the intake does), under uvloop, with what the daemon uses without an exporter (a tracer
whose sampler is ``ALWAYS_OFF``, the API's no-op meter) and the events' sampled
``traceparent`` as W1 publishes them. It stops the clock when every outcome is durable.

What is measured: the scheduler's workers, the runner, the recorder, the group-commit
writer, and the encoding of the writer's rows as the store sends them to Postgres. The
store is a stand-in that encodes what it is given with the store's own functions and
answers at once: no asyncpg, no Postgres. W1 adds the intake and both of those.

Prints µs of CPU per run (best of ``--repeat``) and writes
``bench/results/scheduler-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from opentelemetry import metrics
from opentelemetry.sdk.trace import TracerProvider, sampling

from bench.pipelines import chain3, single
from bench.report import git_commit, write_stamped
from orchestrator.config import RunnerSettings
from orchestrator.events import new_arrival
from orchestrator.health import Health
from orchestrator.pipeline import Pipeline
from orchestrator.pipeline.scheduler import Scheduler
from orchestrator.store import AttemptRow, ClaimedRun, OutboxWrite, RunFinish
from orchestrator.store.batch import attempt_rows, outcome_rows
from orchestrator.telemetry import Telemetry

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class EncodingStore:
    """What the scheduler asks of the store, answered at once; the writer's rows are encoded
    as :meth:`Store.record_outcomes` encodes them, and counted."""

    def __init__(self, runs: int) -> None:
        self.attempts = 0
        self.finished = 0
        self.bytes = 0
        self.all_finished = anyio.Event()
        self._runs = runs

    async def record_outcomes(
        self,
        owner: str,
        attempts: Sequence[AttemptRow],
        finishes: Sequence[RunFinish],
        releases: Sequence[int] = (),
        outbox: Sequence[OutboxWrite] = (),
        *,
        notify_finished: bool = True,
    ) -> tuple[set[int], set[int]]:
        self.bytes += len(attempt_rows(attempts)) + len(outcome_rows(finishes))
        self.attempts += len(attempts)
        ids = [f.run_id for f in finishes]
        self.finished += len(ids)
        if self.finished >= self._runs:
            self.all_finished.set()
        return set(), {*ids, *releases}

    async def claim_runs(self, *_args: Any, **_kwargs: Any) -> list[ClaimedRun]:
        return []

    async def heartbeat(self, _owner: str, run_ids: Sequence[int], _lease: float) -> set[int]:
        return set(run_ids)

    async def reclaim_expired(self) -> int:
        return 0


def claimed(run_id: int, pipeline: Pipeline, now: datetime) -> ClaimedRun:
    event = new_arrival("bench.scheduler", id=f"evt-{run_id}")
    return ClaimedRun(
        id=run_id,
        rule="bench",
        pipeline=pipeline.name,
        params={},
        event_ids=[run_id],
        first_event_at=now,
        traceparent=TRACEPARENT,
        tracestate=None,
        links=[],
        claims=1,
        cancel_requested=False,
        events=(event,),
    )


async def measure(pipeline: Pipeline, runs: int, batch: int) -> tuple[float, EncodingStore]:
    """CPU seconds for ``runs`` runs handed over ``batch`` at a time, until all are durable."""
    store = EncodingStore(runs)
    telemetry = Telemetry.from_providers(
        TracerProvider(sampler=sampling.ALWAYS_OFF), metrics.NoOpMeterProvider()
    )
    scheduler = Scheduler(
        store,  # type: ignore[arg-type]  # the stand-in has what the scheduler calls
        {pipeline.name: pipeline},
        telemetry,
        RunnerSettings(),
        Health(),
        owner="bench",
    )
    now = datetime.now(UTC)
    batches = [
        [claimed(i, pipeline, now) for i in range(start, min(runs, start + batch))]
        for start in range(0, runs, batch)
    ]
    gc.collect()
    gc.freeze()  # the prepared runs and everything before: not the collector's work
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            cpu0 = time.process_time()
            for claims in batches:
                await scheduler.room()
                scheduler.adopt(claims)
            await store.all_finished.wait()
            cpu = time.process_time() - cpu0
            tg.cancel_scope.cancel()
    finally:
        gc.unfreeze()
    return cpu, store


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    figures = []
    for pipeline in (chain3, single):
        steps = len(pipeline.plan().steps)
        await measure(pipeline, min(args.runs, 2000), args.batch)  # warm-up
        best = float("inf")
        for _ in range(args.repeat):
            cpu, store = await measure(pipeline, args.runs, args.batch)
            if store.attempts != steps * args.runs:
                raise AssertionError(f"{store.attempts} attempts written for {args.runs} runs")
            best = min(best, cpu)
        row = {
            "pipeline": pipeline.name,
            "steps": steps,
            "runs": args.runs,
            "batch": args.batch,
            "cpu_us_per_run": round(best / args.runs * 1e6, 1),
        }
        figures.append(row)
        print(f"{pipeline.name:>7} ({steps} step(s)): {row['cpu_us_per_run']:>7.1f} µs CPU/run")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500, help="runs per hand-over (W1's batch)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    figures = anyio.run(bench, args, backend_options={"use_uvloop": True})
    if not args.no_write:
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "figures": figures,
        }
        print(f"wrote {write_stamped('scheduler', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
