"""Numbered SQL migrations (``migrations/NNNN_name.sql``), applied once each, in order.

Several daemons may start at once: an advisory lock serialises them, and each file is
applied in its own transaction together with its row in ``schema_migrations``.
"""

from __future__ import annotations

import importlib.resources
import logging
import re

import asyncpg

from orchestrator.store.connection import translate_errors

__all__ = ["Migration", "available", "migrate", "pending"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x6F726368  # "orch"


class Migration:
    __slots__ = ("name", "sql", "version")

    def __init__(self, version: int, name: str, sql: str) -> None:
        self.version = version
        self.name = name
        self.sql = sql


def available() -> list[Migration]:
    """Every migration shipped with the package, ordered by version."""
    found = []
    for entry in importlib.resources.files("orchestrator.store").joinpath("migrations").iterdir():
        m = _NAME_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda mig: mig.version)


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def pending(conn: asyncpg.Connection) -> list[Migration]:
    with translate_errors("reading schema_migrations"):
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done: set[int] = set()
        if exists:
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m for m in available() if m.version not in done]


async def migrate(conn: asyncpg.Connection, schema: str = "public") -> list[str]:
    """Apply pending migrations in ``schema``; return the names applied."""
    applied: list[str] = []
    with translate_errors("applying migrations"):
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            for mig in await pending(conn):
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        mig.version,
                        mig.name,
                    )
                log.info("applied migration %04d_%s", mig.version, mig.name)
                applied.append(f"{mig.version:04d}_{mig.name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied
