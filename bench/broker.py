"""The broker's CPU second by second while events arrive at a steady rate, with and without a
consumer.

Run ``python -m bench.broker`` from the repository root. It starts the embedded Tansu broker,
and for each case publishes ``--rate`` events/s for ``--seconds`` seconds with W2's publisher
(``bench.worker rate``: librdkafka, one produce request per event) to a fresh topic of
``--partitions`` partitions. In the ``consumer`` case a bare aiokafka consumer (no group,
``fetch_max_wait_ms`` as the daemon's default) reads the topic as it grows. It prints the
broker's CPU (cores) for each second and writes ``bench/results/broker-<UTC timestamp>.json``.

Why: in W2 the latency at 1,000 events/s climbs through the phase. This shows whether the
broker's own cost per second is flat (a fixed cost per event) or grows with the log.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.infra import cpu_seconds, create_topic, run_worker
from bench.report import write_stamped
from orchestrator.dev import EmbeddedBroker

CASES = ("produce", "consumer")


async def _consume(bootstrap: str, topic: str, partitions: int, counter: list[int]) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            counter[0] += sum(len(records) for records in batch.values())
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await consumer.stop()


async def _case(
    broker: EmbeddedBroker, case: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    topic = f"bench-broker-{case}-{uuid.uuid4().hex[:6]}"
    await create_topic(broker.bootstrap, topic, args.partitions)
    pid = broker.pid
    if pid is None:
        raise RuntimeError("the broker is not running")
    consumed = [0]
    per_second: list[float] = []
    result: dict[str, Any] = {}

    async def publish() -> None:
        params = {
            "bootstrap": broker.bootstrap,
            "topic": topic,
            "prefix": case,
            "dataset": "bench.broker",
            "per_second": args.rate,
            "seconds": args.seconds,
        }
        pub = await run_worker("rate", params, limit=args.seconds + 60, workdir=workdir)
        result.update(published=pub["published"], delivery_errors=pub["delivery_errors"])

    async with anyio.create_task_group() as tg:
        if case == "consumer":
            tg.start_soon(_consume, broker.bootstrap, topic, args.partitions, consumed)
        async with anyio.create_task_group() as publishing:
            publishing.start_soon(publish)
            previous = cpu_seconds(pid) or 0.0
            for _ in range(int(args.seconds)):
                await anyio.sleep(1.0)
                now = cpu_seconds(pid) or 0.0
                per_second.append(round(now - previous, 3))
                previous = now
        tg.cancel_scope.cancel()
    result.update(cores_by_second=per_second, consumed=consumed[0])
    return result


async def _main(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "rate": args.rate,
        "seconds": args.seconds,
        "partitions": args.partitions,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        async with EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
            for case in args.cases.split(","):
                figures = await _case(broker, case, args, Path(tmp))
                out["cases"][case] = figures
                cores = figures["cores_by_second"]
                print(
                    f"{case:>8}: broker cores by second at {args.rate:,} events/s: "
                    + " ".join(f"{c:.2f}" for c in cores),
                    flush=True,
                )
    print(f"wrote {write_stamped('broker', out)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=1000, help="events/s")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument(
        "--cases", default="produce,consumer", help="comma-separated: " + ", ".join(CASES)
    )
    args = p.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"unknown cases: {', '.join(sorted(unknown))}")
    anyio.run(_main, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
