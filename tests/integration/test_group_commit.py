"""The group-commit writer against a real Postgres: steps keep running while a write is in
flight (its rows were taken), and wait only once the next write is full too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import anyio
import asyncpg
import msgspec
import pytest

from orchestrator.events import Arrival, CloudEvent, encode_structured
from orchestrator.health import Health
from orchestrator.pipeline.group_commit import OutcomeWriter
from orchestrator.store import AttemptWrite, IncomingEvent, RunFinish, RunRequest, Store
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


async def test_rows_keep_every_value_on_the_way_through_json(
    pg_dsn: str, pg_schema: PgSchema
) -> None:
    """The hot statements send their rows as one JSON document: dates at the ends of the
    range, offsets, naive times (UTC), quotes, escapes and non-ASCII text, JSON null as an
    output, and no output at all all arrive as they were."""
    text = 'q"uo\\te \u2713 \U0001f600\nline'
    times = [
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 1, 1, 0, 0, 0, 5),  # naive: taken as UTC
    ]
    events = [
        CloudEvent(
            specversion="1.0", id=f"e{i}", source=text, type="t", time=at, subject=text,
            data=Arrival(dataset=text, partition=None if i else text, attributes={"k": text}),
        )
        for i, at in enumerate(times)
    ]  # fmt: skip
    incoming = [
        IncomingEvent(
            event=e, envelope=encode_structured(e), topic="t", partition=2, offset=2**40 + i,
            published_at=None, traceparent=text, contract_error=text,
        )
        for i, e in enumerate(events)
    ]  # fmt: skip
    params = {"n": None, "list": [1, 2.5, text], "big": 2**62}
    requests = [
        (e, RunRequest(rule=text, pipeline="p", trigger_key=e.event.id, priority=-3,
                       params=params), True)
        for e in incoming
    ]  # fmt: skip
    started = datetime(2026, 11, 25, 10, 0, 0, 1, tzinfo=UTC)
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=1) as store:
        await store.migrate()
        keys, created = await store.ingest_simple(incoming, requests, "me", 60)
        assert sorted(keys) == [(text, f"e{i}") for i in range(4)]
        run_id = created[0][0]
        written = [
            AttemptWrite(run_id=run_id, step=text, attempt=1, status="failed", error=text,
                         started_at=started, finished_at=started),
            AttemptWrite(run_id=run_id, step=text, attempt=2, status="succeeded",
                         output=b"null", started_at=started, finished_at=started),
            AttemptWrite(run_id=run_id, step="s", attempt=1, status="succeeded",
                         output=b'{"a":[1,"\\u00e9",null]}', started_at=started, skipped=True),
        ]  # fmt: skip
        lost, _ = await store.record_outcomes("me", written, [])
        assert lost == set()
        async with store.pool.acquire() as conn:
            stored = await conn.fetch(
                """SELECT source, event_id, subject, event_time, dataset, partition_key,
                          envelope, kafka_partition, kafka_offset, published_at, traceparent,
                          contract_error
                   FROM events ORDER BY kafka_offset"""
            )
            runs = await conn.fetch("SELECT rule, priority, params FROM runs ORDER BY id")
            rows = await conn.fetch(
                """SELECT step, attempt, status, output IS NULL AS no_output, output::text,
                          error, started_at, finished_at, skipped
                   FROM step_attempts ORDER BY step, attempt"""
            )
    assert [r["event_time"] for r in stored] == [
        times[0],
        times[1],
        times[2],
        times[3].replace(tzinfo=UTC),
    ]
    assert [msgspec.json.decode(r["envelope"]) for r in stored] == [
        msgspec.json.decode(e.envelope) for e in incoming
    ]
    assert all(
        (r["source"], r["subject"], r["dataset"], r["traceparent"], r["contract_error"])
        == (text,) * 5
        for r in stored
    )
    assert [r["partition_key"] for r in stored] == [text, None, None, None]
    assert [(r["kafka_partition"], r["kafka_offset"]) for r in stored] == [
        (2, 2**40 + i) for i in range(4)
    ]
    assert {r["published_at"] for r in stored} == {None}
    assert {(r["rule"], r["priority"]) for r in runs} == {(text, -3)}
    assert [msgspec.json.decode(r["params"]) for r in runs] == [params] * 4
    assert sorted(tuple(r) for r in rows) == sorted(
        [
            ("s", 1, "succeeded", False, '{"a": [1, "é", null]}', None, started, None, True),
            (text, 1, "failed", True, None, text, started, started, False),
            (text, 2, "succeeded", False, "null", None, started, started, False),
        ]
    )


async def test_rows_postgres_rejects_hold_up_no_other_run(pg_dsn: str, pg_schema: PgSchema) -> None:
    """A write Postgres refuses is written again run by run: the other runs are recorded,
    and the run whose rows were refused is recorded failed with the reason."""
    events = [
        IncomingEvent(
            event=e, envelope=encode_structured(e), topic="t", partition=0, offset=i,
            published_at=None,
        )
        for i, e in enumerate(
            CloudEvent(specversion="1.0", id=f"e{i}", source="s", type="t",
                       data=Arrival(dataset="d"))
            for i in range(3)
        )
    ]  # fmt: skip
    requests = [
        (e, RunRequest(rule="r", pipeline="p", trigger_key=e.event.id), True) for e in events
    ]
    now = datetime.now(UTC)
    async with Store.open(pg_dsn, schema=pg_schema.name, min_size=1, max_size=2) as store:
        await store.migrate()
        _, created = await store.ingest_simple(events, requests, "owner-a", 60)
        good, bad, running = sorted(run_id for run_id, *_ in created)
        finished: list[tuple[RunFinish, bool]] = []
        writer = OutcomeWriter(store, "owner-a", Health(), on_finished=finished.extend)
        for run_id, status in ((good, "succeeded"), (bad, "no-such-status"), (running, "running")):
            writer.add_attempt(
                AttemptWrite(run_id=run_id, step="s", attempt=1, status=status, output=b"1",
                             started_at=now, finished_at=now)
            )  # fmt: skip
        writer.finish(RunFinish(run_id=good, status="succeeded"))
        writer.finish(RunFinish(run_id=bad, status="succeeded"))
        with anyio.fail_after(10):
            await writer.flush()
        runs = {r.id: r for r in [await store.get_run(i) for i in (good, bad, running)] if r}
        attempts_written = {
            run_id: [a.status for a in await store.step_attempts(run_id)]
            for run_id in (good, bad, running)
        }
    assert runs[good].status == "succeeded"
    assert runs[bad].status == "failed"
    assert "Postgres rejected the run's step attempts" in (runs[bad].error or "")
    assert runs[running].status == "running"
    assert attempts_written == {good: ["succeeded"], bad: [], running: ["running"]}
    assert sorted((f.run_id, f.status, ok) for f, ok in finished) == [
        (good, "succeeded", True),
        (bad, "failed", True),
    ]
