"""A throwaway (or persistent) PostgreSQL cluster run from the local server binaries.

Used by ``orchestrator dev``, the test suite and the benchmarks::

    async with EmbeddedPostgres(fsync=False) as pg:
        conn = await asyncpg.connect(pg.dsn)

The cluster is created with ``initdb`` (trust authentication, superuser ``postgres``) and
the server runs as our child process (not daemonised by ``pg_ctl``), so it is reaped the
moment it exits: ``running`` is exact even after a ``kill -9``, and a restart need not wait
for init to reap a daemon. As root, ``initdb`` and ``postgres`` run as the ``postgres`` OS
user (both refuse root) and the directories are handed to that user; as a normal user they
run directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import anyio
import asyncpg
from anyio.abc import Process

from orchestrator.dev._pgtools import (
    as_server_user,
    check_reachable_by_server_user,
    find_pg_bindir,
    give_to_server_user,
    initdb,
    server_env,
)
from orchestrator.dev._proc import backoff, free_port, log_tail, open_log, reap
from orchestrator.errors import ConfigError, StoreError

__all__ = ["EmbeddedPostgres", "StopMode", "find_pg_bindir"]

logger = logging.getLogger(__name__)

_BIND_ATTEMPTS = 3
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# How long to retry when the remains of a killed server (its lock file, or backends still
# attached to its shared memory) stop a new one from starting.
_STALE_RETRY_SECONDS = 10.0

StopMode = Literal["smart", "fast", "immediate"]
"""Postgres shutdown modes: wait for clients (``smart``), disconnect them (``fast``) or
exit at once with crash recovery on the next start (``immediate``)."""

_STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class EmbeddedPostgres:
    """A PostgreSQL server on ``127.0.0.1:port`` with a database named ``database``.

    ``data_dir=None`` creates a temporary cluster, removed on exit; a given ``data_dir`` is
    initialised when empty and reused (and kept) when it already holds a cluster.
    ``fsync=False`` (tests) also turns off ``full_page_writes``: only an OS crash or power
    loss can then lose data; a ``kill -9`` or an ``immediate`` stop loses no commit, so
    crash tests stay honest. ``synchronous_commit`` stays on on purpose: with fsync off it
    costs nothing measurable, and turning it off would let a killed server drop
    acknowledged commits. ``orchestrator dev`` keeps fsync on.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: bool = True,
        database: str = "orchestrator",
        max_connections: int = 200,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        if not _DB_NAME.match(database):
            raise ConfigError(
                f"EmbeddedPostgres database: expected a lower-case identifier, got {database!r}"
            )
        self._port = port
        self._auto_port = port == 0
        self._fsync = fsync
        self._database = database
        self._max_connections = max_connections
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self._temp_root: Path | None = None  # created by us, removed on exit
        self._socket_dir: Path | None = None
        self._bindir: Path | None = None
        self._process: Process | None = None
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None
        """How long the last ``start()`` took, including ``initdb`` on the first one."""

    @property
    def port(self) -> int:
        """The TCP port (0 until the first ``start()`` when constructed with ``port=0``)."""
        return self._port

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/<database>`` (trust authentication)."""
        return self.dsn_for(self._database)

    def dsn_for(self, database: str) -> str:
        """DSN of another database in this cluster (``postgres`` for administration)."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/{database}"

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir

    @property
    def log_path(self) -> Path | None:
        """The server log (inside the data directory)."""
        return self._data_dir / "postgres.log" if self._data_dir is not None else None

    @property
    def pid(self) -> int | None:
        """Process id of the running postmaster, else ``None``."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (also ``False`` after an outside ``kill``)."""
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Initialise the cluster if needed, start the server and create the database.

        A no-op when already running. Raises :class:`StoreError` with the log's tail when
        the server does not start within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        await self.stop()  # reap a server that died or was killed from outside
        began = anyio.current_time()
        try:
            with anyio.fail_after(self._startup_timeout):
                await self._prepare()
                await self._spawn_until_ready()
                self._auto_port = False  # keep the port for restarts
                await self._ensure_database()
        except TimeoutError:
            await self.stop(mode="immediate")
            raise StoreError(
                f"the embedded Postgres did not start within {self._startup_timeout:.0f} s; "
                f"its log {self.log_path} ends:\n" + log_tail(self.log_path or Path())
            ) from None
        except BaseException:
            await self.stop(mode="immediate")
            raise
        self.startup_seconds = anyio.current_time() - began
        logger.info(
            "embedded Postgres ready at %s in %.3f s (data: %s, fsync=%s)",
            self.dsn,
            self.startup_seconds,
            self._data_dir,
            "on" if self._fsync else "off",
        )

    async def stop(self, *, mode: StopMode = "fast") -> None:
        """Stop the server, keeping the data directory. Safe to call twice.

        ``immediate`` simulates a crash (recovery runs on the next start). A shutdown that
        does not finish within ``stop_timeout`` seconds escalates to ``immediate``, then
        SIGKILL. Shielded from cancellation.
        """
        process, self._process = self._process, None
        try:
            if process is not None:
                was_running = process.returncode is None
                with anyio.CancelScope(shield=True):
                    await self._shut_down(process, mode)
                if was_running:
                    logger.info("embedded Postgres on port %d stopped (%s)", self._port, mode)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def restart(self, *, mode: StopMode = "fast") -> None:
        """``stop(mode=mode)`` then ``start()`` on the same port and data directory."""
        await self.stop(mode=mode)
        await self.start()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove_temp_dirs()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await self._remove_temp_dirs()

    # -- internals ---------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Find the binaries, create the directories and run initdb when needed."""
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        if self._socket_dir is None:
            if self._data_dir is None:
                self._temp_root = Path(tempfile.mkdtemp(prefix="orchestrator-pg-"))
                self._data_dir = self._temp_root / "data"
                self._socket_dir = self._temp_root
            else:
                check_reachable_by_server_user(self._data_dir)
                # Unix socket paths are limited to ~107 bytes: keep the socket in /tmp.
                self._socket_dir = Path(tempfile.mkdtemp(prefix="orchestrator-pgsock-"))
            give_to_server_user(self._socket_dir)
        data_dir = self._data_dir
        assert data_dir is not None
        if (data_dir / "PG_VERSION").is_file():
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        give_to_server_user(data_dir)
        result = await initdb(self._bindir, data_dir, limit=self._startup_timeout)
        if result is None or result.returncode != 0:
            output = result.stdout.decode(errors="replace") if result is not None else ""
            raise StoreError(
                f"initdb into {data_dir} failed (the directory must be empty or hold a "
                f"cluster, and be reachable by the server's OS user):\n{output}"
            )

    async def _spawn_until_ready(self) -> None:
        """Start ``postgres``; retry on a port taken meanwhile or a killed server's remains."""
        assert self._data_dir is not None
        log_path = self._data_dir / "postgres.log"
        stale_deadline = anyio.current_time() + _STALE_RETRY_SECONDS
        delays = backoff(0.05, 0.5)
        bind_attempts = 0
        while True:
            if self._port == 0:
                self._port = free_port()
            output = await self._spawn_and_wait(log_path)
            if output is None:
                return
            if self._auto_port and "already in use" in output and bind_attempts < _BIND_ATTEMPTS:
                bind_attempts += 1
                self._port = 0
            elif ("lock file" in output or "still in use" in output) and (
                anyio.current_time() < stale_deadline
            ):
                await anyio.sleep(next(delays))
            else:
                raise StoreError(
                    f"the embedded Postgres exited while starting on port {self._port}; its "
                    f"log {log_path} ends:\n" + log_tail(log_path)
                )

    async def _spawn_and_wait(self, log_path: Path) -> str | None:
        """Start the server: ``None`` once it serves our data directory, else its output."""
        assert self._bindir is not None
        assert self._socket_dir is not None
        settings = [
            "listen_addresses=127.0.0.1",
            f"max_connections={self._max_connections}",
        ]
        if not self._fsync:
            settings += ["fsync=off", "full_page_writes=off"]
        command = [str(self._bindir / "postgres"), "-D", str(self._data_dir)]
        command += ["-p", str(self._port), "-k", str(self._socket_dir)]
        for setting in settings:
            command += ["-c", setting]
        if self._log is None:
            self._log = open_log(log_path)
            give_to_server_user(log_path)
        offset = self._log.tell()
        self._process = await anyio.open_process(
            as_server_user(command),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=server_env(),
            cwd="/",
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the server
            # after the clients.
            start_new_session=True,
        )
        for delay in backoff():
            if self._process.returncode is not None:
                await reap(self._process, grace=1)
                self._process = None
                return _read_from(log_path, offset)
            if await self._serves_our_data_dir():
                return None
            await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _serves_our_data_dir(self) -> bool:
        """True once the server on our port accepts connections and runs on our data dir."""
        try:
            conn = await asyncpg.connect(self.dsn_for("postgres"), timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return False  # refused, "the database system is starting up", ...
        try:
            data_dir = await conn.fetchval("SHOW data_directory")
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await conn.close()
        # Another server on the port (taken after free_port()): ours will fail to bind and
        # exit, and the caller retries on another port.
        return Path(data_dir) == self._data_dir

    async def _shut_down(self, process: Process, mode: StopMode) -> None:
        modes: list[StopMode] = [mode] if mode == "immediate" else [mode, "immediate"]
        for m in modes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(_STOP_SIGNALS[m])
                with anyio.move_on_after(self._stop_timeout):
                    await process.wait()
            if process.returncode is None:
                logger.warning(
                    "embedded Postgres ignored a %s shutdown for %ss", m, self._stop_timeout
                )
        await reap(process, grace=0, kill_first=True)

    async def _ensure_database(self) -> None:
        conn = await asyncpg.connect(self.dsn_for("postgres"), timeout=10)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self._database
            )
            if not exists:
                await conn.execute(f'CREATE DATABASE "{self._database}"')
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await conn.close()

    async def _remove_temp_dirs(self) -> None:
        for path in (self._temp_root, None if self._temp_root else self._socket_dir):
            if path is not None:
                await anyio.to_thread.run_sync(partial(shutil.rmtree, path, ignore_errors=True))
                if path.exists():
                    logger.warning("could not remove the embedded Postgres directory %s", path)
        if self._temp_root is not None:
            self._data_dir = None
        self._temp_root = self._socket_dir = None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(65_536).decode(errors="replace")
    except OSError:
        return ""
