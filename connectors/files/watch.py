"""Watch a directory and publish an arrival event to Kafka for each new or changed file.

    python -m connectors.files.watch --dir /data/landing --glob '*.csv' --dataset sales \\
        --bootstrap kafka:9092 --topic arrivals --partition-regex '(\\d{4}-\\d{2}-\\d{2})'

Events are structured CloudEvents (``orchestrator.events.encode_structured``) keyed by the
event's correlation key. The process runs until SIGINT or SIGTERM; it logs one line per
published event and "watching ..." once every file created from then on will be announced.
A failed publish is retried with backoff, so no file is skipped while Kafka is away.
Restarted with ``--existing emit``, it announces the files already there again with the same
event ids, which the orchestrator de-duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from connectors.base import ConnectorError
from connectors.files._watcher import FileWatcherFactory, FileWatcherSource
from orchestrator.events import CloudEvent, encode_structured

__all__ = ["main", "publish_arrivals"]

log = logging.getLogger("connectors.files.watch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m connectors.files.watch",
        description="Publish an arrival event to Kafka for each new or changed file.",
    )
    p.add_argument("--dir", required=True, help="directory to watch")
    p.add_argument("--glob", default="*", help="file pattern (default: %(default)s)")
    p.add_argument("--dataset", required=True, help="dataset named in the events")
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port[,...]")
    p.add_argument("--topic", required=True, help="topic to publish to")
    p.add_argument("--partition-regex", default="", help="regex giving the partition from the path")
    p.add_argument("--recursive", action="store_true", help="watch subdirectories too")
    p.add_argument(
        "--existing",
        choices=["ignore", "emit"],
        default="ignore",
        help="announce files already present at start (default: %(default)s)",
    )
    p.add_argument("--source", default="", help="CloudEvents source (default: derived)")
    p.add_argument("--force-polling", action="store_true", help="poll (network filesystems)")
    p.add_argument("--log-level", default="INFO")
    return p


async def _send(producer: AIOKafkaProducer, topic: str, event: CloudEvent) -> Any:
    delay = 0.5
    while True:
        try:
            return await producer.send_and_wait(
                topic,
                encode_structured(event),
                key=event.key.encode(),
                headers=[("content-type", b"application/cloudevents+json")],
            )
        except KafkaError as exc:
            log.warning("publishing %s failed: %r; retrying in %.1fs", event.id, exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def publish_arrivals(source: FileWatcherSource, bootstrap: str, topic: str) -> None:
    """Publish every event of ``source`` (opened here) until it is closed or cancelled."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    try:
        await producer.start()
        async with source, contextlib.aclosing(source.events()) as events:
            async for event in events:
                meta = await _send(producer, topic, event)
                log.info(
                    "published %s %s (%s bytes, %s rows) to %s[%d]@%d",
                    event.id,
                    event.data.uri,
                    event.data.bytes,
                    event.data.rows,
                    topic,
                    meta.partition,
                    meta.offset,
                )
    finally:
        with anyio.CancelScope(shield=True):
            await producer.stop()


async def _run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "dir": args.dir,
        "glob": args.glob,
        "dataset": args.dataset,
        "partition_regex": args.partition_regex,
        "recursive": args.recursive,
        "existing": args.existing,
        "force_polling": args.force_polling,
    }
    if args.source:
        options["source"] = args.source
    source = FileWatcherFactory().create("watch", options)
    status = 0
    async with anyio.create_task_group() as tg:

        async def _stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(_stop_on_signal)
        try:
            await publish_arrivals(source, args.bootstrap, args.topic)
        except (ConnectorError, KafkaError) as exc:
            print(f"connectors.files.watch: error: {exc}", file=sys.stderr)
            status = 2
        tg.cancel_scope.cancel()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return anyio.run(_run, args)
    except ConnectorError as exc:  # bad options, raised before watching starts
        print(f"connectors.files.watch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
