"""The asyncpg pool: codecs, schema selection, and error translation at the boundary."""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import asyncpg
import msgspec

from orchestrator.errors import ConfigError, StoreError, StoreRejected

__all__ = ["KEY_LOOKUP_PLANNER", "create_pool", "redact_dsn", "translate_errors"]

_json_encoder = msgspec.json.Encoder()
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Errors that mean "the database is unreachable or asked us to try again".
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.PostgresConnectionError,
)


# Planner settings of the daemon's sessions. Every statement the daemon runs reaches its rows
# through an index (by key, or a partial index of pending/running runs), and asyncpg keeps
# each statement prepared, so Postgres plans it once and reuses the plan. A plan made while a
# table is nearly empty (a fresh deployment, a new schema) scans the whole table, and it
# stays in use as the table grows until the next ANALYZE invalidates it: at 1,000 runs/s a
# fresh runs table was read end to end ~20 times a second. With sequential scans priced out,
# the plan is the index plan at any size. JIT compiles plans of high estimated cost, which a
# priced-out scan would make a statement look like; it only adds latency to short statements.
KEY_LOOKUP_PLANNER: dict[str, str] = {"enable_seqscan": "off", "jit": "off"}


def _encode_jsonb(value: Any) -> bytes:
    # Raw JSON bytes pass through untouched; anything else is encoded with msgspec.
    body = (
        value if isinstance(value, bytes | bytearray | memoryview) else _json_encoder.encode(value)
    )
    return b"\x01" + bytes(body)


def _decode_jsonb(data: bytes) -> bytes:
    return bytes(data[1:])


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook: the store leaves no session state behind (no SET, LISTEN, cursors
    or session locks outside ``migrate``, which undoes its own), so the default reset
    round trip on every release is skipped."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=_decode_jsonb, format="binary"
    )


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, safe for logs and errors."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def _ssl_context(sslmode: str, rootcert: str) -> Any:
    if not sslmode:
        return None
    if sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=rootcert or None)
        ctx.check_hostname = sslmode == "verify-full"
        return ctx
    return sslmode


async def create_pool(
    dsn: str,
    *,
    schema: str = "public",
    min_size: int = 2,
    max_size: int = 10,
    sslmode: str = "",
    sslrootcert: str = "",
    planner: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """Open a pool whose connections use ``schema`` and exchange jsonb as raw JSON bytes.

    ``planner``: session settings for the planner (:data:`KEY_LOOKUP_PLANNER` for the
    daemon, whose statements all look rows up by key)."""
    if not _SCHEMA_RE.match(schema):
        raise ConfigError(f"postgres.schema: {schema!r} is not a plain lower-case identifier")
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            server_settings={
                **(planner or {}),
                "search_path": schema,
                "application_name": "orchestrator",
            },
            ssl=_ssl_context(sslmode, sslrootcert),
            timeout=10,
        )
    except _TRANSIENT as exc:
        raise StoreError(f"cannot connect to Postgres at {redact_dsn(dsn)}: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise StoreError(f"Postgres at {redact_dsn(dsn)} refused the connection: {exc}") from None
    return pool


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn driver-level connectivity errors into :class:`StoreError` (retryable)."""
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreError(f"{what}: Postgres unavailable ({type(exc).__name__}: {exc})") from exc
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise StoreRejected(f"{what}: Postgres rejected the data: {exc}") from exc


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, what: str) -> AsyncIterator[asyncpg.Connection]:
    with translate_errors(what):
        async with pool.acquire() as conn:
            yield cast(asyncpg.Connection, conn)
