"""Intake microbenchmark: CPU per record of the daemon's intake loop, without Kafka or Postgres.

Run ``python -m bench.intake`` from the repository root. It feeds batches of ``--batch``
structured CloudEvents records (each with a sampled ``traceparent`` header, as the W1
producers send them) to ``Ingestor._process`` under uvloop, with one simple rule that
matches every event, a tracer that never records (what the daemon installs without an
exporter) and the API's no-op meter. The batch write to Postgres is replaced by one that
returns at once, so what is timed is decoding, tracing context, matching, building the
rows and noting offsets: the intake's own work per record.

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
from datetime import UTC, datetime
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
from orchestrator.store import DeadLetter, IncomingEvent, IngestResult
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


async def measure(batch: int, batches: int, repeat: int) -> tuple[float, int]:
    """(best µs of CPU per record, events written per pass)."""
    rules = RuleSet.build(
        [Rule(name="orders", pipeline="chain3", match={"data": {"dataset": ["bench.orders"]}})]
    )
    telemetry = Telemetry.from_providers(
        TracerProvider(sampler=sampling.ALWAYS_OFF), metrics.NoOpMeterProvider()
    )
    ingestor = Ingestor(Settings(), None, rules, telemetry, Health())  # type: ignore[arg-type]
    written: list[int] = []

    async def write(events: list[IncomingEvent], dead: list[DeadLetter]) -> IngestResult:
        written.append(sum(len(e.runs) for e in events))
        return IngestResult(
            new_events=len(events),
            duplicate_events=0,
            dead_letters=len(dead),
            run_ids=[],
            owned=[],
            queued=False,
        )

    ingestor._write = write  # type: ignore[method-assign]
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
    return best, written[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--batch", type=int, default=500, help="records per batch (getmany)")
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--repeat", type=int, default=7, help="measurements; the best counts")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    best, runs = anyio.run(
        measure, args.batch, args.batches, args.repeat, backend_options={"use_uvloop": True}
    )
    if runs != args.batch:
        raise SystemExit(f"expected one run per record, the rule asked for {runs}")
    print(f"intake: {best:.2f} µs CPU per record ({args.batch}-record batches)")
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
        "us_per_record": round(best, 2),
    }
    if not args.no_write:
        print(f"wrote {write_stamped('intake', report, now)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
