"""Intake microbenchmark: CPU per record of the daemon's intake loop, without Kafka or Postgres.

Run ``python -m bench.intake`` from the repository root. It feeds batches of ``--batch``
structured CloudEvents records (each with a sampled ``traceparent`` header, as the W1
producers send them) to ``Ingestor._process`` under uvloop, with one simple rule that
matches every event, a tracer that never records (what the daemon installs without an
exporter) and the API's no-op meter. The batch write to Postgres is replaced by one that
returns at once, so what is timed is decoding, tracing context, matching, building the
rows and noting offsets: the intake's own work per record.

``--write`` times the batch write too, as the daemon makes it: the events and their runs
encoded for the intake statement by the store's own functions, the statement's answer
(every event new, every run created leased to this daemon) turned into the runs handed
to a stand-in scheduler that takes them (``Scheduler.adopt``). What is then left out is
asyncpg and Postgres.

Prints µs of CPU per record (best of ``--repeat``) and writes
``bench/results/intake-<UTC timestamp>.json``.
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
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from aiokafka.structs import ConsumerRecord
from opentelemetry import metrics
from opentelemetry.sdk.trace import TracerProvider, sampling

from bench.report import git_commit, write_stamped
from orchestrator.config import Settings
from orchestrator.events import encode_structured, new_arrival
from orchestrator.health import Health
from orchestrator.ingest.consumer import Ingestor
from orchestrator.store import ClaimedRun, DeadLetter, IncomingEvent, IngestResult, RunRequest
from orchestrator.store.batch import RunOwner, event_rows, request_rows
from orchestrator.telemetry import Telemetry
from orchestrator.triggers.index import RuleSet
from orchestrator.triggers.rules import Rule

_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def records(n: int) -> list[ConsumerRecord[bytes, bytes]]:
    """``n`` records of one topic over four partitions, as aiokafka hands them over."""
    now_ms = int(time.time() * 1000)
    out = []
    for i in range(n):
        value = encode_structured(
            new_arrival("bench.orders", partition=f"2026-11-{i % 28 + 1:02d}", id=f"e{i}", rows=i)
        )
        out.append(
            ConsumerRecord(
                topic="bench",
                partition=i % 4,
                offset=i // 4,
                timestamp=now_ms,
                timestamp_type=0,
                key=None,
                value=value,
                checksum=None,
                serialized_key_size=-1,
                serialized_value_size=len(value),
                headers=[("traceparent", _TRACEPARENT)],
            )
        )
    return out


class EncodingStore:
    """The store's intake statement, answered at once: the rows are encoded as
    :meth:`Store.ingest_simple` encodes them; every event is new, every run created."""

    def __init__(self) -> None:
        self.ids = 0

    async def ingest_simple(
        self,
        events: list[IncomingEvent],
        runs: list[tuple[IncomingEvent, RunRequest, bool]],
        owner: str,
        lease_seconds: float,
    ) -> tuple[dict[tuple[str, str], int], list[tuple[int, str, str, str]]]:
        event_rows(events)
        request_rows(runs)
        stored: dict[tuple[str, str], int] = {}
        for e in events:
            self.ids += 1
            stored[(e.event.source, e.event.id)] = self.ids
        created = []
        for _, r, own in runs:
            self.ids += 1
            created.append((self.ids, r.rule, r.trigger_key, "running" if own else "pending"))
        return stored, created


class TakingScheduler:
    """What the intake asks of the daemon's scheduler: it takes every run handed over."""

    def __init__(self) -> None:
        self.adopted = 0

    @property
    def run_owner(self) -> RunOwner:
        return RunOwner(name="bench", lease_seconds=30.0, accepts=lambda _p: True)

    def adopt(self, runs: Sequence[ClaimedRun]) -> None:
        self.adopted += len(runs)

    async def room(self) -> None:
        return None


async def measure(
    batch: int, batches: int, repeat: int, *, write: bool = False
) -> tuple[float, int]:
    """(best µs of CPU per record, runs asked for in the last batch)."""
    rules = RuleSet.build(
        [Rule(name="orders", pipeline="chain3", match={"data": {"dataset": ["bench.orders"]}})]
    )
    telemetry = Telemetry.from_providers(
        TracerProvider(sampler=sampling.ALWAYS_OFF), metrics.NoOpMeterProvider()
    )
    local = TakingScheduler()
    store = EncodingStore()
    ingestor = Ingestor(
        Settings(),
        store,  # type: ignore[arg-type]  # the stand-in has what the intake calls
        rules,
        telemetry,
        Health(),
        local=local if write else None,
    )
    written: list[int] = []

    async def returning(events: list[IncomingEvent], dead: list[DeadLetter]) -> IngestResult:
        written.append(sum(len(e.runs) for e in events))
        return IngestResult(
            new_events=len(events),
            duplicate_events=0,
            dead_letters=len(dead),
            run_ids=[],
            owned=[],
            queued=False,
        )

    if write:
        before = local.adopted
        await ingestor._process(None, records(2))
        written.append(local.adopted - before)
    else:
        ingestor._write = returning  # type: ignore[method-assign]
    recs = records(batch)
    for _ in range(max(1, batches // 4)):  # warm-up
        await ingestor._process(None, recs)
    gc.collect()
    best = float("inf")
    for _ in range(repeat):
        cpu = time.process_time()
        for _ in range(batches):
            await ingestor._process(None, recs)
        best = min(best, (time.process_time() - cpu) / (batches * batch) * 1e6)
    if write:
        before = local.adopted
        await ingestor._process(None, recs)
        written.append(local.adopted - before)
    return best, written[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--batch", type=int, default=500, help="records per batch (getmany)")
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--repeat", type=int, default=7, help="measurements; the best counts")
    parser.add_argument(
        "--write", action="store_true", help="time the batch write too (no asyncpg, no Postgres)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    best, runs = anyio.run(
        partial(measure, args.batch, args.batches, args.repeat, write=args.write),
        backend_options={"use_uvloop": True},
    )
    if runs != args.batch:
        raise SystemExit(f"expected one run per record, the rule asked for {runs}")
    what = "with the batch write" if args.write else "without the batch write"
    print(f"intake: {best:.2f} µs CPU per record ({args.batch}-record batches, {what})")
    now = datetime.now(UTC)
    report: dict[str, Any] = {
        "benchmark": "intake",
        "date": now.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "method": f"best of {args.repeat}; CPU = process time over {args.batches} batches",
        "batch": args.batch,
        "batch_write": args.write,
        "us_per_record": round(best, 2),
    }
    if not args.no_write:
        print(f"wrote {write_stamped('intake', report, now)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
