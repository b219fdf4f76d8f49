"""The group-commit writer against a real Postgres: steps keep running while a write is in
flight (its rows were taken), and wait only once the next write is full too."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from orchestrator.health import Health
from orchestrator.pipeline.group_commit import OutcomeWriter
from orchestrator.store import AttemptWrite, Store
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
