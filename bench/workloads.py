"""The workloads W0-W5. Each returns a dict of figures with ``status`` ``ok``, ``timeout``
or ``error``; none runs past its deadline, and every process it starts is reaped."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from aiokafka import AIOKafkaProducer

from bench.infra import (
    BENCH_TAG,
    Child,
    DaemonProcess,
    Infra,
    cpu_seconds,
    load_average,
    machine_cpu,
    publish_backlog,
    run_worker,
    write_config,
)
from bench.pipelines import FIRST_STEP
from bench.stats import per_second, rate, summarize
from bench.worker import SOURCE, event_record
from orchestrator.dev._proc import free_port

__all__ = ["Session", "w0_limit", "w1_drain", "w2_latency", "w3_matching", "w4_memory"]

log = logging.getLogger("bench")


@dataclass
class Session:
    """What every workload needs: the servers, where to write, and the knobs."""

    infra: Infra
    workdir: Path
    results_dir: Path
    partitions: int = 4
    publishers: int = 2
    timeout: float = 300.0
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    profile: bool = False
    profile_seconds: float = 20.0
    stamp: str = ""


class WorkloadError(RuntimeError):
    pass


def _check_alive(*daemons: DaemonProcess) -> None:
    for d in daemons:
        if not d.child.alive:
            raise WorkloadError(f"{d.name} exited early:\n{d.child.log_tail()}")


def _uid() -> str:
    return uuid.uuid4().hex[:6]


# -- W0 ---------------------------------------------------------------------------------


async def w0_limit(s: Session, events: int) -> dict[str, Any]:
    """A bare aiokafka loop writing each getmany batch with one unnest insert."""
    uid = _uid()
    topic = f"bench-w0-{uid}"
    max_batch = _daemon_setting(s, "kafka", "max_batch", 500)
    await s.infra.create_topic(topic, s.partitions)
    try:
        pub = await publish_backlog(
            s.infra.bootstrap, topic, prefix=f"w0{uid}", dataset="bench.w0", count=events,
            processes=s.publishers, limit=s.timeout, workdir=s.workdir,
        )  # fmt: skip
        before = await s.infra.counters()
        params = {
            "bootstrap": s.infra.bootstrap,
            "topic": topic,
            "group": f"g-{topic}",
            "dsn": s.infra.dsn,
            "table": f"bench_w0_{uid}",
            "events": events,
            "max_batch": max_batch,
            "group_timings": s.infra.group_timings,  # empty: aiokafka's defaults
        }
        try:
            out = await run_worker("limit", params, limit=s.timeout, workdir=s.workdir)
        except TimeoutError as exc:
            return {"status": "timeout", "error": str(exc), "events": events, "publish": pub}
        pg = (await s.infra.counters()).delta(before)
        async with s.infra.connect() as conn:
            await conn.execute(f"{BENCH_TAG} DROP TABLE IF EXISTS bench_w0_{uid}")
    finally:
        await s.infra.delete_topic(topic)
    return {
        "status": "ok",
        "events": out["events"],
        "max_batch": max_batch,
        "batches": out["batches"],
        "seconds": out["seconds"],
        # The limit is a rate: from the first batch to the last commit. The wall figure also
        # holds the consumer-group join (~1.5 s on Tansu with a 3 s session timeout).
        "events_per_second": rate(out["events"], out["steady_seconds"]),
        "events_per_second_incl_group_join": rate(out["events"], out["seconds"]),
        "publish": pub,
        "commits": pg["commits"],
        "wal_syncs": pg["wal_syncs"],
    }


def _daemon_setting(s: Session, section: str, key: str, default: Any) -> Any:
    return s.overrides.get(section, {}).get(key, default)


# -- W1 / W5 ----------------------------------------------------------------------------


class Profiler:
    """py-spy on the daemon: a flame graph (SVG) and collapsed stacks (for percentages)."""

    def __init__(self, s: Session, pid: int, name: str) -> None:
        self.children: list[Child] = []
        self.files: dict[str, Path] = {}
        exe = Path(sys.executable).parent / "py-spy"
        if not exe.exists():
            log.warning("py-spy is not installed (.venv/bin/pip install py-spy); no profile")
            return
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            out = s.results_dir / f"profile-{name}.{suffix}"
            self.files[suffix] = out
            cmd = [str(exe), "record", "--nonblocking", "--format", fmt, "-o", str(out),
                   "--pid", str(pid), "--duration", str(int(s.profile_seconds))]  # fmt: skip
            self.children.append(Child(f"py-spy {fmt}", cmd, s.workdir / f"py-spy-{suffix}.log"))

    async def start(self) -> None:
        for c in self.children:
            await c.start()

    async def stop(self) -> dict[str, str]:
        for c in self.children:  # SIGINT: py-spy writes what it has and exits
            await c.stop(grace=20, signum=signal.SIGINT)
        return {k: str(v) for k, v in self.files.items() if v.exists()}


async def _poll_runs(
    s: Session,
    schema: str,
    expected: int,
    daemons: Sequence[DaemonProcess],
    t0: float,
    series: list[list[float]],
    on_progress: Any = None,
) -> None:
    """Every ~200 ms: count runs, sample the daemons' RSS, fail if a daemon died."""
    async with s.infra.connect(schema) as conn:
        while True:
            row = await conn.fetchrow(
                f"""{BENCH_TAG} SELECT count(*) AS total,
                        count(*) FILTER (WHERE status = 'succeeded') AS ok,
                        count(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS bad
                    FROM runs"""
            )
            if row is None:
                raise RuntimeError("run status count query returned no row")
            for d in daemons:
                d.sample()
            series.append([round(time.time() - t0, 3), row["total"], row["ok"]])
            if on_progress is not None:
                await on_progress(row["total"], row["ok"])
            if row["ok"] + row["bad"] >= expected:
                return
            _check_alive(*daemons)
            await anyio.sleep(0.2)


@contextlib.asynccontextmanager
async def _otlp_sink(s: Session, name: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """An OTLP/HTTP receiver in a child process (``bench.worker sink``): yields its endpoint
    and a dict that holds its counts and CPU once the block ends."""
    port = free_port()
    out = s.workdir / f"{name}-sink.log"
    child = Child(
        f"{name} OTLP sink",
        [sys.executable, "-m", "bench.worker", "sink", json.dumps({"port": port})],
        out,
    )
    report: dict[str, Any] = {}
    await child.start()
    try:
        with anyio.fail_after(15):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    _check_child(child)
                    await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}", report
    finally:
        report["cpu_seconds"] = cpu_seconds(child.pid)
        await child.stop(grace=5)
        lines = out.read_text(errors="replace").strip().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            report.update(json.loads(lines[-1]))


def _check_child(child: Child) -> None:
    if not child.alive:
        raise WorkloadError(f"{child.name} exited:\n{child.log_tail()}")


async def w1_drain(
    s: Session,
    name: str,
    pipeline: str,
    events: int,
    *,
    daemons: int = 1,
    traced: bool = False,
    sampled: bool = True,
) -> dict[str, Any]:
    """Pre-publish ``events``, start ``daemons`` processes, time until every run succeeded.

    ``traced``: the daemons export their spans and metrics by OTLP/HTTP to a receiver in a
    child process (``bench.worker sink``), so every span the events' sampled traceparents
    ask for is recorded, batched and sent; ``result["otlp"]`` has what it received.
    ``sampled=False``: the events' ``traceparent`` says not sampled (sampling at the
    producer), so the daemon records none of their spans.
    """
    async with contextlib.AsyncExitStack() as stack:
        overrides = s.overrides
        otlp: dict[str, Any] | None = None
        if traced:
            endpoint, otlp = await stack.enter_async_context(_otlp_sink(s, name))
            overrides = {
                **overrides,
                "telemetry": {**overrides.get("telemetry", {}), "otlp_endpoint": endpoint},
            }
        result = await _w1_drain(s, name, pipeline, events, daemons, overrides, sampled)
    if otlp is not None:
        result["otlp"] = otlp
        spans, done = otlp.get("spans"), result.get("succeeded")
        if spans and done:
            result["otlp"]["spans_per_run"] = round(spans / done, 2)
    return result


async def _w1_drain(
    s: Session,
    name: str,
    pipeline: str,
    events: int,
    daemons: int,
    overrides: Mapping[str, Mapping[str, Any]],
    sampled: bool,
) -> dict[str, Any]:
    uid = _uid()
    topic, dataset = f"bench-{name}-{uid}", f"bench.{name}"
    schema = f"b_{name}_{uid}".replace("-", "_")
    result: dict[str, Any] = {"status": "error", "events": events, "pipeline": pipeline,
                              "daemons": daemons, "partitions": s.partitions}  # fmt: skip
    await s.infra.create_topic(topic, s.partitions)
    procs: list[DaemonProcess] = []
    profiler: Profiler | None = None
    try:
        result["publish"] = await publish_backlog(
            s.infra.bootstrap, topic, prefix=f"{name}{uid}", dataset=dataset, count=events,
            processes=s.publishers, limit=s.timeout, workdir=s.workdir, sampled=sampled,
        )  # fmt: skip
        await s.infra.create_schema(schema)
        config = write_config(
            s.workdir, name, bootstrap=s.infra.bootstrap, group_timings=s.infra.group_timings,
            dsn=s.infra.dsn, topic=topic,
            group=f"g-{topic}", schema=schema, pipeline=pipeline, dataset=dataset,
            overrides=overrides,
        )  # fmt: skip
        await s.infra.migrate(config)
        procs = [
            DaemonProcess(config, s.workdir / f"{name}-daemon{k}.log", name=f"{name} daemon {k}")
            for k in range(daemons)
        ]
        before = await s.infra.counters()
        cpu0, m0, load0 = s.infra.cpu(), machine_cpu(), load_average()
        series: list[list[float]] = []
        t0 = time.time()
        for d in procs:
            await d.start()

        async def maybe_profile(total: int, ok: int) -> None:
            nonlocal profiler
            if s.profile and profiler is None and ok > 0:
                profiler = Profiler(s, procs[0].pid, name)
                await profiler.start()

        with anyio.move_on_after(s.timeout) as scope:
            await _poll_runs(s, schema, events, procs, t0, series, maybe_profile)
        if profiler is not None:
            result["profile_files"] = await profiler.stop()
            profiler = None
        for d in procs:
            d.sample()
        result.update(await _drain_figures(s, schema, pipeline, t0, procs))
        cpu1, m1 = s.infra.cpu(), machine_cpu()
        # Backends publish pg_stat_database/pg_stat_wal counters when idle for 10 s or at
        # exit: stop the daemons (closing their connections) before reading them.
        for d in procs:
            await d.stop()
        await anyio.sleep(0.5)
        pg = (await s.infra.counters()).delta(before)
        result["status"] = "timeout" if scope.cancelled_caught else "ok"
        if scope.cancelled_caught:
            result["error"] = f"not all runs finished within {s.timeout:.0f}s"
        done = max(1, result["succeeded"])
        result["progress"] = series[:: max(1, len(series) // 300)]
        result["per_run"] = _per_run(pg, done)
        result["statements"] = pg["statements"][:25]
        cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
        for k, d in enumerate(procs):
            cpu[f"daemon{k}"] = d.cpu or 0.0
        wall = result.get("wall_seconds") or (time.time() - t0)
        result["cpu_seconds"] = {k: round(v, 2) for k, v in cpu.items()}
        result["cpu_ms_per_run"] = {k: round(1000 * v / done, 3) for k, v in cpu.items()}
        busy = m1[0] - m0[0]
        result["machine_cpu_busy"] = round(busy / max(1.0, m1[1] - m0[1]), 3)
        # CPU of processes that are not part of the benchmark (other work on this machine):
        # when large, the figures are disturbed.
        result["other_cpu_seconds"] = round(max(0.0, busy - sum(cpu.values())), 2)
        result["load_average"] = [load0, load_average()]
        result["wall_seconds_measured"] = round(wall, 3)
        result["memory"] = [d.memory_report() for d in procs]
        result["peak_rss_mb"] = max(d.peak_rss_kb for d in procs) / 1024
    except WorkloadError as exc:
        result["error"] = str(exc)
    finally:
        with anyio.CancelScope(shield=True):
            if profiler is not None:
                await profiler.stop()
            for d in procs:
                await d.stop()
            await s.infra.delete_topic(topic)
    return result


def _per_run(pg: Mapping[str, Any], runs: int) -> dict[str, float]:
    calls = sum(st["calls"] for st in pg["statements"])
    return {
        "statements": round(calls / runs, 2),
        "commits": round(pg["commits"] / runs, 2),
        "wal_syncs": round(pg["wal_syncs"] / runs, 3),
        "wal_bytes": round(pg["wal_bytes"] / runs, 1),
        "wal_records": round(pg["wal_records"] / runs, 2),
    }


async def _drain_figures(
    s: Session, schema: str, pipeline: str, t0: float, procs: Sequence[DaemonProcess]
) -> dict[str, Any]:
    async with s.infra.connect(schema) as conn:
        row = await conn.fetchrow(
            f"""{BENCH_TAG} SELECT count(*) AS runs,
                    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                    count(*) FILTER (WHERE status = 'failed') AS failed,
                    count(*) FILTER (WHERE claims > 1) AS reclaimed,
                    extract(epoch FROM min(created_at))::float8 AS first_created,
                    extract(epoch FROM max(created_at))::float8 AS last_created,
                    extract(epoch FROM max(finished_at))::float8 AS last_finished,
                    extract(epoch FROM percentile_disc(0.99) WITHIN GROUP
                        (ORDER BY finished_at))::float8 AS p99_finished
                FROM runs"""
        )
        if row is None:
            raise RuntimeError("drain figures query returned no row")
        owners = await conn.fetch(
            f"""{BENCH_TAG} SELECT owner, count(*) AS n FROM step_attempts
                WHERE step = $1 AND attempt = 1 GROUP BY owner ORDER BY owner""",
            FIRST_STEP[pipeline],
        )
        attempts = await conn.fetchval(f"{BENCH_TAG} SELECT count(*) FROM step_attempts")
    ok = row["succeeded"]
    last = row["last_finished"]
    first = row["first_created"]
    wall = None if last is None else last - t0
    steady = None if last is None or first is None else last - first
    ingest = None if first is None else row["last_created"] - first
    p99 = row["p99_finished"]
    lost = sum(d.child.log_count("lease lost") for d in procs)
    return {
        "runs": row["runs"],
        "succeeded": ok,
        "failed": row["failed"],
        "step_attempts": attempts,
        "runs_claimed_more_than_once": row["reclaimed"],
        "lease_lost_warnings": lost,
        "seconds_to_99pct": None if p99 is None else p99 - t0,
        "runs_per_second_to_99pct": rate(0.99 * ok, None if p99 is None else p99 - t0),
        "wall_seconds": wall,
        "runs_per_second": rate(ok, wall),
        "startup_seconds": None if first is None else first - t0,
        "steady_seconds": steady,
        "steady_runs_per_second": rate(ok, steady),
        "ingest_events_per_second": rate(row["runs"], ingest),
        "runs_per_daemon": [r["n"] for r in owners],
    }


# -- W2 ---------------------------------------------------------------------------------


async def _publish_at_rate(
    s: Session, topic: str, prefix: str, dataset: str, per_second: int, seconds: float
) -> dict[str, Any]:
    """Publish ``per_second`` events for ``seconds`` on a fixed schedule from a child process
    (``bench.worker rate``); its result notes each event's send time and its own CPU."""
    params = {
        "bootstrap": s.infra.bootstrap,
        "topic": topic,
        "prefix": prefix,
        "dataset": dataset,
        "per_second": per_second,
        "seconds": seconds,
    }
    pub = await run_worker("rate", params, limit=seconds + 60, workdir=s.workdir)
    if pub["delivery_errors"]:
        raise WorkloadError(f"publishing at {per_second}/s failed: {pub['delivery_errors']}")
    return pub


async def _cores_by_second(
    s: Session, daemon: DaemonProcess | None, out: dict[str, list[float]]
) -> None:
    """Append each process's CPU (cores) for every second until cancelled: shows whether a
    rising latency comes with a rising cost (the broker's, as its log grows)."""

    def cpu() -> dict[str, float]:
        return {**s.infra.cpu(), **({"daemon": daemon.cpu_now()} if daemon else {})}

    previous = cpu()
    while True:
        await anyio.sleep(1.0)
        now = cpu()
        for name in ("broker", "daemon", "postgres"):
            if name in now and name in previous:
                out.setdefault(name, []).append(round(now[name] - previous[name], 2))
        previous = now


_TIMINGS = f"""{BENCH_TAG}
SELECT e.event_id,
       extract(epoch FROM e.published_at)::float8 AS kafka_ts,
       extract(epoch FROM e.received_at)::float8 AS ingested,
       extract(epoch FROM r.started_at)::float8 AS claimed,
       extract(epoch FROM a.started_at)::float8 AS step_start,
       extract(epoch FROM r.finished_at)::float8 AS finished,
       r.status
FROM events e
JOIN runs r ON r.rule = $1 AND r.trigger_key = 'event:' || e.source || '#' || e.event_id
LEFT JOIN step_attempts a ON a.run_id = r.id AND a.step = $2 AND a.attempt = 1
WHERE e.source = $3 AND e.event_id LIKE $4
"""


async def _finished_runs(conn: Any) -> int:
    n: int = await conn.fetchval(
        f"{BENCH_TAG} SELECT count(*) FROM runs WHERE status IN ('succeeded', 'failed')"
    )
    return n


async def w2_latency(
    s: Session, rates: Sequence[int], seconds: float, *, pipeline: str = "chain3"
) -> dict[str, Any]:
    """Steady publishing at each rate; publish -> first step start and -> run finished."""
    uid = _uid()
    name = "w2"
    topic, dataset = f"bench-{name}-{uid}", f"bench.{name}"
    schema = f"b_{name}_{uid}".replace("-", "_")
    result: dict[str, Any] = {"status": "error", "pipeline": pipeline, "seconds_per_rate": seconds,
                              "rates": {}}  # fmt: skip
    await s.infra.create_topic(topic, s.partitions)
    await s.infra.create_schema(schema)
    config = write_config(
        s.workdir, name, bootstrap=s.infra.bootstrap, group_timings=s.infra.group_timings,
        dsn=s.infra.dsn, topic=topic,
        group=f"g-{topic}", schema=schema, pipeline=pipeline, dataset=dataset,
        overrides=s.overrides,
    )  # fmt: skip
    daemon = DaemonProcess(config, s.workdir / f"{name}-daemon.log", name="w2 daemon")
    producer = AIOKafkaProducer(bootstrap_servers=s.infra.bootstrap, acks=1, linger_ms=0,
                                enable_idempotence=False)  # fmt: skip
    try:
        await producer.start()
        result["kafka_only"] = await _kafka_floor(s, rates[:2], seconds)
        await s.infra.migrate(config)
        await daemon.start()
        async with s.infra.connect(schema) as conn:
            # Warm-up: the first run proves the group is joined and the pool is open.
            with anyio.fail_after(60):
                while await _finished_runs(conn) < 1:
                    if await conn.fetchval(f"{BENCH_TAG} SELECT count(*) FROM events") == 0:
                        value, key, headers = event_record(f"warm{uid}", 0, dataset)
                        await producer.send_and_wait(topic, value, key=key, headers=headers)
                    _check_alive(daemon)
                    await anyio.sleep(0.1)
            expected = 1
            saturated_at: int | None = None
            for r in rates:
                if saturated_at is not None:
                    result["rates"][str(r)] = {
                        "status": "skipped",
                        "rate": r,
                        "error": f"the daemon could not keep up with {saturated_at}/s",
                    }
                    continue
                daemon.sample()
                m0, load0 = machine_cpu(), load_average()
                cpu0 = {**s.infra.cpu(), "daemon": daemon.cpu or 0.0}
                cores: dict[str, list[float]] = {}
                async with anyio.create_task_group() as sampling:
                    sampling.start_soon(_cores_by_second, s, daemon, cores)
                    pub = await _publish_at_rate(s, topic, f"r{r}x{uid}", dataset, r, seconds)
                    sampling.cancel_scope.cancel()
                expected += pub["published"]
                phase: dict[str, Any] = {"status": "ok", "rate": r}
                drain_began = time.perf_counter()
                with anyio.move_on_after(max(20.0, seconds)) as scope:
                    while await _finished_runs(conn) < expected:
                        daemon.sample()
                        _check_alive(daemon)
                        await anyio.sleep(0.1)
                phase["drain_after_publish_seconds"] = time.perf_counter() - drain_began
                daemon.sample()
                m1 = machine_cpu()
                cpu1 = {**s.infra.cpu(), "daemon": daemon.cpu or 0.0}
                cpu1["publisher"] = pub["cpu_seconds"]
                ours = sum(cpu1[k] - cpu0.get(k, 0.0) for k in cpu1)
                phase["machine_cpu_busy"] = round((m1[0] - m0[0]) / max(1.0, m1[1] - m0[1]), 3)
                phase["other_cpu_seconds"] = round(max(0.0, m1[0] - m0[0] - ours), 2)
                phase["cpu_seconds"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
                phase["load_average"] = [load0, load_average()]
                phase["cores_by_second"] = cores
                if scope.cancelled_caught:
                    saturated_at = r
                    phase["status"] = "saturated"
                    phase["error"] = (
                        "runs still unfinished after the drain deadline: latency grows with "
                        "the backlog; percentiles cover the runs finished by then (a lower bound)"
                    )
                rows = await conn.fetch(
                    _TIMINGS, f"bench-{pipeline}", FIRST_STEP[pipeline], SOURCE, f"r{r}x{uid}-%"
                )
                phase.update(_latency_figures(pub, rows))
                completed = phase.get("completed_runs_per_second") or 0.0
                if phase["status"] == "ok" and completed < 0.9 * pub["achieved_per_second"]:
                    # Drained in time, but only because publishing stopped: the backlog grew.
                    saturated_at = r
                    phase["status"] = "saturated"
                    phase["error"] = (
                        f"completed {completed:.0f} runs/s while {r}/s were published: the "
                        "backlog grew during the phase"
                    )
                result["rates"][str(r)] = phase
        daemon.sample()
        result["status"] = "ok"
        result["memory"] = daemon.memory_report()
    except WorkloadError as exc:
        result["error"] = str(exc)
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(10):
                await producer.stop()
            await daemon.stop()
            await s.infra.delete_topic(topic)
    return result


async def _kafka_floor(s: Session, rates: Sequence[int], seconds: float) -> dict[str, Any]:
    """Publish -> received by a bare consumer (no group, no database): the broker's share."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = f"bench-w2floor-{_uid()}"
    await s.infra.create_topic(topic, s.partitions)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.infra.bootstrap,
        enable_auto_commit=False,
        # As the daemon fetches (kafka.fetch_max_wait_ms, default 10).
        fetch_max_wait_ms=int(_daemon_setting(s, "kafka", "fetch_max_wait_ms", 10)),
    )
    out: dict[str, Any] = {}
    try:
        await consumer.start()
        consumer.assign([TopicPartition(topic, p) for p in range(s.partitions)])
        await consumer.seek_to_end()
        for r in rates:
            received: dict[str, float] = {}
            expected = int(r * seconds)
            all_in = anyio.Event()

            async def consume(
                received: dict[str, float] = received, all_in: anyio.Event = all_in,
                expected: int = expected,
            ) -> None:  # fmt: skip
                while len(received) < expected:
                    batch = await consumer.getmany(timeout_ms=100)
                    now = time.time()
                    for recs in batch.values():
                        for rec in recs:
                            event_id = rec.value.split(b'"id":"', 1)[1].split(b'"', 1)[0]
                            received[event_id.decode()] = now
                all_in.set()

            cpu0 = s.infra.cpu()
            cores: dict[str, list[float]] = {}
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                tg.start_soon(_cores_by_second, s, None, cores)
                pub = await _publish_at_rate(s, topic, f"floor{r}", "bench.floor", r, seconds)
                with anyio.move_on_after(max(20.0, seconds)):
                    await all_in.wait()
                tg.cancel_scope.cancel()
            cpu1 = s.infra.cpu()
            broker_cpu = (
                cpu1["broker"] - cpu0["broker"] if "broker" in cpu0 and "broker" in cpu1 else None
            )
            sent = pub["sent"]
            lat = [received[k] - t for k, t in sent.items() if k in received]
            out[str(r)] = {
                "received": len(lat),
                **summarize(lat, scale=1000),
                # The broker's share of the machine at this rate, before any daemon runs.
                "broker_cpu_ms_per_event": None
                if broker_cpu is None
                else round(1000 * broker_cpu / max(1, len(sent)), 3),
                "broker_cores_by_second": cores.get("broker", []),
            }
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await consumer.stop()
        await s.infra.delete_topic(topic)
    return out


def _latency_figures(pub: Mapping[str, Any], rows: Sequence[asyncpg.Record]) -> dict[str, Any]:
    sent: Mapping[str, float] = pub["sent"]
    first, finished, kafka_first = [], [], []
    over_time: list[tuple[float, float]] = []
    stages: dict[str, list[float]] = {
        "publish_to_ingest": [], "ingest_to_claim": [], "claim_to_first_step": [],
        "first_step_to_finished": [],
    }  # fmt: skip
    for r in rows:
        t = sent.get(r["event_id"])
        if t is None or r["step_start"] is None:
            continue
        first.append(r["step_start"] - t)
        over_time.append((t, r["step_start"] - t))
        if r["kafka_ts"] is not None:
            kafka_first.append(r["step_start"] - r["kafka_ts"])
        stages["publish_to_ingest"].append(r["ingested"] - t)
        if r["claimed"] is not None:
            stages["ingest_to_claim"].append(r["claimed"] - r["ingested"])
            stages["claim_to_first_step"].append(r["step_start"] - r["claimed"])
        if r["finished"] is not None and r["status"] == "succeeded":
            finished.append(r["finished"] - t)
            stages["first_step_to_finished"].append(r["finished"] - r["step_start"])
    done = [r["finished"] for r in rows if r["finished"] is not None]
    span = (max(done) - min(sent.values())) if done and sent else None
    return {
        "published": pub["published"],
        "completed_runs_per_second": rate(len(done), span),
        "publish_seconds": pub["seconds"],
        "achieved_per_second": pub["achieved_per_second"],
        "max_behind_schedule_ms": pub["max_behind_schedule_ms"],
        "measured": len(first),
        "first_step_ms": summarize(first, scale=1000),
        "finished_ms": summarize(finished, scale=1000),
        "first_step_from_kafka_timestamp_ms": summarize(kafka_first, scale=1000),
        "stages_ms": {k: summarize(v, scale=1000) for k, v in stages.items()},
        # By the second of publishing: shows whether the tail is steady or bursts.
        "first_step_ms_per_second": per_second(over_time, scale=1000),
    }


# -- W3 ---------------------------------------------------------------------------------


async def w3_matching(s: Session, sizes: Sequence[int]) -> dict[str, Any]:
    """The pure matcher benchmark (``bench/matcher.py``, owned by its author), in a child."""
    if importlib.util.find_spec("bench.matcher") is None:
        return {"status": "n/a", "error": "bench/matcher.py is not present"}
    try:
        out = await run_worker("matcher", {"sizes": list(sizes)}, limit=s.timeout,
                               workdir=s.workdir)  # fmt: skip
    except (TimeoutError, RuntimeError) as exc:
        return {"status": "error", "error": str(exc)}
    return {"status": "ok", "figures": out["figures"]}


# -- W4 ---------------------------------------------------------------------------------


async def w4_memory(s: Session, events: int, window: float) -> dict[str, Any]:
    """Peak RSS of a daemon started on a backlog of ``events``, over ``window`` seconds."""
    uid = _uid()
    name = "w4"
    topic, dataset = f"bench-{name}-{uid}", f"bench.{name}"
    schema = f"b_{name}_{uid}".replace("-", "_")
    result: dict[str, Any] = {"status": "error", "events": events, "window_seconds": window}
    await s.infra.create_topic(topic, s.partitions)
    daemon: DaemonProcess | None = None
    try:
        result["publish"] = await publish_backlog(
            s.infra.bootstrap, topic, prefix=f"{name}{uid}", dataset=dataset, count=events,
            processes=max(s.publishers, 2), limit=s.timeout, workdir=s.workdir,
        )  # fmt: skip
        await s.infra.create_schema(schema)
        config = write_config(
            s.workdir, name, bootstrap=s.infra.bootstrap, group_timings=s.infra.group_timings,
            dsn=s.infra.dsn, topic=topic,
            group=f"g-{topic}", schema=schema, pipeline="chain3", dataset=dataset,
            overrides=s.overrides,
        )  # fmt: skip
        await s.infra.migrate(config)
        daemon = DaemonProcess(config, s.workdir / f"{name}-daemon.log", name="w4 daemon")
        t0 = time.time()
        await daemon.start()
        ingested: list[list[float]] = []
        async with s.infra.connect(schema) as conn:
            with anyio.move_on_after(window):
                tick = 0
                while True:
                    daemon.sample()
                    _check_alive(daemon)
                    if tick % 4 == 0:
                        n = await conn.fetchval(f"{BENCH_TAG} SELECT max(id) FROM events") or 0
                        ingested.append([round(time.time() - t0, 2), n])
                        if n >= events and await _finished_runs(conn) >= events:
                            break
                    tick += 1
                    await anyio.sleep(0.5)
            elapsed = time.time() - t0
            daemon.sample()
            await daemon.stop()
            done = await _finished_runs(conn)
            stored = await conn.fetchval(f"{BENCH_TAG} SELECT count(*) FROM events")
        result.update(
            status="ok",
            seconds=elapsed,
            events_ingested=stored,
            runs_finished=done,
            ingest_events_per_second=rate(stored, elapsed),
            runs_per_second=rate(done, elapsed),
            ingested_series=ingested,
            **daemon.memory_report(),
        )
    except WorkloadError as exc:
        result["error"] = str(exc)
    finally:
        with anyio.CancelScope(shield=True):
            if daemon is not None:
                await daemon.stop()
            await s.infra.delete_topic(topic)
            await s.infra.drop_schema(schema)
    return result
