"""The Postgres sink against the session's real Postgres, one schema per test."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from connectors import (
    ConnectorConfigError,
    ConnectorRejected,
    ConnectorUnavailable,
    create,
    open_all,
)
from connectors.postgres import PostgresSink
from orchestrator import StepContext
from tests.conftest import PgSchema
from tests.support.helpers import fetch

pytestmark = pytest.mark.anyio

TABLE = """
CREATE TABLE sales (
    day date NOT NULL,
    sku text NOT NULL,
    qty integer NOT NULL CHECK (qty >= 0),
    PRIMARY KEY (day, sku)
)
"""


@pytest.fixture
async def warehouse(pg_dsn: str, pg_schema: PgSchema) -> AsyncIterator[PostgresSink]:
    config = {"warehouse": {"kind": "postgres", "dsn": pg_dsn, "schema": pg_schema.name}}
    async with open_all(config) as opened:
        sink = opened["warehouse"]
        assert isinstance(sink, PostgresSink)
        await sink.execute(TABLE)
        yield sink


async def rows(pg_dsn: str, pg_schema: PgSchema) -> list[tuple[object, ...]]:
    return [
        tuple(r) for r in await fetch(pg_dsn, pg_schema.name, "SELECT * FROM sales ORDER BY 1, 2")
    ]


async def test_copy_records_into_the_schema(
    warehouse: PostgresSink, pg_dsn: str, pg_schema: PgSchema
) -> None:
    day = date(2026, 11, 24)
    records = [(day, f"sku-{i:04d}", i) for i in range(1000)]

    async def load(ctx: StepContext) -> int:
        copied: int = await ctx.connectors["warehouse"].copy_records(
            "sales", records, ["day", "sku", "qty"]
        )
        return copied

    ctx = StepContext.create(
        run_id=1, pipeline="p", step="load", connectors={"warehouse": warehouse}
    )
    assert await load(ctx) == 1000
    assert await warehouse.fetchval("SELECT count(*) FROM sales") == 1000
    assert await warehouse.fetchval("SELECT sum(qty) FROM sales") == sum(range(1000))
    # The table landed in the connector's schema, not in public.
    found = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) FROM sales")
    assert found[0][0] == 1000
    explicit = await warehouse.copy_records(
        "sales", [(day, "x", 1)], ["day", "sku", "qty"], schema=pg_schema.name
    )
    assert explicit == 1


async def test_a_transaction_commits_or_rolls_back_as_a_whole(
    warehouse: PostgresSink, pg_dsn: str, pg_schema: PgSchema
) -> None:
    day = date(2026, 11, 24)
    async with warehouse.transaction() as tx:
        await tx.execute("INSERT INTO sales VALUES ($1, 'a', 1)", day)
        await tx.copy_records("sales", [(day, "b", 2)], ["day", "sku", "qty"])
    assert await rows(pg_dsn, pg_schema) == [(day, "a", 1), (day, "b", 2)]

    async def replace_then_fail() -> None:
        async with warehouse.transaction() as tx:
            await tx.execute("DELETE FROM sales")
            await tx.copy_records("sales", [(day, "c", 3)], ["day", "sku", "qty"])
            assert await tx.fetchval("SELECT count(*) FROM sales") == 1
            raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        await replace_then_fail()
    assert await rows(pg_dsn, pg_schema) == [(day, "a", 1), (day, "b", 2)]

    async def replace_with_bad_data() -> None:
        async with warehouse.transaction() as tx:
            await tx.execute("DELETE FROM sales")
            await tx.execute("INSERT INTO sales VALUES ($1, 'd', -1)", day)  # CHECK fails

    with pytest.raises(ConnectorRejected, match="23514"):
        await replace_with_bad_data()
    assert await rows(pg_dsn, pg_schema) == [(day, "a", 1), (day, "b", 2)]


@pytest.mark.parametrize(
    ("query", "args", "sqlstate"),
    [
        ("INSERT INTO sales VALUES ($1, NULL, 1)", (date(2026, 1, 1),), "23502"),
        ("INSERT INTO sales VALUES ($1, 'a', -5)", (date(2026, 1, 1),), "23514"),
        ("INSERT INTO sales VALUES ('not a date', 'a', 1)", (), "22007"),
        ("INSERT INTO nowhere VALUES (1)", (), "42P01"),
    ],
)
async def test_rejected_data_is_not_retryable(
    warehouse: PostgresSink, query: str, args: tuple[object, ...], sqlstate: str
) -> None:
    with pytest.raises(ConnectorRejected) as info:
        await warehouse.execute(query, *args)
    assert info.value.retryable is False
    assert info.value.connector == "warehouse"
    assert sqlstate in str(info.value)
    assert "Postgres refused it" in str(info.value)


async def test_rejected_copies_copy_nothing(
    warehouse: PostgresSink, pg_dsn: str, pg_schema: PgSchema
) -> None:
    day = date(2026, 11, 24)
    with pytest.raises(ConnectorRejected, match="23505"):  # duplicate key, second record
        await warehouse.copy_records("sales", [(day, "a", 1), (day, "a", 2)], ["day", "sku", "qty"])
    with pytest.raises(ConnectorRejected, match="invalid value"):  # cannot even be encoded
        await warehouse.copy_records("sales", [(day, "a", "three")], ["day", "sku", "qty"])
    assert await rows(pg_dsn, pg_schema) == []
    assert await warehouse.fetchval("SELECT count(*) FROM sales") == 0  # the pool still works


async def test_an_unreachable_database_is_retryable(tmp_path: Path, pg_dsn: str) -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        dsn = f"postgresql://user:hunter2@127.0.0.1:{port}/db"
        (tmp_path / "dsn").write_text(dsn + "\n")
        config = {"wh": {"kind": "postgres", "dsn_file": "dsn", "connect_timeout": 2}}
        with pytest.raises(ConnectorUnavailable) as info:
            async with open_all(config, base_dir=tmp_path):
                pytest.fail("must not open")
    assert info.value.retryable is True
    assert "hunter2" not in str(info.value)
    assert "user:***@" in str(info.value)


async def test_a_dsn_file_is_read_when_the_connector_opens(
    tmp_path: Path, pg_dsn: str, pg_schema: PgSchema
) -> None:
    (tmp_path / "dsn").write_text(pg_dsn + "\n")
    sink = create(
        "wh",
        {"kind": "postgres", "dsn_file": "dsn", "schema": pg_schema.name, "pool_max": 1},
        base_dir=tmp_path,
    )
    async with sink:
        assert isinstance(sink, PostgresSink)
        assert await sink.fetchval("SELECT current_schema()") == pg_schema.name
    missing = create("wh", {"kind": "postgres", "dsn_file": str(tmp_path / "none")})
    with pytest.raises(ConnectorConfigError, match=r"connectors\.wh\.dsn_file: cannot read"):
        async with missing:
            pass
