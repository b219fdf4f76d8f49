"""What the workloads run on: the embedded servers, child processes and daemon configs.

* :class:`Infra`: an :class:`EmbeddedBroker` and an :class:`EmbeddedPostgres` with fsync and
  synchronous_commit ON (the defaults of a production server), plus ``pg_stat_statements``
  so each workload can count the statements it caused;
* :class:`Child`: a child process that is always reaped (SIGTERM, then SIGKILL);
* :class:`DaemonProcess`: ``python -m orchestrator --config X run``, as a user runs it, with
  its peak RSS and CPU time read from ``/proc``;
* :func:`write_config`: a daemon config and rules file for one workload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from anyio.abc import Process

from orchestrator.dev import EmbeddedBroker, EmbeddedPostgres

__all__ = [
    "REPO",
    "Child",
    "DaemonProcess",
    "Infra",
    "PgCounters",
    "cpu_seconds",
    "create_topic",
    "run_worker",
    "use_source",
    "write_config",
]

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
BENCH_TAG = "/* bench */"
"""Prefix of the harness's own SQL, so pg_stat_statements figures can leave it out."""
_TICK = os.sysconf("SC_CLK_TCK")


TANSU_SESSION_TIMEOUT_MS = 2000
TANSU_HEARTBEAT_INTERVAL_MS = 500
"""Group timings of every consumer the benchmark starts (daemons and W0), for Tansu."""


# -- child processes ---------------------------------------------------------------------

_source = {"root": REPO, "cwd": REPO, "path": str(REPO)}
"""Where child processes import ``orchestrator`` from (see :func:`use_source`)."""


def use_source(root: Path, workdir: Path) -> None:
    """Run daemons, migrations and workers on the product code in ``root`` (e.g. a
    ``git archive`` of one commit) instead of the working tree, which may be mid-edit.

    Children then see only ``root`` and a ``pkgs/bench`` symlink to this harness: ``python
    -m`` puts its working directory first on ``sys.path``, so they run from ``pkgs/``.
    """
    pkgs = workdir / "pkgs"
    pkgs.mkdir(exist_ok=True)
    link = pkgs / "bench"
    if not link.exists():
        link.symlink_to(REPO / "bench", target_is_directory=True)
    _source.update(root=root, cwd=pkgs, path=os.pathsep.join([str(pkgs), str(root)]))


def child_env() -> dict[str, str]:
    """The environment of child processes: the code importable, no OTLP exporter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ORCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_source["path"]), env.get("PYTHONPATH")]))
    return env


class Child:
    """A child process whose output goes to a file; ``stop()`` always reaps it."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.process: Process | None = None
        self._log: IO[bytes] | None = None
        self.started_at: float | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self._log = self.log_path.open("ab", buffering=0)
        self.started_at = time.time()
        self.process = await anyio.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=child_env(),
            cwd=str(_source["cwd"]),
            start_new_session=True,  # a terminal's Ctrl-C reaches only the harness
        )

    def send(self, signum: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                assert self.process is not None
                self.process.send_signal(signal.Signals(signum))

    async def stop(self, *, grace: float = 10.0, signum: int = signal.SIGTERM) -> int | None:
        """Signal, wait up to ``grace`` seconds, then SIGKILL. Shielded; safe to call twice."""
        process = self.process
        with anyio.CancelScope(shield=True):
            if process is not None:
                if process.returncode is None:
                    self.send(signum)
                    with anyio.move_on_after(grace):
                        await process.wait()
                if process.returncode is None:
                    log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    with anyio.move_on_after(5):
                        await process.wait()
                with anyio.move_on_after(1):
                    await process.aclose()
            if self._log is not None:
                self._log.close()
                self._log = None
        return None if process is None else process.returncode

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    def log_count(self, needle: str) -> int:
        """Lines of the child's output containing ``needle``."""
        try:
            with self.log_path.open("rb") as f:
                return sum(needle.encode() in line for line in f)
        except OSError:
            return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_bytes()[-16_384:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def run_worker(
    task: str, params: Mapping[str, Any], *, limit: float, workdir: Path
) -> dict[str, Any]:
    """Run ``python -m bench.worker TASK`` and return its JSON result (bounded, reaped)."""
    out = workdir / f"worker-{task}-{uuid.uuid4().hex[:6]}.log"
    child = Child(
        f"worker {task}",
        [sys.executable, "-m", "bench.worker", task, json.dumps(dict(params))],
        out,
    )
    try:
        await child.start()
        with anyio.fail_after(limit):
            code = await child.wait()
    except TimeoutError:
        raise TimeoutError(f"worker {task} did not finish within {limit:.0f}s") from None
    finally:
        await child.stop(grace=3)
    lines = out.read_text(errors="replace").strip().splitlines()
    if code != 0 or not lines:
        raise RuntimeError(f"worker {task} failed (exit {code}):\n{child.log_tail()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def publish_backlog(
    bootstrap: str,
    topic: str,
    *,
    prefix: str,
    dataset: str,
    count: int,
    processes: int,
    limit: float,
    workdir: Path,
    sampled: bool = True,
) -> dict[str, Any]:
    """Publish ``count`` events with ``processes`` producer processes; time the whole.
    ``sampled``: the sampled flag of the events' ``traceparent``."""
    share, extra = divmod(count, processes)
    began = time.perf_counter()
    results: list[dict[str, Any]] = []

    async def one(start: int, n: int) -> None:
        params = {
            "bootstrap": bootstrap,
            "topic": topic,
            "prefix": prefix,
            "dataset": dataset,
            "start": start,
            "count": n,
            "sampled": sampled,
        }
        results.append(await run_worker("publish", params, limit=limit, workdir=workdir))

    async with anyio.create_task_group() as tg:
        start = 0
        for k in range(processes):
            n = share + (1 if k < extra else 0)
            if n:
                tg.start_soon(one, start, n)
            start += n
    seconds = time.perf_counter() - began
    return {
        "events": count,
        "processes": processes,
        "seconds": seconds,
        "events_per_second": count / seconds if seconds > 0 else None,
    }


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    """Create a topic of ``partitions`` partitions (replication 1)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


# -- /proc ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """User + system CPU seconds of ``pid`` (plus its reaped children's with ``children``)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the ")": state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def descendants_cpu(root: int) -> float:
    """CPU seconds of ``root``, its reaped children, and its live children."""
    total = cpu_seconds(root, children=True) or 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == root:
            total += cpu_seconds(int(entry.name)) or 0.0
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in kB; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def machine_cpu() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine (all cores), from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


def load_average() -> float:
    return os.getloadavg()[0]


# -- the daemon -------------------------------------------------------------------------


@dataclass
class DaemonProcess:
    """One ``orchestrator run`` process; ``sample()`` records its RSS."""

    config: Path
    log_path: Path
    name: str = "daemon"
    child: Child = field(init=False)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    peak_rss_kb: int = 0
    cpu: float | None = None

    def __post_init__(self) -> None:
        self.child = Child(
            self.name,
            [sys.executable, "-m", "orchestrator", "--config", str(self.config), "run"],
            self.log_path,
        )

    async def start(self) -> None:
        await self.child.start()

    @property
    def pid(self) -> int:
        return self.child.pid

    def sample(self) -> None:
        """Record the current RSS (and keep the kernel's peak, VmHWM)."""
        mem = memory_kb(self.child.pid)
        if mem:
            assert self.child.started_at is not None
            self.rss_samples.append((time.time() - self.child.started_at, mem["VmRSS"]))
            self.peak_rss_kb = max(self.peak_rss_kb, mem["VmHWM"], mem["VmRSS"])
            self.cpu = cpu_seconds(self.child.pid)

    def cpu_now(self) -> float:
        """CPU seconds used so far (0 before the start or after the exit)."""
        return (cpu_seconds(self.child.pid) or 0.0) if self.child.alive else 0.0

    async def stop(self, grace: float = 40.0) -> int | None:
        if self.child.alive:
            self.sample()
        return await self.child.stop(grace=grace)

    def memory_report(self) -> dict[str, Any]:
        step = max(1, len(self.rss_samples) // 200)
        return {
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "rss_mb_series": [
                [round(t, 2), round(kb / 1024, 1)] for t, kb in self.rss_samples[::step]
            ],
        }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(
    workdir: Path,
    name: str,
    *,
    bootstrap: str,
    group_timings: Mapping[str, int],
    dsn: str,
    topic: str,
    group: str,
    schema: str,
    pipeline: str,
    dataset: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``<name>.toml`` (daemon config) and ``<name>-rules.toml`` (one rule: every
    ``data.arrived`` event of ``dataset`` runs ``pipeline``) into ``workdir``."""
    rules = workdir / f"{name}-rules.toml"
    rules.write_text(
        "[[rule]]\n"
        f"name = {json.dumps('bench-' + pipeline)}\n"
        f"pipeline = {json.dumps(pipeline)}\n"
        "[rule.match]\n"
        'type = ["data.arrived"]\n'
        f"data.dataset = [{json.dumps(dataset)}]\n"
    )
    doc: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            "publish_topic": topic,
            "group_id": group,
            "create_topics": False,
            **group_timings,
        },
        "postgres": {"dsn": dsn, "schema": schema, "migrate_on_start": True},
        "rules": {"files": [rules.name]},
        "pipelines": {"paths": [str(REPO)], "modules": ["bench.pipelines"]},
        "runner": {},
        "telemetry": {"log_level": "INFO"},
    }
    for section, values in (overrides or {}).items():
        doc.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path = workdir / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


# -- servers ----------------------------------------------------------------------------


@dataclass
class PgCounters:
    """Server-wide counters at one instant; subtract two to get a workload's share."""

    commits: int
    wal_records: int
    wal_bytes: int
    wal_syncs: int
    statements: dict[str, tuple[int, float, int]]  # query -> (calls, total ms, rows)

    def delta(self, before: PgCounters) -> dict[str, Any]:
        stmts: list[dict[str, Any]] = []
        for query, (calls, ms, rows) in self.statements.items():
            c0, ms0, r0 = before.statements.get(query, (0, 0.0, 0))
            if calls - c0 > 0:
                stmts.append(
                    {"query": query, "calls": calls - c0, "ms": ms - ms0, "rows": rows - r0}
                )
        stmts.sort(key=lambda s: -s["calls"])
        return {
            "commits": self.commits - before.commits,
            "wal_records": self.wal_records - before.wal_records,
            "wal_bytes": self.wal_bytes - before.wal_bytes,
            "wal_syncs": self.wal_syncs - before.wal_syncs,
            "statements": stmts,
        }


class ExternalBroker:
    """A Kafka-protocol broker the benchmark does not run (``--bootstrap``): topics are
    created and deleted on it, its CPU is not measured."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.pid: int | None = None

    async def __aenter__(self) -> ExternalBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class Infra:
    """The broker and Postgres for a benchmark session, plus admin helpers."""

    def __init__(self, workdir: Path, bootstrap: str | None = None) -> None:
        """``bootstrap``: use that broker instead of starting an embedded Tansu."""
        self.workdir = workdir
        self.broker: EmbeddedBroker | ExternalBroker = (
            ExternalBroker(bootstrap)
            if bootstrap
            else EmbeddedBroker(log_path=workdir / "tansu.log")
        )
        self.pg = EmbeddedPostgres(fsync=True)
        self.pgss = False
        self.server: dict[str, Any] = {}
        self._schemas: list[str] = []
        """Schemas created for workloads, dropped by :meth:`settle`."""

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def broker_name(self) -> str:
        if isinstance(self.broker, ExternalBroker):
            return f"external at {self.broker.bootstrap} (CPU not measured)"
        return "Tansu (embedded)"

    @property
    def group_timings(self) -> dict[str, int]:
        """Consumer-group timings of the daemons and the W0 loop. Tansu answers a JoinGroup
        after half the session timeout, rounded up to whole seconds (3000 ms: 2 s; 2000 ms:
        1 s): short ones keep start-up from being the group join. Another broker gets the
        clients' defaults (Apache Kafka refuses a session timeout under its
        ``group.min.session.timeout.ms``, 6 s by default)."""
        if isinstance(self.broker, ExternalBroker):
            return {}
        return {
            "session_timeout_ms": TANSU_SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": TANSU_HEARTBEAT_INTERVAL_MS,
        }

    @property
    def dsn(self) -> str:
        return self.pg.dsn

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Infra]:
        async with self.broker, self.pg:
            await self._setup_pg()
            yield self

    async def _setup_pg(self) -> None:
        conn = await asyncpg.connect(self.pg.dsn_for("postgres"))
        try:
            await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        finally:
            await conn.close()
        await self.pg.restart()
        async with self.connect() as conn:
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                self.pgss = True
            except asyncpg.PostgresError as exc:
                log.warning("pg_stat_statements unavailable (%s); no statement counts", exc)
            settings = await conn.fetch(
                f"""{BENCH_TAG} SELECT name, setting FROM pg_settings WHERE name IN
                    ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method',
                     'shared_buffers', 'server_version', 'max_connections', 'commit_delay')"""
            )
        self.server = {r["name"]: r["setting"] for r in settings}
        self.server["probe_commit_ms"] = await self._probe_commits()

    async def _probe_commits(self, n: int = 200) -> dict[str, Any]:
        """Latency of ``n`` sequential one-row autocommit inserts: the price of one durable
        commit (a WAL flush) on this disk, which every un-batched write pays."""
        from bench.stats import summarize

        async with self.connect() as conn:
            await conn.execute(f"{BENCH_TAG} CREATE TEMP TABLE probe (v int)")
            await conn.execute(f"{BENCH_TAG} CREATE TABLE IF NOT EXISTS bench_probe (v int)")
            times = []
            for i in range(n):
                began = time.perf_counter()
                await conn.execute(f"{BENCH_TAG} INSERT INTO bench_probe VALUES ($1)", i)
                times.append(time.perf_counter() - began)
            await conn.execute(f"{BENCH_TAG} DROP TABLE bench_probe")
        return summarize(times, scale=1000)

    @contextlib.asynccontextmanager
    async def connect(self, schema: str | None = None) -> AsyncIterator[asyncpg.Connection]:
        settings = {"search_path": schema} if schema else None
        conn = await asyncpg.connect(self.pg.dsn, server_settings=settings)
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await conn.close()

    async def counters(self) -> PgCounters:
        async with self.connect() as conn:
            commits = await conn.fetchval(
                f"{BENCH_TAG} SELECT xact_commit FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
            wal = await conn.fetchrow(
                f"{BENCH_TAG} SELECT wal_records, wal_bytes, wal_sync FROM pg_stat_wal"
            )
            if wal is None:
                raise RuntimeError("pg_stat_wal returned no row")
            statements: dict[str, tuple[int, float, int]] = {}
            if self.pgss:
                rows = await conn.fetch(
                    f"""{BENCH_TAG} SELECT query, sum(calls)::bigint AS calls,
                               sum(total_exec_time) AS ms, sum(rows)::bigint AS rows
                        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                        WHERE d.datname = current_database()
                          AND query NOT LIKE '%/* bench */%'
                        GROUP BY query"""
                )
                statements = {
                    " ".join(r["query"].split()): (r["calls"], r["ms"], r["rows"]) for r in rows
                }
        return PgCounters(
            commits=commits,
            wal_records=wal["wal_records"],
            wal_bytes=int(wal["wal_bytes"]),
            wal_syncs=wal["wal_sync"],
            statements=statements,
        )

    def postmaster_pid(self) -> int | None:
        data = self.pg.data_dir
        try:
            return int((data / "postmaster.pid").read_text().split()[0]) if data else None
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by Postgres (all backends), the broker and this harness."""
        out: dict[str, float] = {}
        pm = self.postmaster_pid()
        if pm is not None:
            out["postgres"] = descendants_cpu(pm)
        if self.broker.pid is not None:
            out["broker"] = cpu_seconds(self.broker.pid) or 0.0
        t = os.times()
        out["harness"] = t.user + t.system
        return out

    async def create_topic(self, name: str, partitions: int) -> None:
        await create_topic(self.bootstrap, name, partitions)

    async def delete_topic(self, name: str) -> None:
        with anyio.move_on_after(15, shield=True):
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            try:
                await admin.start()
                await admin.delete_topics([name])
            except Exception as exc:  # best effort: frees broker memory
                log.warning("could not delete topic %s: %r", name, exc)
            finally:
                await admin.close()

    async def create_schema(self, schema: str) -> None:
        async with self.connect() as conn:
            await conn.execute(f"{BENCH_TAG} DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute(f"{BENCH_TAG} CREATE SCHEMA {schema}")
        self._schemas.append(schema)

    async def settle(self) -> None:
        """Between workloads: drop the finished workloads' schemas and write a checkpoint, so
        that autovacuum of their tables and the checkpoint of their writes do not land in
        the next workload (Postgres once took 18.6 CPU-s instead of ~3.5 in a W1 1-step
        drain that followed the 3-step one)."""
        schemas, self._schemas = self._schemas, []
        with anyio.move_on_after(120, shield=True):
            async with self.connect() as conn:
                for schema in schemas:
                    await conn.execute(f"{BENCH_TAG} DROP SCHEMA IF EXISTS {schema} CASCADE")
                await conn.execute(f"{BENCH_TAG} CHECKPOINT")

    async def drop_schema(self, schema: str) -> None:
        with anyio.move_on_after(60, shield=True):
            async with self.connect() as conn:
                await conn.execute(f"{BENCH_TAG} DROP SCHEMA IF EXISTS {schema} CASCADE")

    async def migrate(self, config: Path) -> None:
        """``orchestrator --config X db migrate``, as an operator would before starting."""
        child = Child(
            "migrate",
            [sys.executable, "-m", "orchestrator", "--config", str(config), "db", "migrate"],
            self.workdir / "migrate.log",
        )
        try:
            await child.start()
            with anyio.fail_after(60):
                code = await child.wait()
        finally:
            await child.stop(grace=3)
        if code != 0:
            raise RuntimeError(f"db migrate failed (exit {code}):\n{child.log_tail()}")
