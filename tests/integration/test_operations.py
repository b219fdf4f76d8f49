"""Operator controls and probes: cancel, retry, health endpoint, CLI probe, secrets hygiene."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from orchestrator import Pipeline, StepContext, new_arrival
from orchestrator.cli.dev import to_toml
from orchestrator.config import Settings
from orchestrator.dev._proc import free_port
from orchestrator.kafka import open_producer, publish_event
from orchestrator.store import Store
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
RULES = RuleSet.build([Rule(name="r", pipeline="p", match={"data": {"dataset": ["ops.data"]}})])


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


async def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: cli(config, *args))


def write_config(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "orchestrator.toml"
    path.write_text(to_toml(settings))
    return path


async def test_cancel_reaches_the_running_step_and_is_recorded(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    started = anyio.Event()
    seen: list[str] = []
    p = Pipeline("p")

    @p.step()
    async def wait_forever(ctx: StepContext) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise

    @p.step()
    async def after(ctx: StepContext, wait_forever: None) -> None:
        seen.append("after")

    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    config = write_config(settings, tmp_path)
    async with running_daemon(settings, {"p": p}, RULES, traced):
        async with open_producer(settings) as producer:
            await publish_event(producer, topic, new_arrival("ops.data"), traced.telemetry.tracer)
        with anyio.fail_after(20):
            await started.wait()
        (run,) = await fetch(pg_dsn, pg_schema.name, "SELECT id FROM runs")
        result = await run_cli(config, "runs", "cancel", str(run["id"]))
        assert result.returncode == 0, result.stderr
        assert "cancellation requested" in result.stdout

        async def cancelled() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return rows[0]["status"] == "cancelled"

        await wait_for(cancelled, within=10, what="the run to be cancelled")
    assert seen == ["cancelled"]
    (attempt,) = await fetch(pg_dsn, pg_schema.name, "SELECT status, error FROM step_attempts")
    assert attempt["status"] == "cancelled"
    again = await run_cli(config, "runs", "cancel", str(run["id"]))
    assert again.returncode == 1
    assert "already cancelled" in again.stderr


async def test_retry_resumes_a_failed_run_from_its_failed_step(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    calls: list[str] = []
    broken = {"yes": True}
    p = Pipeline("p")

    @p.step()
    async def load(ctx: StepContext) -> list[int]:
        calls.append("load")
        return [1, 2, 3]

    @p.step()
    async def transform(ctx: StepContext, load: list[int]) -> int:
        calls.append("transform")
        if broken["yes"]:
            raise RuntimeError("upstream table missing")
        return sum(load)

    @p.step()
    async def publish(ctx: StepContext, transform: int) -> int:
        calls.append("publish")
        return transform * 10

    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    config = write_config(settings, tmp_path)
    async with running_daemon(settings, {"p": p}, RULES, traced):
        async with open_producer(settings) as producer:
            await publish_event(producer, topic, new_arrival("ops.data"), traced.telemetry.tracer)

        async def status() -> str:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return rows[0]["status"] if rows else ""

        await wait_for(lambda: _is(status, "failed"), what="the run to fail")
        (run,) = await fetch(pg_dsn, pg_schema.name, "SELECT id FROM runs")
        shown = await run_cli(config, "runs", "show", str(run["id"]))
        assert shown.returncode == 0
        assert "upstream table missing" in shown.stdout
        broken["yes"] = False
        result = await run_cli(config, "runs", "retry", str(run["id"]))
        assert result.returncode == 0, result.stderr
        await wait_for(lambda: _is(status, "succeeded"), what="the retried run to succeed")
    assert calls == ["load", "transform", "transform", "publish"]
    shown = await run_cli(config, "runs", "show", str(run["id"]), "--json")
    doc = msgspec.json.decode(shown.stdout)
    assert doc["run"]["status"] == "succeeded"
    assert [(s["step"], s["attempt"], s["status"]) for s in doc["steps"]] == [
        ("load", 1, "succeeded"),
        ("transform", 1, "failed"),
        ("transform", 2, "succeeded"),
        ("publish", 1, "succeeded"),
    ]
    assert doc["steps"][-1]["output"] == 60


async def _is(check: object, want: str) -> bool:
    return await check() == want  # type: ignore[operator, no-any-return]


async def test_health_reports_ready_and_names_the_unreachable_dependency(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    port = free_port()
    traced = Traced()
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name, health={"port": port})
    config = write_config(settings, tmp_path)
    async with (
        running_daemon(settings, {}, RuleSet.build([]), traced),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        live = await client.get("/livez")
        assert live.status_code == 200

        async def is_ready() -> httpx.Response | None:
            r = await client.get("/readyz")
            return r if r.status_code == 200 else None

        ready = await wait_for(is_ready, within=15, what="readiness")
        assert ready.json()["components"] == {"kafka": "ok", "postgres": "ok"}
        probe = await run_cli(config, "health")
        assert probe.returncode == 0, probe.stderr

    dead_kafka = f"127.0.0.1:{free_port()}"
    bad = make_settings(dead_kafka, topic, pg_dsn, pg_schema.name, health={"port": port})
    async with (
        running_daemon(bad, {}, RuleSet.build([]), traced),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "kafka" in ready.json()["components"]
        assert ready.json()["components"]["kafka"] != "ok"
        assert (await client.get("/livez")).status_code == 200
        probe = await run_cli(write_config(bad, tmp_path), "health")
        assert probe.returncode == 1


async def test_no_secret_reaches_logs_spans_or_cli_output(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    planted = "Pl4nted-S3cret-9f2c"
    # The embedded Postgres trusts local connections, so any password is accepted.
    dsn_with_password = pg_dsn.replace("postgres@", f"postgres:{planted}@")
    assert planted in dsn_with_password
    secret_file = tmp_path / "dsn"
    secret_file.write_text(dsn_with_password)
    p = Pipeline("p")

    @p.step()
    async def boom(ctx: StepContext) -> None:
        raise RuntimeError("step failed on purpose")

    caplog.set_level(logging.DEBUG)
    traced = Traced()
    settings = make_settings(
        kafka_bootstrap,
        topic,
        "",
        pg_schema.name,
        postgres={"dsn_file": str(secret_file)},
    )
    config = write_config(settings, tmp_path)
    async with running_daemon(settings, {"p": p}, RULES, traced):
        async with open_producer(settings) as producer:
            await publish_event(producer, topic, new_arrival("ops.data"), traced.telemetry.tracer)

        async def failed() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return bool(rows) and rows[0]["status"] == "failed"

        await wait_for(failed, what="the run to fail")
    outputs = [
        await run_cli(config, "runs"),
        await run_cli(config, "runs", "show", "1"),
        await run_cli(config, "runs", "show", "1", "--json"),
        await run_cli(config, "dead-letters"),
    ]
    # A refused connection must not echo the DSN's password either.
    unreachable = dsn_with_password.replace(
        pg_dsn.rsplit(":", 1)[0].rsplit("@", 1)[1], "127.0.0.1"
    ).rsplit(":", 1)[0]
    unreachable += f":{free_port()}/orchestrator"
    secret_file.write_text(unreachable)
    refused = await run_cli(config, "runs")
    assert refused.returncode == 2
    assert "cannot connect to Postgres" in refused.stderr
    texts = [caplog.text, refused.stderr, refused.stdout]
    texts += [o.stdout + o.stderr for o in outputs]
    for span in traced.spans.get_finished_spans():
        texts.append(span.to_json())
    assert all(o.returncode == 0 for o in outputs)
    leaks = [t for t in texts if planted in t]
    assert not leaks, leaks[0][:500]


async def test_store_migrations_are_idempotent(pg_dsn: str, pg_schema: PgSchema) -> None:
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=2) as store:
        first = await store.migrate()
        second = await store.migrate()
    assert first[0] == "0001_init"
    assert second == []


async def test_hot_path_tables_carry_only_the_indexes_their_queries_use(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    # Every run writes its attempts and changes its status: each index there costs an entry
    # per write. Attempts are read by run_id only (the primary key's prefix).
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=2) as store:
        await store.migrate()
        async with store.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = $1"
                " AND tablename IN ('runs', 'step_attempts')",
                pg_schema.name,
            )
    indexes = {(r["tablename"], r["indexname"]) for r in rows}
    assert {i for t, i in indexes if t == "step_attempts"} == {"step_attempts_pkey"}
    assert ("runs", "runs_status_idx") not in indexes
    assert ("runs", "runs_pending_idx") in indexes  # claims still have theirs


async def test_deleting_runs_deletes_their_attempts_without_a_check_per_attempt(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    # Attempts carry no foreign key (its check cost a lookup and a lock per attempt written);
    # deleting runs, from any search_path, still deletes their attempts and only theirs,
    # and truncating runs empties the attempts.
    schema = pg_schema.name
    async with Store.open(pg_dsn, schema=schema, min_size=1, max_size=2) as store:
        await store.migrate()
        async with store.pool.acquire() as conn:
            ids = [
                await conn.fetchval(
                    "INSERT INTO runs (rule, trigger_key, pipeline, event_ids)"
                    " VALUES ('r', $1, 'p', '{}') RETURNING id",
                    key,
                )
                for key in ("k1", "k2", "k3")
            ]
            await conn.execute(
                "INSERT INTO step_attempts (run_id, step, attempt, status, started_at)"
                " SELECT id, s, 1, 'succeeded', now()"
                " FROM unnest($1::bigint[]) AS id, unnest(ARRAY['a', 'b']) AS s",
                ids,
            )
            row_checks = await conn.fetchval(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass"
                " AND contype = 'f'",
                f'"{schema}".step_attempts',
            )
            await conn.execute("SET search_path TO public")
            await conn.execute(f'DELETE FROM "{schema}".runs WHERE id = ANY($1)', ids[:2])
            left = await conn.fetch(
                f'SELECT run_id, step FROM "{schema}".step_attempts ORDER BY run_id, step'
            )
            await conn.execute(f'TRUNCATE "{schema}".runs')
            after_truncate = await conn.fetchval(f'SELECT count(*) FROM "{schema}".step_attempts')
            await conn.execute(f'SET search_path TO "{schema}"')
    assert row_checks == 0
    assert [(r["run_id"], r["step"]) for r in left] == [(ids[2], "a"), (ids[2], "b")]
    assert after_truncate == 0


async def test_dead_letter_redrive_after_raising_the_size_limit(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaProducer

    from orchestrator.events import encode_structured

    p = Pipeline("p")

    @p.step()
    async def size(ctx: StepContext) -> int:
        return len(ctx.event.data.attributes["blob"])

    big = new_arrival("ops.data", attributes={"blob": "x" * 3000})
    traced = Traced()
    small = make_settings(
        kafka_bootstrap, topic, pg_dsn, pg_schema.name, kafka={"max_record_bytes": 2048}
    )
    async with running_daemon(small, {"p": p}, RULES, traced):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, encode_structured(big), key=b"ops.data")
        finally:
            await producer.stop()

        async def dead_lettered() -> bool:
            return bool(await fetch(pg_dsn, pg_schema.name, "SELECT id FROM dead_letters"))

        await wait_for(dead_lettered, what="the oversize record to be dead-lettered")

    config = write_config(small, tmp_path)
    listed = await run_cli(config, "dead-letters")
    assert "exceeds the limit of 2048 bytes" in listed.stdout
    redriven = await run_cli(config, "dead-letters", "redrive", "--all")
    assert redriven.returncode == 0, redriven.stderr
    assert "redriven" in redriven.stdout
    again = await run_cli(config, "dead-letters", "redrive", "--all")
    assert again.stdout == ""  # nothing left to redrive

    roomy = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(roomy, {"p": p}, RULES, traced):

        async def done() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT status FROM runs")
            return bool(rows) and rows[0]["status"] == "succeeded"

        await wait_for(done, what="the redriven event's run")
    (out,) = await fetch(pg_dsn, pg_schema.name, "SELECT output FROM step_attempts")
    assert msgspec.json.decode(out["output"]) == 3000
    (event,) = await fetch(pg_dsn, pg_schema.name, "SELECT event_id FROM events")
    assert event["event_id"] == big.id
