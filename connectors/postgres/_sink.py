"""Postgres sink: its own asyncpg pool, COPY, explicit transactions, errors translated.

Errors are sorted by SQLSTATE class, not by message:

* connection trouble, ``08`` connection exceptions, ``40`` serialization failure or deadlock,
  ``53`` insufficient resources, ``57`` operator intervention (shutdown, statement timeout),
  ``58`` system errors → :class:`~connectors.base.ConnectorUnavailable` (retryable);
* everything else the server refuses (``22`` data exceptions, ``23`` constraint violations,
  ``42`` syntax or undefined objects, ...) and values asyncpg cannot encode →
  :class:`~connectors.base.ConnectorRejected` (not retryable).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, cast

import anyio
import asyncpg
import msgspec

from connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorRejected,
    ConnectorTimeout,
    ConnectorUnavailable,
    Options,
    parse_options,
    read_secret,
    redact_dsn,
)

__all__ = ["PostgresFactory", "PostgresOptions", "PostgresSink", "PostgresTransaction"]

log = logging.getLogger("connectors.postgres")

_RETRYABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)

Isolation = Literal["read_committed", "repeatable_read", "serializable"]


class PostgresOptions(Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of ``kind = "postgres"``."""

    secret_fields: ClassVar[frozenset[str]] = frozenset({"dsn"})

    dsn: str = ""
    """libpq-style DSN. Prefer ``dsn_file`` (or an ``ORCH_*`` variable) for one with a password."""
    dsn_file: str = ""
    """File holding the DSN, read when the connector opens; wins over ``dsn``."""
    schema: str = ""
    """Schema put first on ``search_path``; empty keeps the server's default."""
    pool_min: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Connections opened at start-up and kept open."""
    pool_max: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Most connections this connector opens."""
    connect_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Seconds to establish one connection."""
    command_timeout: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Seconds one statement may run before it is cancelled (0: no limit)."""
    application_name: str = "orchestrator-connector"
    """Shown in ``pg_stat_activity``."""

    def __post_init__(self) -> None:
        if self.pool_min > self.pool_max:
            raise ValueError(f"pool_min ({self.pool_min}) exceeds pool_max ({self.pool_max})")


def _translate(exc: BaseException, what: str, name: str) -> ConnectorError:
    prefix = f"connector {name!r}: {what}"
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return ConnectorTimeout(f"{prefix}: timed out ({exc})", connector=name)
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectorUnavailable(
            f"{prefix}: Postgres unavailable ({type(exc).__name__}: {exc})", connector=name
        )
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        detail = f"{type(exc).__name__} [{sqlstate}]: {exc}"
        if sqlstate[:2] in _RETRYABLE_CLASSES:
            return ConnectorUnavailable(f"{prefix}: {detail}", connector=name)
        return ConnectorRejected(f"{prefix}: Postgres refused it: {detail}", connector=name)
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        # asyncpg's client-side DataError: a value that cannot be encoded for its column.
        return ConnectorRejected(f"{prefix}: invalid value: {exc}", connector=name)
    return ConnectorError(f"{prefix}: {type(exc).__name__}: {exc}", connector=name)


_TRANSLATED = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@contextlib.contextmanager
def _errors(what: str, name: str) -> Iterator[None]:
    try:
        yield
    except _TRANSLATED as exc:
        raise _translate(exc, what, name) from exc


class _Queries:
    """Statements that run on one connection (a transaction's) or any pooled one."""

    name: str

    def _connection(self, what: str) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        raise NotImplementedError

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement; returns its status tag (``INSERT 0 1``)."""
        async with self._connection("execute") as conn:
            with _errors("execute", self.name):
                return await conn.execute(query, *args)

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per argument tuple, in one round trip per batch."""
        async with self._connection("executemany") as conn:
            with _errors("executemany", self.name):
                await conn.executemany(query, args)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection("fetch") as conn:
            with _errors("fetch", self.name):
                return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection("fetchrow") as conn:
            with _errors("fetchrow", self.name):
                return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection("fetchval") as conn:
            with _errors("fetchval", self.name):
                return await conn.fetchval(query, *args)

    async def copy_records(
        self,
        table: str,
        records: Iterable[Sequence[Any]],
        columns: Sequence[str],
        *,
        schema: str | None = None,
    ) -> int:
        """``COPY table (columns) FROM STDIN`` (binary) with ``records``; returns rows copied.

        ``table`` and ``columns`` are quoted as identifiers; ``schema`` defaults to the
        ``search_path``. One statement: either every record is copied or none is.
        """
        what = f"COPY into {table!r}"
        async with self._connection(what) as conn:
            with _errors(what, self.name):
                try:
                    status = await conn.copy_records_to_table(
                        table,
                        records=records,
                        columns=list(columns),
                        schema_name=schema,
                    )
                except (TypeError, ValueError) as exc:
                    if isinstance(exc, asyncpg.InterfaceError):
                        raise
                    # The binary COPY encoders raise these for a value of the wrong type.
                    raise ConnectorRejected(
                        f"connector {self.name!r}: {what}: invalid value: {exc}",
                        connector=self.name,
                    ) from exc
        return int(status.split()[-1]) if status else 0


class PostgresTransaction(_Queries):
    """The statements of one transaction, all on one connection (from ``transaction()``)."""

    def __init__(self, name: str, conn: asyncpg.Connection) -> None:
        self.name = name
        self._conn = conn

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn


class PostgresSink(Connector, _Queries):
    """A Postgres database that steps write to (and read from), with its own pool.

    Each call outside :meth:`transaction` runs on a pooled connection in its own implicit
    transaction. For several statements that must land together::

        async with ctx.connectors["warehouse"].transaction() as tx:
            await tx.execute("DELETE FROM sales WHERE day = $1", day)
            await tx.copy_records("sales", rows, ["day", "sku", "qty"])
    """

    kind = "postgres"

    def __init__(self, name: str, options: PostgresOptions) -> None:
        Connector.__init__(self, name)
        self.options = options
        self._pool: asyncpg.Pool | None = None
        self._dsn_shown = ""

    async def _open(self) -> None:
        o = self.options
        dsn = o.dsn
        if o.dsn_file:
            dsn = read_secret(o.dsn_file, connector=self.name, key="dsn_file")
        if not dsn:
            raise ConnectorConfigError(
                f"connectors.{self.name}.dsn: set `dsn` or `dsn_file`", connector=self.name
            )
        self._dsn_shown = redact_dsn(dsn)
        settings = {"application_name": o.application_name}
        if o.schema:
            settings["search_path"] = '"' + o.schema.replace('"', '""') + '"'
        what = f"connect to {self._dsn_shown}"
        with _errors(what, self.name):
            self._pool = await asyncpg.create_pool(
                dsn,
                min_size=o.pool_min,
                max_size=o.pool_max,
                timeout=o.connect_timeout,
                command_timeout=o.command_timeout or None,
                server_settings=settings,
            )

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # close() waits for connections in use; when the registry's deadline cancels the
        # wait (or closing fails), terminate() drops them (a no-op once closed).
        try:
            await pool.close()
        finally:
            pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        self._check_open()
        assert self._pool is not None
        with _errors(what, self.name):
            conn = await self._pool.acquire()
        try:
            yield cast(asyncpg.Connection, conn)
        finally:
            with anyio.CancelScope(shield=True), _errors("release", self.name):
                await self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        *,
        isolation: Isolation = "read_committed",
        readonly: bool = False,
    ) -> AsyncIterator[PostgresTransaction]:
        """A transaction on one pooled connection: committed when the block ends normally,
        rolled back when it raises (or is cancelled)."""
        async with self._connection("transaction") as conn:
            with _errors("begin", self.name):
                tx = conn.transaction(isolation=isolation, readonly=readonly)
                await tx.start()
            try:
                yield PostgresTransaction(self.name, conn)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await tx.rollback()
                    except _TRANSLATED as exc:  # the original error matters more
                        log.warning("connector %r: rollback failed: %r", self.name, exc)
                raise
            with _errors("commit", self.name):
                await tx.commit()

    def __repr__(self) -> str:
        return f"<PostgresSink {self.name!r} {self._dsn_shown or '(dsn hidden)'} {self.state}>"


class PostgresFactory:
    """Postgres sink: its own asyncpg pool; execute, fetch, COPY, explicit transactions."""

    options_type = PostgresOptions

    def create(self, name: str, options: Mapping[str, Any]) -> PostgresSink:
        return PostgresSink(name, parse_options(name, options, PostgresOptions))
