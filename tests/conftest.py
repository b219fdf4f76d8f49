"""Shared fixtures: one Kafka broker and one Postgres per session; a topic and a schema per test.

Servers start lazily (only when a test asks for them) and once per session:

- ``kafka_bootstrap`` (str): the session broker's ``host:port``.
- ``kafka_group_settings`` (dict): consumer-group timings that keep group joins fast on
  the embedded broker (``AIOKafkaConsumer(..., **kafka_group_settings)``).
- ``pg_dsn`` (str): DSN of the session database.
- ``topic`` (str): a fresh topic with 3 partitions for this test; ``new_topic(partitions=3)``
  makes more.
- ``pg_schema`` (:class:`PgSchema`): a fresh schema ``.name`` and a ``.dsn`` whose
  ``search_path`` is that schema (works with asyncpg and libpq); dropped after the test.
- ``broker`` / ``postgres``: the embedded servers themselves, for outage tests
  (``await broker.stop()``, ``await postgres.restart()``, ...). A later test that needs a
  server finds it running again even if an outage test failed half-way.

Environment:

- ``ORCH_TEST_KAFKA=host:port[,host:port]`` uses that Kafka instead of the embedded Tansu
  broker (Apache Kafka, Redpanda, ...); ``broker`` then skips.
- ``ORCH_TEST_PG_DSN=postgresql://...`` uses that database instead of the embedded cluster;
  ``postgres`` then skips.

Every async test of the session runs on one asyncio event loop (``anyio_backend`` is
session-scoped so the servers' async fixtures can be too): do not override ``anyio_backend``
in a module, and do not leave tasks running after a test.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest

# Make the source tree importable when the package is not installed (pyproject's
# `[tool.pytest.ini_options] pythonpath = ["."]` would make this unnecessary).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import asyncpg  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from orchestrator.dev import EmbeddedBroker, EmbeddedPostgres  # noqa: E402

__all__ = ["PgSchema"]

KAFKA_ENV = "ORCH_TEST_KAFKA"
PG_ENV = "ORCH_TEST_PG_DSN"

logger = logging.getLogger("tests.infra")


class PgSchema(NamedTuple):
    """A per-test schema: its name and a DSN that puts it first on ``search_path``."""

    name: str
    dsn: str


# -- session servers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def broker(anyio_backend: str) -> AsyncIterator[EmbeddedBroker]:
    """The embedded Tansu broker shared by the session (skips with ``ORCH_TEST_KAFKA``)."""
    if os.environ.get(KAFKA_ENV):
        pytest.skip(f"needs the embedded broker, but {KAFKA_ENV} points at an external Kafka")
    async with EmbeddedBroker() as embedded:
        logger.info("session broker %s up in %.3f s", embedded.bootstrap, embedded.startup_seconds)
        yield embedded


@pytest.fixture(scope="session")
async def postgres(anyio_backend: str) -> AsyncIterator[EmbeddedPostgres]:
    """The embedded Postgres shared by the session, fsync off (skips with ``ORCH_TEST_PG_DSN``)."""
    if os.environ.get(PG_ENV):
        pytest.skip(f"needs the embedded Postgres, but {PG_ENV} points at an external database")
    async with EmbeddedPostgres(fsync=False) as embedded:
        logger.info("session postgres %s up in %.3f s", embedded.dsn, embedded.startup_seconds)
        yield embedded


@pytest.fixture(scope="session")
def _live_broker(request: pytest.FixtureRequest, anyio_backend: str) -> EmbeddedBroker | None:
    """The embedded broker, or ``None`` when the suite runs against an external Kafka."""
    if os.environ.get(KAFKA_ENV):
        return None
    embedded: EmbeddedBroker = request.getfixturevalue("broker")
    return embedded


@pytest.fixture(scope="session")
def _live_postgres(request: pytest.FixtureRequest, anyio_backend: str) -> EmbeddedPostgres | None:
    """The embedded Postgres, or ``None`` when the suite runs against an external one."""
    if os.environ.get(PG_ENV):
        return None
    embedded: EmbeddedPostgres = request.getfixturevalue("postgres")
    return embedded


@pytest.fixture(scope="session")
def kafka_bootstrap(_live_broker: EmbeddedBroker | None) -> str:
    """``bootstrap_servers`` of the session's Kafka (embedded or ``ORCH_TEST_KAFKA``)."""
    return _live_broker.bootstrap if _live_broker is not None else os.environ[KAFKA_ENV]


@pytest.fixture(scope="session")
def kafka_group_settings(_live_broker: EmbeddedBroker | None) -> dict[str, int]:
    """Consumer-group timings for the session's Kafka, as aiokafka / KafkaSettings keywords.

    Tansu delays a JoinGroup by about half the session timeout, and a member that joins
    after another left waits for that member's session to expire: with client defaults
    (10 s) a join takes 5 s and a re-join up to 18 s. These short timings bring both to
    ~1 s. They are test values only (real Kafka rejects sessions under 6 s by default), so
    an external broker gets ``{}``: the client defaults.
    """
    if _live_broker is None:
        return {}
    return {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200}


@pytest.fixture(scope="session")
def pg_dsn(_live_postgres: EmbeddedPostgres | None) -> str:
    """DSN of the session database (embedded or ``ORCH_TEST_PG_DSN``)."""
    return _live_postgres.dsn if _live_postgres is not None else os.environ[PG_ENV]


# -- per-test isolation ------------------------------------------------------------------


def _unique_name(request: pytest.FixtureRequest, prefix: str, sep: str) -> str:
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    return f"{prefix}{sep}{digest}{sep}{uuid.uuid4().hex[:8]}"


async def _ensure_running(server: EmbeddedBroker | EmbeddedPostgres | None) -> None:
    if server is not None and not server.running:
        logger.warning("%s was left stopped by an earlier test; starting it", type(server).__name__)
        await server.start()


@pytest.fixture
async def new_topic(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    _live_broker: EmbeddedBroker | None,
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await new_topic(partitions=3)`` creates a uniquely named topic, deleted afterwards."""
    await _ensure_running(_live_broker)
    created: list[str] = []

    async def create(*, partitions: int = 3) -> str:
        name = _unique_name(request, "t", "-")
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1)]
            )
            created.append(name)
            await _wait_for_leaders(admin, name, partitions)
        finally:
            await admin.close()
        return name

    yield create

    if created and (_live_broker is None or _live_broker.running):
        with anyio.move_on_after(10, shield=True):
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            try:
                await admin.start()
                await admin.delete_topics(created)
            except Exception as exc:  # best effort: the names are unique anyway
                logger.warning("could not delete topics %s: %r", created, exc)
            finally:
                await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, name: str, partitions: int) -> None:
    """Wait until every partition of a new topic has a leader (instant on Tansu)."""
    with anyio.fail_after(15):
        delay = 0.005
        while True:
            (described,) = await admin.describe_topics([name])
            leaders = [p for p in described["partitions"] if p["leader"] >= 0]
            if described["error_code"] == 0 and len(leaders) == partitions:
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.2)


@pytest.fixture
async def topic(new_topic: Callable[..., Awaitable[str]]) -> str:
    """A fresh topic with 3 partitions, named ``t-<test hash>-<uuid8>``."""
    return await new_topic(partitions=3)


@pytest.fixture
async def pg_schema(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    _live_postgres: EmbeddedPostgres | None,
) -> AsyncIterator[PgSchema]:
    """A fresh schema in the session database, dropped (CASCADE) after the test."""
    await _ensure_running(_live_postgres)
    name = _unique_name(request, "s", "_")
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()

    yield PgSchema(name, _with_search_path(pg_dsn, name))

    with anyio.fail_after(30, shield=True):
        await _ensure_running(_live_postgres)
        conn = await asyncpg.connect(pg_dsn)
        try:
            # A test that left a transaction open must not hang the suite here.
            await conn.execute("SET lock_timeout = '10s'")
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


def _with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with ``options=-c search_path=<schema>``, understood by asyncpg and libpq."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("options", f"-c search_path={schema}"))
    return urllib.parse.urlunsplit(
        parts._replace(query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote))
    )
