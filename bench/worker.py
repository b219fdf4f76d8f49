"""Tasks the harness runs in child processes: ``python -m bench.worker TASK '<json>'``.

Each prints one JSON object (its result) as the last line of stdout.

* ``publish``: publish ``count`` arrival events as fast as aiokafka allows (big batches,
  linger, no compression), for pre-published backlogs;
* ``limit``: W0, a bare consumer loop (getmany, one batched insert into a simple table,
  manual offset commit): the events/s this broker and Postgres allow;
* ``matcher``: W3, the pure matcher benchmark of ``bench/matcher.py``.

Child processes keep the harness's event loop free and use uvloop like the daemon does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from orchestrator.events import Arrival, CloudEvent, encode_structured

__all__ = ["SOURCE", "event_record", "main"]

SOURCE = "bench://publisher"
"""CloudEvents ``source`` of every benchmark event (runs' trigger keys embed it)."""


def event_record(
    prefix: str, i: int, dataset: str, *, now: datetime | None = None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """``(value, key, headers)`` of benchmark event ``i``: a structured CloudEvent with id
    ``<prefix>-<i>``, a W3C ``traceparent`` as a traced producer would send, and a key that
    spreads events over the topic's partitions."""
    partition = f"p{i % 1024}"
    event = CloudEvent(
        specversion="1.0",
        id=f"{prefix}-{i}",
        source=SOURCE,
        type="data.arrived",
        time=now or datetime.now(UTC),
        subject=f"{dataset}/{partition}",
        datacontenttype="application/json",
        data=Arrival(dataset=dataset, partition=partition, rows=i),
    )
    trace_id = int.from_bytes(os.urandom(16)) or 1
    span_id = int.from_bytes(os.urandom(8)) or 1
    headers = [
        ("content-type", b"application/cloudevents+json"),
        ("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01".encode()),
    ]
    return encode_structured(event), f"{dataset}/{partition}".encode(), headers


async def publish(p: dict[str, Any]) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=p["bootstrap"],
        acks=1,
        linger_ms=p.get("linger_ms", 20),
        max_batch_size=p.get("batch_bytes", 1_048_576),
        max_request_size=8_388_608,
        compression_type=None,
        enable_idempotence=False,
    )
    await producer.start()
    began = time.perf_counter()
    now = datetime.now(UTC)
    pending: list[asyncio.Future[Any]] = []
    try:
        for i in range(p["start"], p["start"] + p["count"]):
            value, key, headers = event_record(p["prefix"], i, p["dataset"], now=now)
            pending.append(await producer.send(p["topic"], value, key=key, headers=headers))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await producer.flush()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {"published": p["count"], "seconds": time.perf_counter() - began}


class _Id(msgspec.Struct):
    id: str


async def limit(p: dict[str, Any]) -> dict[str, Any]:
    """W0: consume ``events`` records and store each batch with one unnest insert."""
    import asyncpg
    from aiokafka import AIOKafkaConsumer, TopicPartition

    conn = await asyncpg.connect(p["dsn"])
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda b: b"\x01" + bytes(b),
        decoder=lambda b: bytes(b[1:]),
        format="binary",
    )
    table = p["table"]
    await conn.execute(
        f"""CREATE TABLE {table} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id text NOT NULL UNIQUE,
                envelope jsonb NOT NULL,
                kafka_partition integer NOT NULL,
                kafka_offset bigint NOT NULL,
                received_at timestamptz NOT NULL DEFAULT now())"""
    )
    insert = f"""INSERT INTO {table} (event_id, envelope, kafka_partition, kafka_offset)
                 SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::bigint[])
                 ON CONFLICT (event_id) DO NOTHING"""
    decoder = msgspec.json.Decoder(_Id)
    consumer = AIOKafkaConsumer(
        p["topic"],
        bootstrap_servers=p["bootstrap"],
        group_id=p["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **p["group_timings"],
        fetch_max_bytes=52_428_800,
        max_partition_fetch_bytes=1_049_600,
    )
    began = time.perf_counter()
    await consumer.start()
    done = batches = 0
    first: float | None = None
    try:
        while done < p["events"]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=p["max_batch"])
            if not batch:
                continue
            if first is None:
                first = time.perf_counter()
            ids, values, parts, offsets = [], [], [], []
            commit: dict[TopicPartition, int] = {}
            for tp, records in batch.items():
                for r in records:
                    ids.append(decoder.decode(r.value).id)
                    values.append(r.value)
                    parts.append(r.partition)
                    offsets.append(r.offset)
                commit[tp] = records[-1].offset + 1
            await conn.execute(insert, ids, values, parts, offsets)
            await consumer.commit(commit)
            done += len(ids)
            batches += 1
        end = time.perf_counter()
    finally:
        await consumer.stop()
        await conn.close()
    return {
        "events": done,
        "batches": batches,
        "seconds": end - began,
        "steady_seconds": end - (first or began),
    }


def matcher(p: dict[str, Any]) -> dict[str, Any]:
    from bench import matcher as m

    return {"figures": [m.measure(n) for n in p["sizes"]]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    task, params = args[0], json.loads(args[1])
    if task == "matcher":
        result = matcher(params)
    else:
        coro = {"publish": publish, "limit": limit}[task](params)
        try:
            import uvloop

            result = uvloop.run(coro)
        except ImportError:
            result = asyncio.run(coro)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
