"""``python -m connectors.files.watch`` publishing a new file's arrival event to real Kafka."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaConsumer
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from orchestrator.events import decode_record

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30


async def wait_for_line(process: Process, needle: str, seen: list[str]) -> None:
    """Read the process's stderr until a line contains ``needle``."""
    assert process.stderr is not None
    buffer = ""
    async for chunk in TextReceiveStream(process.stderr):
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        seen.extend(lines)
        if any(needle in line for line in lines):
            return
    raise AssertionError(f"process ended before logging {needle!r}:\n" + "\n".join(seen))


async def test_the_watch_cli_publishes_new_files(
    tmp_path: Path, kafka_bootstrap: str, topic: str
) -> None:
    pytest.importorskip("watchfiles")
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "old.csv").write_text("id\n1\n")  # present at start: not announced
    argv = [
        sys.executable,
        "-m",
        "connectors.files.watch",
        "--dir",
        str(landing),
        "--glob",
        "*.csv",
        "--dataset",
        "sales",
        "--bootstrap",
        kafka_bootstrap,
        "--topic",
        topic,
        "--recursive",
        "--partition-regex",
        r"day=(\d{4}-\d{2}-\d{2})",
    ]
    log: list[str] = []
    async with await anyio.open_process(argv, cwd=ROOT) as process:
        try:
            with anyio.fail_after(DEADLINE):
                await wait_for_line(process, "watching", log)
            target = landing / "day=2026-11-24" / "sales.csv"
            target.parent.mkdir()
            staging = target.with_name(".sales.csv.part")
            staging.write_text("id,qty\n1,5\n2,7\n")
            staging.rename(target)  # an atomic arrival, as producers should do it

            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
            )
            await consumer.start()
            try:
                with anyio.fail_after(DEADLINE):
                    record = await consumer.getone()
            finally:
                await consumer.stop()
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            with anyio.fail_after(DEADLINE):
                code = await process.wait()

    event = decode_record(record.value, record.headers, max_bytes=1 << 20)
    assert record.key == b"sales/2026-11-24" == event.key.encode()
    assert dict(record.headers)["content-type"] == b"application/cloudevents+json"
    assert event.data.dataset == "sales"
    assert event.data.partition == "2026-11-24"
    assert event.data.uri == target.resolve().as_uri()
    assert event.data.rows == 2
    assert event.data.bytes == target.stat().st_size
    assert code == 0, "\n".join(log)
