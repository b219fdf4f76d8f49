"""Correlated rules, absence and flow control, executed by the daemon against Kafka and Postgres."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from orchestrator import Pipeline, StepContext, new_arrival
from orchestrator.cli.dev import to_toml
from orchestrator.events import encode_structured
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def recorder(name: str, seen: list[dict[str, Any]], *, hold: anyio.Event | None = None) -> Pipeline:
    p = Pipeline(name)

    @p.step()
    async def record(ctx: StepContext) -> list[str]:
        seen.append(
            {
                "run": ctx.run_id,
                "params": dict(ctx.params),
                "events": [e.data.dataset + "/" + (e.data.partition or "") for e in ctx.events],
            }
        )
        if hold is not None:
            await hold.wait()
        return [e.id for e in ctx.events]

    return p


async def send(bootstrap: str, topic: str, *events: Any) -> None:
    """Publish with a plain Kafka client, as any producer would."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for ev in events:
            await producer.send_and_wait(topic, encode_structured(ev), key=ev.key.encode())
    finally:
        await producer.stop()


async def runs(dsn: str, schema: str) -> list[Any]:
    return await fetch(dsn, schema, "SELECT * FROM runs ORDER BY id")


ROLLUP = Rule(
    name="rollup",
    pipeline="rollup",
    match={},
    on={
        "orders": {"data": {"dataset": ["sales.orders"]}},
        "customers": {"data": {"dataset": ["sales.customers"]}},
    },
    all_of=["orders", "customers"],
    within="2h",
    params={"day": "{data.partition}"},
)


async def test_all_of_fires_once_per_partition(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[dict[str, Any]] = []
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    rules = RuleSet.build([ROLLUP])
    async with running_daemon(settings, {"rollup": recorder("rollup", seen)}, rules, Traced()):
        orders1 = new_arrival("sales.orders", partition="2026-11-24")
        await send(
            kafka_bootstrap, topic, orders1, new_arrival("sales.orders", partition="2026-11-25")
        )
        customers1 = new_arrival("sales.customers", partition="2026-11-24")
        await send(kafka_bootstrap, topic, customers1)

        async def one_done(events: int) -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            stored = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
            return stored[0]["n"] == events and [r["status"] for r in rows] == ["succeeded"]

        await wait_for(lambda: one_done(3), what="the rollup for 2026-11-24")
        # More data for a day that already fired, and a redelivered event: no second run.
        await send(
            kafka_bootstrap, topic, new_arrival("sales.orders", partition="2026-11-24"), customers1
        )
        await wait_for(lambda: one_done(4), what="the late event to be stored")
    (run,) = await runs(pg_dsn, pg_schema.name)
    assert run["trigger_key"].startswith("corr:2026-11-24@")
    assert msgspec.json.decode(run["params"]) == {"day": "2026-11-24"}
    (only,) = seen
    assert only["run"] == run["id"]
    assert only["params"] == {"day": "2026-11-24"}
    # Both events, in the order the daemon consumed them (Kafka orders per key only).
    assert sorted(only["events"]) == ["sales.customers/2026-11-24", "sales.orders/2026-11-24"]
    state = await fetch(pg_dsn, pg_schema.name, "SELECT key FROM correlations ORDER BY key")
    assert [s["key"] for s in state] == ["2026-11-24", "2026-11-25"]


async def test_absence_fires_when_a_dataset_is_withheld(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[dict[str, Any]] = []
    late = msgspec.convert(
        {
            "name": "orders-late",
            "pipeline": "page",
            "on": {
                "orders": {"data": {"dataset": ["sales.orders"]}},
                "customers": {"data": {"dataset": ["sales.customers"]}},
            },
            "expect": {"conditions": ["orders"], "after": "2s"},
            "params": {"day": "{data.partition}", "from": "{source}"},
        },
        Rule,
    )
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(
        settings, {"page": recorder("page", seen)}, RuleSet.build([late]), Traced()
    ):
        await send(
            kafka_bootstrap,
            topic,
            new_arrival("sales.customers", partition="withheld"),
            new_arrival("sales.customers", partition="complete"),
            new_arrival("sales.orders", partition="complete"),
        )

        async def paged() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return [r["status"] for r in rows] == ["succeeded"]

        await wait_for(paged, within=30, what="the absence run")
    (run,) = await runs(pg_dsn, pg_schema.name)
    params = msgspec.json.decode(run["params"])
    assert params["missing"] == ["orders"]
    assert params["reason"] == "absence"
    assert params["day"] == "withheld"  # templated from the event that opened the watch
    assert params["from"] == "orchestrator://publish"
    assert run["trigger_key"].startswith("corr:withheld@")
    assert seen[0]["events"] == ["sales.customers/withheld"]


async def test_debounce_coalesces_every_event_into_one_run(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[dict[str, Any]] = []
    rule = Rule(
        name="coalesce", pipeline="p", match={"data": {"dataset": ["clicks"]}}, debounce="1s"
    )
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(
        settings, {"p": recorder("p", seen)}, RuleSet.build([rule]), Traced()
    ):
        burst = [new_arrival("clicks", partition="h1", rows=i) for i in range(5)]
        await send(kafka_bootstrap, topic, *burst)
        await send(kafka_bootstrap, topic, new_arrival("clicks", partition="h2"))

        async def done() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(done, within=30, what="two debounced runs")
    by_key = {s["events"][0]: s["events"] for s in seen}
    assert by_key["clicks/h1"] == ["clicks/h1"] * 5
    assert by_key["clicks/h2"] == ["clicks/h2"]


async def test_on_overlap_skip_and_concurrency_limit(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[dict[str, Any]] = []
    hold = anyio.Event()
    skip = Rule(name="skip", pipeline="slow", match={"data": {"dataset": ["s"]}}, on_overlap="skip")
    serial = Rule(name="serial", pipeline="slow", match={"data": {"dataset": ["c"]}}, concurrency=1)
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    pipelines = {"slow": recorder("slow", seen, hold=hold)}
    async with running_daemon(settings, pipelines, RuleSet.build([skip, serial]), Traced()):
        await send(kafka_bootstrap, topic, new_arrival("s", partition="k"))

        async def first_running() -> bool:
            return len(seen) == 1

        await wait_for(first_running, what="the first run to start")
        await send(
            kafka_bootstrap,
            topic,
            new_arrival("s", partition="k"),
            new_arrival("c", partition="k"),
            new_arrival("c", partition="k"),
        )

        async def queued() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return len(rows) == 3 and len(seen) == 2

        await wait_for(queued, what="one serial run running, one waiting")
        statuses = sorted((r["rule"], r["status"]) for r in await runs(pg_dsn, pg_schema.name))
        assert statuses == [("serial", "pending"), ("serial", "running"), ("skip", "running")]
        hold.set()

        async def done() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return len(rows) == 3 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(done, what="all runs to finish")
    events = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
    assert events[0]["n"] == 4  # the skipped event is stored; it just started nothing


async def test_replay_dry_run_then_create(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {}, RuleSet.build([]), Traced()):
        await send(
            kafka_bootstrap,
            topic,
            new_arrival("sales.orders", partition="d1"),
            new_arrival("sales.customers", partition="d1"),
            new_arrival("sales.orders", partition="d2"),
        )

        async def stored() -> bool:
            rows = await fetch(pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM events")
            return rows[0]["n"] == 3

        await wait_for(stored, what="three stored events")
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "orders"\npipeline = "p"\n'
        '[rule.match]\ndata.dataset = ["sales.orders"]\n'
        '\n[[rule]]\nname = "rollup"\npipeline = "p"\nall_of = ["o", "c"]\n'
        '[rule.on.o]\ndata.dataset = ["sales.orders"]\n'
        '[rule.on.c]\ndata.dataset = ["sales.customers"]\n'
    )
    config = tmp_path / "orchestrator.toml"
    config.write_text(to_toml(settings))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", "--config", str(config), "replay", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )

    dry = await anyio.to_thread.run_sync(
        lambda: cli("--from", "2000-01-01T00:00Z", "--rules", str(rules), "--dry-run")
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would create") == 3 + 1  # 2 orders + 1 rollup, and the summary
    assert "3 runs would create" in dry.stdout or "3 events replayed: 3 runs" in dry.stdout
    assert await runs(pg_dsn, pg_schema.name) == []
    real = await anyio.to_thread.run_sync(
        lambda: cli("--from", "2000-01-01T00:00Z", "--rules", str(rules))
    )
    assert real.returncode == 0, real.stderr
    created = await runs(pg_dsn, pg_schema.name)
    assert sorted(r["rule"] for r in created) == ["orders", "orders", "rollup"]
    again = await anyio.to_thread.run_sync(
        lambda: cli("--from", "2000-01-01T00:00Z", "--rules", str(rules))
    )
    assert "0 runs created, 3 already existed" in again.stdout
    assert len(await runs(pg_dsn, pg_schema.name)) == 3


async def test_pipeline_max_concurrent_runs_caps_running_runs(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    hold = anyio.Event()
    started: list[int] = []
    p = Pipeline("capped", max_concurrent_runs=1)

    @p.step()
    async def work(ctx: StepContext) -> None:
        started.append(ctx.run_id)
        await hold.wait()

    rules = RuleSet.build([Rule(name="r", pipeline="capped", match={"data": {"dataset": ["x"]}})])
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(settings, {"capped": p}, rules, Traced()):
        await send(kafka_bootstrap, topic, *[new_arrival("x", partition=str(i)) for i in range(3)])

        async def one_running_two_waiting() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return sorted(r["status"] for r in rows) == ["pending", "pending", "running"]

        await wait_for(one_running_two_waiting, what="one run running, two held back")
        assert len(started) == 1
        hold.set()

        async def done() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return len(rows) == 3 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(done, what="all three runs, one after another")
    assert len(started) == 3


async def test_batch_starts_a_run_when_full_or_when_the_wait_ends(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    seen: list[dict[str, Any]] = []
    rule = msgspec.convert(
        {
            "name": "batched",
            "pipeline": "p",
            "match": {"data": {"dataset": ["rows"]}},
            "batch": {"max_events": 3, "max_wait": "2s"},
        },
        Rule,
    )
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with running_daemon(
        settings, {"p": recorder("p", seen)}, RuleSet.build([rule]), Traced()
    ):
        # Key "full": 3 events fill the batch; key "part": 1 event waits out max_wait.
        await send(
            kafka_bootstrap,
            topic,
            *[new_arrival("rows", partition="full", rows=i) for i in range(3)],
            new_arrival("rows", partition="part"),
        )

        async def done() -> bool:
            rows = await runs(pg_dsn, pg_schema.name)
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        await wait_for(done, within=30, what="a full batch and a timed-out one")
    sizes = sorted(len(s["events"]) for s in seen)
    assert sizes == [1, 3]
    full = next(s for s in seen if len(s["events"]) == 3)
    assert full["events"] == ["rows/full"] * 3
