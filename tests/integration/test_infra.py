"""The test infrastructure itself: real Kafka and Postgres from the fixtures, orchestrator.dev."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import orchestrator.dev
from orchestrator.dev import EmbeddedBroker, EmbeddedPostgres, find_pg_bindir, tansu_binary
from orchestrator.dev._proc import backoff
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from tests.conftest import PgSchema

pytestmark = pytest.mark.anyio

# (partition, key, value, headers): binary, empty and repeated header keys on purpose.
RECORDS: list[tuple[int, bytes | None, bytes, list[tuple[str, bytes]]]] = [
    (0, b"k0", b"\x00\xff\xfe binary \x80", [("traceparent", b"00-abc-01"), ("bin", b"\x00\x01")]),
    (1, None, b"", [("ce_id", b"first"), ("ce_id", b"second")]),
    (2, b"k2", bytes(range(256)), []),
]
ITEMS = [(1, b"\x00\xff", "one"), (2, b"", "zwei \u00fc"), (3, None, None)]


def test_dev_exports_are_pinned() -> None:
    assert sorted(orchestrator.dev.__all__) == [
        "EmbeddedBroker",
        "EmbeddedPostgres",
        "StopMode",
        "find_pg_bindir",
        "free_port",
        "tansu_binary",
    ]
    for name in orchestrator.dev.__all__:
        assert getattr(orchestrator.dev, name) is not None
    assert os.access(tansu_binary(), os.X_OK)


def _consumer(bootstrap: str, topic: str, group: str, settings: dict[str, int]) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **settings,
    )


async def _consume(consumer: AIOKafkaConsumer, count: int) -> list[Any]:
    got: list[Any] = []
    with anyio.fail_after(30):
        while len(got) < count:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                got.extend(records)
    return got


async def test_kafka_records_round_trip_byte_exact_with_committed_group_offsets(
    kafka_bootstrap: str, topic: str, kafka_group_settings: dict[str, int]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        offsets = [
            await producer.send_and_wait(topic, value, key=key, partition=p, headers=headers)
            for p, key, value, headers in RECORDS
        ]
    finally:
        await producer.stop()

    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(kafka_bootstrap, topic, group, kafka_group_settings)
    await consumer.start()
    try:
        got = await _consume(consumer, len(RECORDS))
        assert sorted((r.partition, r.key, r.value, list(r.headers)) for r in got) == sorted(
            RECORDS, key=lambda rec: rec[0]
        )
        await consumer.commit()
        for meta in offsets:
            tp = TopicPartition(topic, meta.partition)
            assert await consumer.committed(tp) == meta.offset + 1
    finally:
        await consumer.stop()

    # A new member of the same group resumes after the committed offsets.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"fourth", key=b"k4", partition=1)
    finally:
        await producer.stop()
    consumer = _consumer(kafka_bootstrap, topic, group, kafka_group_settings)
    await consumer.start()
    try:
        (fourth,) = await _consume(consumer, 1)
        assert (fourth.partition, fourth.value) == (1, b"fourth")
        assert await consumer.getmany(timeout_ms=300) == {}  # nothing before it is redelivered
    finally:
        await consumer.stop()


async def test_postgres_schema_is_isolated_and_first_on_search_path(pg_schema: PgSchema) -> None:
    conn = await asyncpg.connect(pg_schema.dsn)
    try:
        assert await conn.fetchval("SHOW search_path") == pg_schema.name
        await conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, body bytea, note text)")
        await conn.executemany("INSERT INTO items VALUES ($1, $2, $3)", ITEMS)
        rows = await conn.fetch("SELECT id, body, note FROM items ORDER BY id")
        assert [tuple(r) for r in rows] == ITEMS
        schema = await conn.fetchval(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'items'"
        )
        assert schema == pg_schema.name
    finally:
        await conn.close()


async def test_session_postgres_restart_and_kill_keep_committed_data(
    postgres: EmbeddedPostgres, pg_schema: PgSchema
) -> None:
    await _fetch_value(pg_schema.dsn, "CREATE TABLE kept AS SELECT 42 AS id")
    port = postgres.port

    await postgres.restart()
    assert postgres.running
    assert postgres.port == port
    assert await _fetch_value(pg_schema.dsn, "SELECT sum(id) FROM kept") == 42

    # fsync is off in the session cluster, yet a killed server keeps every commit.
    await _fetch_value(pg_schema.dsn, "INSERT INTO kept VALUES (1)")
    assert postgres.pid is not None
    os.kill(postgres.pid, signal.SIGKILL)
    await _wait_until_stopped(postgres)
    await postgres.start()
    assert postgres.port == port
    assert await _fetch_value(pg_schema.dsn, "SELECT sum(id) FROM kept") == 43


async def _wait_until_stopped(server: EmbeddedPostgres | EmbeddedBroker) -> None:
    with anyio.fail_after(5):
        for delay in backoff():
            if not server.running:
                return
            await anyio.sleep(delay)


async def _fetch_value(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_broker_stop_and_start_on_the_same_port() -> None:
    async with EmbeddedBroker() as broker:
        port = broker.port
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait("outage", b"before")
        finally:
            await producer.stop()

        await broker.stop()
        assert not broker.running
        assert _refuses_connections(port)
        await broker.stop()  # idempotent

        await broker.start()
        assert broker.running
        assert broker.port == port
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            meta = await producer.send_and_wait("outage", b"after")
        finally:
            await producer.stop()
        assert meta.offset == 0  # memory-only: the restarted broker starts empty

        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGKILL)  # from outside, as a fault test would
        await _wait_until_stopped(broker)
        await broker.start()
        assert broker.port == port
        assert not _refuses_connections(port)


async def test_session_broker_is_what_kafka_bootstrap_points_at(
    broker: EmbeddedBroker, kafka_bootstrap: str
) -> None:
    assert broker.running
    assert kafka_bootstrap == broker.bootstrap


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A temporary directory the ``postgres`` OS user can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="orch-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def _needs_local_postgres() -> None:
    try:
        find_pg_bindir()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.mark.usefixtures("_needs_local_postgres")
async def test_postgres_data_dir_survives_crashes_and_is_reused(reachable_dir: Path) -> None:
    data_dir = reachable_dir / "pg"
    async with EmbeddedPostgres(data_dir=data_dir) as pg:  # fsync on, as `orchestrator dev`
        await _fetch_value(pg.dsn, "CREATE TABLE t AS SELECT 'committed' AS v")
        port = pg.port

        await pg.stop(mode="immediate")  # a crash: recovery replays the WAL on start
        assert not pg.running
        assert _refuses_connections(port)
        await pg.start()
        assert pg.port == port
        assert await _fetch_value(pg.dsn, "SELECT v FROM t") == "committed"

        assert pg.pid is not None
        os.kill(pg.pid, signal.SIGKILL)  # from outside, as a fault test would
        await _wait_until_stopped(pg)
        await pg.start()  # waits out the killed server's lock file and shared memory
        assert await _fetch_value(pg.dsn, "SELECT v FROM t") == "committed"
    assert (data_dir / "PG_VERSION").is_file()  # a given data_dir is kept
    assert not (data_dir / "postmaster.pid").exists()

    async with EmbeddedPostgres(data_dir=data_dir) as pg:  # reused, not re-initialised
        assert await _fetch_value(pg.dsn, "SELECT v FROM t") == "committed"


async def _start_both_then_fail(seen: dict[str, Any]) -> None:
    async with EmbeddedBroker() as broker, EmbeddedPostgres(fsync=False) as pg:
        assert pg.data_dir is not None
        seen.update(
            broker=broker,
            broker_pid=broker.pid,
            data_dir=pg.data_dir,
            postmaster_pid=pg.pid,
        )
        raise RuntimeError("boom")


@pytest.mark.usefixtures("_needs_local_postgres")
async def test_servers_are_stopped_and_cleaned_up_when_the_body_raises() -> None:
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="boom"):
        await _start_both_then_fail(seen)
    assert _gone(seen["broker_pid"])
    assert not seen["data_dir"].exists()  # the temporary cluster is removed
    assert _gone(seen["postmaster_pid"])
    log_path = seen["broker"].log_path
    assert log_path.exists()  # kept for the post-mortem when the body failed
    log_path.unlink()
