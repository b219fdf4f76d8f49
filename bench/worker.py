"""Tasks the harness runs in child processes: ``python -m bench.worker TASK '<json>'``.

Each prints one JSON object (its result) as the last line of stdout.

* ``publish``: publish ``count`` arrival events as fast as aiokafka allows (big batches,
  linger, no compression), for pre-published backlogs;
* ``rate``: W2's publisher: ``per_second`` events for ``seconds`` on a fixed schedule, one
  Kafka request per event (librdkafka, ``linger.ms=0``), noting each event's send time;
* ``limit``: W0, a bare consumer loop (getmany, one batched insert into a simple table,
  manual offset commit): the events/s this broker and Postgres allow;
* ``matcher``: W3, the pure matcher benchmark of ``bench/matcher.py``;
* ``sink``: an OTLP/HTTP receiver for the traced W1 drain: answers every export, counts
  the spans and requests, and prints its counts when SIGTERM stops it.

Child processes keep the harness's event loop free and use uvloop like the daemon does.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import resource
import signal
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
    prefix: str, i: int, dataset: str, *, now: datetime | None = None, sampled: bool = True
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """``(value, key, headers)`` of benchmark event ``i``: a structured CloudEvent with id
    ``<prefix>-<i>``, a W3C ``traceparent`` as a traced producer would send (``sampled``:
    its sampled flag), and a key that spreads events over the topic's partitions."""
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
        ("traceparent", f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}".encode()),
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
            value, key, headers = event_record(
                p["prefix"], i, p["dataset"], now=now, sampled=p.get("sampled", True)
            )
            pending.append(await producer.send(p["topic"], value, key=key, headers=headers))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await producer.flush()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {"published": p["count"], "seconds": time.perf_counter() - began}


def rate(p: dict[str, Any]) -> dict[str, Any]:
    """Publish at a steady rate with librdkafka (confluent-kafka), as most producers do.

    A producer elsewhere would not share this machine's two CPUs; librdkafka spends about
    half of aiokafka's CPU per event, and a thread sleeping between sends (instead of an
    event loop) wakes cheaply, so more of the machine is left to what is measured. Every
    event is still its own produce request (``linger.ms=0``), as in a trickle of
    independent producers.
    """
    from confluent_kafka import Producer

    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": p["bootstrap"],
            "acks": 1,
            "linger.ms": 0,
            "enable.idempotence": False,
            "log_level": 3,
        }
    )
    topic, prefix, dataset, per_second = p["topic"], p["prefix"], p["dataset"], p["per_second"]
    total = int(per_second * p["seconds"])
    sent: dict[str, float] = {}
    behind = 0.0
    cpu0 = _own_cpu()
    start = time.perf_counter()
    i = 0
    while i < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * per_second) + 1)
        behind = max(behind, (now - start) - i / per_second)
        while i < due:
            value, key, headers = event_record(prefix, i, dataset)
            sent[f"{prefix}-{i}"] = time.time()
            producer.produce(topic, value, key=key, headers=list(headers), on_delivery=delivered)
            i += 1
        producer.poll(0)
        time.sleep(max(0.0, start + i / per_second - time.perf_counter()))
    elapsed = time.perf_counter() - start
    unsent = producer.flush(30)
    return {
        "sent": sent,
        "published": total,
        "seconds": elapsed,
        "achieved_per_second": total / elapsed if elapsed > 0 else None,
        "max_behind_schedule_ms": round(behind * 1000, 2),
        "delivery_errors": failed[:5] + ([f"{unsent} not delivered"] if unsent else []),
        "cpu_seconds": round(_own_cpu() - cpu0, 3),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


class _Stopped(Exception):
    pass


def sink(p: dict[str, Any]) -> dict[str, Any]:
    """Receive OTLP/HTTP exports on ``port`` until SIGTERM; count spans and requests."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    counts = {"trace_requests": 0, "spans": 0, "metric_requests": 0, "bytes": 0, "errors": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the exporters keep their connections open

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            counts["bytes"] += len(body)
            try:
                if self.path.endswith("/v1/traces"):
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    request = ExportTraceServiceRequest.FromString(body)
                    counts["trace_requests"] += 1
                    counts["spans"] += sum(
                        len(scope.spans)
                        for resource_spans in request.resource_spans
                        for scope in resource_spans.scope_spans
                    )
                else:
                    counts["metric_requests"] += 1
            except Exception:
                counts["errors"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    def stop(_signum: int, _frame: Any) -> None:
        raise _Stopped

    server = ThreadingHTTPServer(("127.0.0.1", int(p["port"])), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except _Stopped:
        pass
    finally:
        server.server_close()
    return {**counts, "cpu_seconds": round(_own_cpu(), 3)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    task, params = args[0], json.loads(args[1])
    if task == "matcher":
        result = matcher(params)
    elif task == "rate":
        result = rate(params)
    elif task == "sink":
        result = sink(params)
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
