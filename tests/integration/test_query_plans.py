"""The daemon's statements reach rows by key, whatever the tables' size when they were planned.

asyncpg keeps statements prepared and Postgres reuses their plans: a plan made while a table
is nearly empty scans it whole and stays in use as the table grows (until an ANALYZE).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from orchestrator import Pipeline, StepContext, new_arrival
from orchestrator.kafka import open_producer, publish_event
from orchestrator.store import KEY_LOOKUP_PLANNER, AttemptWrite, RunFinish, Store
from orchestrator.triggers import Rule, RuleSet
from tests.conftest import PgSchema
from tests.support.helpers import Traced, fetch, make_settings, running_daemon, wait_for

pytestmark = pytest.mark.anyio


async def _running_runs(conn: asyncpg.Connection, n: int, first_key: int) -> list[int]:
    rows = await conn.fetch(
        """INSERT INTO runs (rule, trigger_key, pipeline, event_ids, status, lease_owner,
                             lease_expires_at, claims, started_at)
           SELECT 'r', 'k' || g, 'p', '{}', 'running', 'me', now() + interval '1 hour', 1, now()
           FROM generate_series($1::int, $1::int + $2::int - 1) AS g
           RETURNING id""",
        first_key,
        n,
    )
    return [r["id"] for r in rows]


async def _record(store: Store, run_id: int) -> None:
    now = datetime.now(UTC)
    attempt = AttemptWrite(
        run_id=run_id, step="s", attempt=1, status="succeeded", started_at=now, finished_at=now
    )
    lost, finished = await store.record_outcomes(
        "me",
        [attempt],
        [RunFinish(run_id=run_id, status="succeeded")],
        notify_finished=False,
    )
    assert (lost, finished) == (set(), {run_id})


async def _plan_once_grown(
    pg_dsn: str,
    schema: str,
    use: Callable[[Store, list[int]], Awaitable[None]],
    statement_like: str,
    arguments: str,
) -> str:
    """Run a statement through ``use`` while the runs table is nearly empty, until Postgres
    may keep a generic plan; grow the table to 20,000 running runs (not analyzed); return
    the plan the prepared statement then has for ``arguments``."""
    async with Store.open(
        pg_dsn, schema=schema, min_size=1, max_size=1, planner=KEY_LOOKUP_PLANNER
    ) as store:
        await store.migrate()
        async with store.pool.acquire() as conn:
            ids = await _running_runs(conn, 8, 0)
        await use(store, ids)
        async with store.pool.acquire() as conn:
            await _running_runs(conn, 20_000, 100)  # grown, not analyzed
            (name,) = [
                r["name"]
                for r in await conn.fetch(
                    "SELECT name FROM pg_prepared_statements WHERE statement LIKE $1"
                    " AND statement NOT LIKE '%pg_prepared_statements%'",
                    f"%{statement_like}%",
                )
            ]
            rows = await conn.fetch(f"EXPLAIN EXECUTE {name}({arguments})")
    return "\n".join(r[0] for r in rows)


async def test_a_plan_made_on_an_empty_table_looks_runs_up_by_key_once_it_has_grown(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    async def record_each(store: Store, ids: list[int]) -> None:
        for run_id in ids:  # past the 5 executions after which Postgres may keep a plan
            await _record(store, run_id)

    now = datetime.now(UTC).timestamp()  # rows travel as JSON, times as epoch seconds
    attempts = f'[[1, "s", 1, "succeeded", null, null, {now}, {now}, false]]'
    finishes = """'[[1, "succeeded", null, null]]'"""
    plan = await _plan_once_grown(
        pg_dsn, pg_schema.name, record_each, "INSERT INTO step_attempts",
        f"'{attempts}', 'me', {finishes}",
    )  # fmt: skip
    assert "Seq Scan on runs" not in plan, plan
    assert "runs_pkey" in plan, plan
    assert "runs_running_idx" not in plan, plan  # 20,000 running runs, 1 to finish
    # The attempts' runs and the finished runs alike: looked up by their ids, not by a scan
    # of runs_pkey end to end (what a join on the documents' rows gets from this plan).
    assert plan.count("Index Cond: (id = ANY (") == 2, plan


async def test_heartbeats_look_leases_up_by_id_not_through_every_running_run(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    async def heartbeats(store: Store, ids: list[int]) -> None:
        for _ in range(6):  # past the 5 executions after which Postgres may keep a plan
            assert set(await store.heartbeat("me", ids[:2], 30)) == set(ids[:2])

    plan = await _plan_once_grown(
        pg_dsn, pg_schema.name, heartbeats, "RETURNING id, cancel_requested",
        "'me', '{1,2}', 30",
    )  # fmt: skip
    assert "runs_running_idx" not in plan, plan
    assert "runs_pkey" in plan, plan


async def test_a_lease_is_held_only_by_a_running_run(pg_dsn: str, pg_schema: PgSchema) -> None:
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=1) as store:
        await store.migrate()
        async with store.pool.acquire() as conn:
            [run_id] = await _running_runs(conn, 1, 0)
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE runs SET status = 'succeeded' WHERE id = $1", run_id)


async def test_the_daemon_never_reads_a_hot_table_end_to_end(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema
) -> None:
    p = Pipeline("p")

    @p.step()
    async def a(ctx: StepContext) -> int:
        return 1

    @p.step()
    async def b(ctx: StepContext, a: int) -> int:
        return a + 1

    rules = RuleSet.build([Rule(name="r", pipeline="p", match={"data": {"dataset": ["plans"]}})])
    settings = make_settings(kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=1) as store:
        await store.migrate()  # index builds read the tables: counted before the daemon starts
        async with store.pool.acquire() as conn:
            migrator = {await conn.fetchval("SELECT pg_backend_pid()")}
    await _gone(pg_dsn, pg_schema.name, migrator)
    before = await _seq_scans(pg_dsn, pg_schema.name)
    traced = Traced()
    async with running_daemon(settings, {"p": p}, rules, traced):
        async with open_producer(settings) as producer:
            for i in range(40):
                event = new_arrival("plans", partition=str(i))
                await publish_event(producer, topic, event, traced.telemetry.tracer)

        async def done() -> bool:
            rows = await fetch(
                pg_dsn, pg_schema.name, "SELECT count(*) AS n FROM step_attempts WHERE step = 'b'"
            )
            return rows[0]["n"] == 40

        await wait_for(done, within=30, what="40 runs of two steps")
        rows = await fetch(
            pg_dsn,
            pg_schema.name,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'orchestrator'",
        )
        daemon = {r["pid"] for r in rows}
        assert daemon, "the daemon's pool has no connection open"
    await _gone(pg_dsn, pg_schema.name, daemon)
    assert await _seq_scans(pg_dsn, pg_schema.name) == before


async def _gone(dsn: str, schema: str, pids: set[int]) -> None:
    """Wait for these backends to exit: a backend flushes its table statistics then."""

    async def exited() -> bool:
        query = "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = ANY($1)"
        rows = await fetch(dsn, schema, query, list(pids))
        return rows[0]["n"] == 0

    await wait_for(exited, within=20, what=f"backends {sorted(pids)} to exit")


async def _seq_scans(dsn: str, schema: str) -> dict[str, int]:
    rows = await fetch(
        dsn,
        schema,
        "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE schemaname = $1"
        " AND relname IN ('events', 'runs')",
        schema,
    )
    return {r["relname"]: r["seq_scan"] for r in rows}
