"""The group-commit writer against a real Postgres: steps keep running while a write is in
flight (its rows were taken), and wait only once the next write is full too."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from orchestrator.events import Arrival, CloudEvent, encode_structured
from orchestrator.health import Health
from orchestrator.pipeline.group_commit import OutcomeWriter
from orchestrator.store import AttemptWrite, IncomingEvent, RunRequest, Store
from tests.conftest import PgSchema

pytestmark = pytest.mark.anyio


def attempts(first: int, n: int) -> list[AttemptWrite]:
    now = datetime.now(UTC)
    return [
        AttemptWrite(run_id=i, step="s", attempt=1, status="running", started_at=now)
        for i in range(first, first + n)
    ]


async def test_room_frees_when_a_write_takes_the_rows_not_when_it_finishes(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=2) as store:
        await store.migrate()
        writer = OutcomeWriter(store, "owner-a", Health(), max_pending=4)
        blocker = await asyncpg.connect(pg_dsn)
        try:
            # Hold the tables the write needs: the first write stays in flight.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                f"LOCK TABLE {pg_schema.name}.runs, {pg_schema.name}.step_attempts "
                "IN ACCESS EXCLUSIVE MODE"
            )
            for a in attempts(1, 5):
                writer.add_attempt(a)
            async with anyio.create_task_group() as tg:
                await tg.start(writer.run)
                # The write took the 5 rows and waits for the lock: room at once.
                with anyio.fail_after(5):
                    await writer.room()
                assert writer.flushes == 0
                # The next write is full too: steps wait.
                for a in attempts(10, 5):
                    writer.add_attempt(a)
                with anyio.move_on_after(0.3) as waited:
                    await writer.room()
                assert waited.cancelled_caught
                assert writer.flushes == 0
                # The first write finishes; the second takes the queued rows.
                await tx.rollback()
                with anyio.fail_after(5):
                    await writer.room()
                    # A release rides on the write after the one that took the rows.
                    assert await writer.release([99]) == set()
                assert writer.flushes == 3
                assert writer.idle
                tg.cancel_scope.cancel()
        finally:
            await blocker.close()


async def test_times_are_stored_to_the_microsecond(pg_dsn: str, pg_schema: PgSchema) -> None:
    """The hot statements bind times as epoch seconds; nothing is rounded on the way."""
    published = datetime(2026, 11, 25, 10, 0, 0, 123_000, tzinfo=UTC)
    event_time = datetime(9000, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)  # any date
    started = datetime(2026, 11, 25, 10, 0, 0, 123_457, tzinfo=UTC)
    finished = datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    event = CloudEvent(
        specversion="1.0", id="e1", source="s", type="t", time=event_time,
        data=Arrival(dataset="d"),
    )  # fmt: skip
    incoming = IncomingEvent(
        event=event, envelope=encode_structured(event), topic="t", partition=0, offset=0,
        published_at=published,
    )  # fmt: skip
    request = RunRequest(rule="r", pipeline="p", trigger_key="k")
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=1) as store:
        await store.migrate()
        _, created = await store.ingest_simple([incoming], [(incoming, request, True)], "me", 60)
        [(run_id, *_)] = created
        written = [
            AttemptWrite(
                run_id=run_id, step="a", attempt=1, status="succeeded", output=b"1",
                started_at=started, finished_at=finished,
            ),
            AttemptWrite(run_id=run_id, step="b", attempt=1, status="running", started_at=finished),
        ]  # fmt: skip
        await store.record_outcomes("me", written, [])
        [a, b] = await store.step_attempts(run_id)
        async with store.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT published_at, event_time FROM events")
            run = await conn.fetchrow("SELECT first_event_at FROM runs")
    assert (a.started_at, a.finished_at) == (started, finished)
    assert (b.started_at, b.finished_at) == (finished, None)
    assert row is not None
    assert run is not None
    assert (row["published_at"], row["event_time"]) == (published, event_time)
    assert run["first_event_at"] == published
