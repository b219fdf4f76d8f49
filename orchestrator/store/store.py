"""The Postgres store: every SQL statement the daemon runs lives here.

Each method is one visible transaction (or one autocommit statement). The connection is
taken from the pool inside the method and never shared across calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from orchestrator.events import CloudEvent
from orchestrator.store.batch import (
    INGEST_SIMPLE,
    IngestTx,
    NewRun,
    attempt_rows,
    event_rows,
    outcome_rows,
    request_rows,
)
from orchestrator.store.connection import acquire, create_pool, translate_errors
from orchestrator.store.migrate import migrate
from orchestrator.store.records import (
    AttemptRow,
    ClaimedRun,
    DeadLetterRow,
    IncomingEvent,
    OutboxRow,
    OutboxWrite,
    RunFinish,
    RunRequest,
    RunRow,
    StepAttemptRow,
    StoredEvent,
)

__all__ = ["Store", "new_run"]

_envelope_decoder = msgspec.json.Decoder(CloudEvent)
_params_decoder = msgspec.json.Decoder(dict[str, Any])
_json = msgspec.json.Encoder()

_CLAIMED = """r.id, r.rule, r.pipeline, r.priority, r.params, r.event_ids, r.first_event_at,
    r.traceparent, r.tracestate, r.links, r.claims, r.cancel_requested,
    (SELECT coalesce(array_agg(e.envelope ORDER BY array_position(r.event_ids, e.id)), '{}')
     FROM events e WHERE e.id = ANY(r.event_ids)) AS envelopes"""

_CLAIM = f"""
WITH c AS (
    SELECT id FROM runs
    WHERE status = 'pending' AND flow_key IS NULL AND pipeline <> ALL($4::text[])
    ORDER BY priority DESC, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE runs r
SET status = 'running', lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3),
    claims = r.claims + 1, started_at = coalesce(r.started_at, now())
FROM c WHERE r.id = c.id
RETURNING {_CLAIMED}
"""

# Runs under flow control or a pipeline-wide limit: due (not_before passed), within their
# (rule, key) concurrency and their pipeline's max_concurrent_runs. Daemons take these one
# claim at a time (an advisory lock), so two daemons cannot both start the last allowed run.
_CLAIM_FLOW = f"""
WITH limits AS (
    SELECT * FROM unnest($4::text[], $5::int[]) AS l(pipeline, lim)
), running AS (
    SELECT rule, flow_key, count(*) AS n FROM runs
    WHERE status = 'running' AND flow_key IS NOT NULL
    GROUP BY rule, flow_key
), pipeline_running AS (
    SELECT r.pipeline, count(*) AS n FROM runs r JOIN limits l ON l.pipeline = r.pipeline
    WHERE r.status = 'running'
    GROUP BY r.pipeline
), cand AS (
    SELECT r.id, r.concurrency, coalesce(x.n, 0) AS n,
           row_number() OVER (PARTITION BY r.rule, r.flow_key ORDER BY r.id) AS rn,
           l.lim, coalesce(p.n, 0) AS pn,
           row_number() OVER (PARTITION BY r.pipeline ORDER BY r.priority DESC, r.id) AS prn
    FROM runs r
    LEFT JOIN running x ON x.rule = r.rule AND x.flow_key = r.flow_key
    LEFT JOIN limits l ON l.pipeline = r.pipeline
    LEFT JOIN pipeline_running p ON p.pipeline = r.pipeline
    WHERE r.status = 'pending' AND (r.flow_key IS NOT NULL OR l.lim IS NOT NULL)
      AND (r.not_before IS NULL OR r.not_before <= now())
), c AS (
    SELECT id FROM runs
    WHERE id IN (SELECT id FROM cand
                 WHERE (concurrency IS NULL OR rn + n <= concurrency)
                   AND (lim IS NULL OR prn + pn <= lim))
    ORDER BY priority DESC, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE runs r
SET status = 'running', lease_owner = $1, collecting = false,
    lease_expires_at = now() + make_interval(secs => $3),
    claims = r.claims + 1, started_at = coalesce(r.started_at, now())
FROM c WHERE r.id = c.id
RETURNING {_CLAIMED}
"""

_INSERT_OUTBOX = """
INSERT INTO outbox (event_id, topic, key, value, headers, run_id, step)
SELECT u.event_id, u.topic, u.key, u.value, u.headers, u.run_id, u.step
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::jsonb[], $6::bigint[],
            $7::text[]) AS u(event_id, topic, key, value, headers, run_id, step)
JOIN runs r ON r.id = u.run_id AND r.lease_owner = $8
ON CONFLICT (event_id) DO NOTHING
"""

# Attempts and outcomes in one statement (alone, in autocommit: one round trip). Both read the runs
# as they were before the statement, so a run finished here still has its lease for the
# attempts written with it. Attempts ($1) travel as a ``json_rows`` document; an attempt's
# output is ``[output]`` or ``[]``, so that a step's JSON ``null`` stays apart from no output.
# Times are epoch seconds (``epoch_seconds``). The statement stays prepared with a generic
# plan, made while the runs table was small. The attempts' runs ($1) and the finished runs
# ($3, a ``json_rows`` document too: asyncpg binds an array element in about a microsecond)
# are looked up by ``id = ANY(ARRAY(...))``: a join on a document's rows gets a plan that
# reads all of ``runs_pkey``. A run has a lease only while running
# (``runs_lease_only_while_running``), so no ``status = 'running'`` condition: it led
# Postgres to runs_running_idx, every running run of every daemon, once per outcome.
_RECORD_AND_FINISH = """
WITH a AS (
    INSERT INTO step_attempts (run_id, step, attempt, status, output, error, owner, started_at,
                               finished_at, skipped)
    SELECT u.run_id, u.step, u.attempt, u.status, u.output, u.error, $2,
           to_timestamp(u.started_at), to_timestamp(u.finished_at), u.skipped
    FROM (SELECT (x->>0)::bigint, x->>1, (x->>2)::int, x->>3, x->4->0, x->>5,
                 (x->>6)::float8, (x->>7)::float8, (x->>8)::bool
          FROM jsonb_array_elements($1::jsonb) AS r(x))
         AS u(run_id, step, attempt, status, output, error, started_at, finished_at, skipped)
    JOIN runs r ON r.id = u.run_id
    WHERE r.id = ANY(ARRAY(SELECT (x->>0)::bigint FROM jsonb_array_elements($1::jsonb) AS i(x)))
      AND r.lease_owner = $2
    ON CONFLICT (run_id, step, attempt) DO UPDATE
    SET status = excluded.status, output = excluded.output, error = excluded.error,
        owner = excluded.owner, finished_at = excluded.finished_at, skipped = excluded.skipped
    RETURNING run_id
), f AS (
    UPDATE runs r
    SET status = u.status, finished_at = now(), failed_step = u.failed_step, error = u.error,
        lease_owner = NULL, lease_expires_at = NULL
    FROM (SELECT (x->>0)::bigint, x->>1, x->>2, x->>3
          FROM jsonb_array_elements($3::jsonb) AS o(x)) AS u(id, status, failed_step, error)
    WHERE r.id = u.id AND r.lease_owner = $2
      AND r.id = ANY(ARRAY(SELECT (x->>0)::bigint FROM jsonb_array_elements($3::jsonb) AS i(x)))
    RETURNING r.id
)
SELECT DISTINCT run_id AS id, false AS finished FROM a
UNION ALL
SELECT id, true FROM f
"""

_EVENT_FILTER = """($1::timestamptz IS NULL OR received_at >= $1)
    AND ($2::text IS NULL OR topic = $2)
    AND ($3::int IS NULL OR kafka_partition = $3)
    AND ($4::bigint IS NULL OR kafka_offset >= $4)
    AND ($5::bigint IS NULL OR kafka_offset <= $5)"""

_RUN_COLUMNS = """id, rule, pipeline, trigger_key, status, priority, params, event_ids,
    created_at, started_at, finished_at, lease_owner, claims, failed_step, error, traceparent"""


def new_run(request: RunRequest, event: IncomingEvent, event_pk: int) -> NewRun:
    """The run a simple rule's request asks for, triggered by one stored event."""
    return NewRun(
        rule=request.rule,
        pipeline=request.pipeline,
        trigger_key=request.trigger_key,
        event_ids=[event_pk],
        priority=request.priority,
        params=request.params,
        first_event_at=event.published_at,
        traceparent=event.traceparent,
        tracestate=event.tracestate,
    )


def _run_row(r: asyncpg.Record) -> RunRow:
    fields = dict(r)
    fields["params"] = _params_decoder.decode(fields["params"])
    return RunRow(**fields)


class Store:
    """State of events, runs, step attempts and dead letters in one Postgres schema."""

    def __init__(self, pool: asyncpg.Pool, *, schema: str = "public") -> None:
        self.pool = pool
        self.schema = schema
        self.runs_channel = f"{schema}_runs"
        self.outbox_channel = f"{schema}_outbox"

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 2,
        max_size: int = 10,
        sslmode: str = "",
        sslrootcert: str = "",
        planner: dict[str, str] | None = None,
    ) -> AsyncIterator[Store]:
        pool = await create_pool(
            dsn,
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            sslmode=sslmode,
            sslrootcert=sslrootcert,
            planner=planner,
        )
        try:
            yield cls(pool, schema=schema)
        finally:
            with contextlib.suppress(Exception):
                await pool.close()

    async def migrate(self) -> list[str]:
        async with acquire(self.pool, "migrate") as conn:
            return await migrate(conn, self.schema)

    # -- ingest -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def ingest_tx(self) -> AsyncIterator[IngestTx]:
        """One intake transaction; commits when the block ends, then wakes other daemons
        if it created or changed runs."""
        async with acquire(self.pool, "ingest") as conn, conn.transaction():
            tx = IngestTx(conn, self.schema)
            yield tx
            if tx.queued or tx.changed:
                await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)

    async def ingest_simple(
        self,
        events: Sequence[IncomingEvent],
        runs: Sequence[tuple[IncomingEvent, RunRequest, bool]],
        owner: str,
        lease_seconds: float,
    ) -> tuple[dict[tuple[str, str], int], list[tuple[int, str, str, str]]]:
        """Write a batch whose events match only simple rules in one statement.

        ``runs``: (event, request, own) for each run an event asks for; created only if its
        event is new, claimed by ``owner`` when ``own``. Returns the new events' primary keys
        by (source, id), and (id, rule, trigger_key, status) of each run created.
        """
        async with acquire(self.pool, "ingest") as conn:
            rows = await conn.fetch(
                INGEST_SIMPLE, event_rows(events), request_rows(runs), owner, lease_seconds
            )
            events_by_key: dict[tuple[str, str], int] = {}
            created: list[tuple[int, str, str, str]] = []
            for row in rows:
                if row["rule"] is None:
                    events_by_key[(row["source"], row["event_id"])] = row["id"]
                else:
                    created.append((row["id"], row["rule"], row["trigger_key"], row["status"]))
            if any(status == "pending" for *_, status in created):
                await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)
        return events_by_key, created

    # -- run execution --------------------------------------------------------------------

    async def claim_runs(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        flow: bool = False,
        pipeline_limits: Mapping[str, int] | None = None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runnable runs for ``owner`` with a lease.

        ``flow``: also claim runs under flow control (debounce, batch, concurrency), which
        costs a serialised query; daemons whose rules use none skip it.
        ``pipeline_limits``: pipelines whose running runs are capped across all daemons.
        """
        if limit <= 0:
            return []
        limits = dict(pipeline_limits or {})
        names, caps = list(limits), list(limits.values())
        rows: list[asyncpg.Record] = []
        async with acquire(self.pool, "claim runs") as conn:
            if flow or limits:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", f"{self.schema}.flow"
                    )
                    rows += await conn.fetch(_CLAIM_FLOW, owner, limit, lease_seconds, names, caps)
            if len(rows) < limit:
                rows += await conn.fetch(_CLAIM, owner, limit - len(rows), lease_seconds, names)
        out = []
        for r in rows:
            fields = dict(r)
            fields["params"] = _params_decoder.decode(fields["params"])
            fields["events"] = tuple(_envelope_decoder.decode(e) for e in fields.pop("envelopes"))
            out.append(ClaimedRun(**fields))
        return out

    async def next_due(self) -> datetime | None:
        """The earliest future moment a pending run or a correlation deadline comes due."""
        async with acquire(self.pool, "next due time") as conn:
            value: datetime | None = await conn.fetchval(
                """SELECT least(
                       (SELECT min(not_before) FROM runs
                        WHERE status = 'pending' AND not_before > now()
                          AND not_before < 'infinity'),
                       (SELECT min(deadline) FROM correlations WHERE deadline > now()))"""
            )
        return value

    async def reclaim_expired(self) -> list[int]:
        """Return runs whose lease expired (their daemon died) to the pending queue."""
        async with acquire(self.pool, "reclaim expired leases") as conn:
            rows = await conn.fetch(
                """UPDATE runs SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL
                   WHERE status = 'running' AND lease_expires_at < now()
                   RETURNING id"""
            )
            ids = [r["id"] for r in rows]
            if ids:
                await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)
        return ids

    async def heartbeat(
        self, owner: str, run_ids: Sequence[int], lease_seconds: float
    ) -> dict[int, bool]:
        """Extend the leases of ``run_ids`` still owned by ``owner``.

        Returns ``{run_id: cancel_requested}`` for the runs still held; a run missing from
        the result has been lost (its lease expired and another daemon took it).
        """
        if not run_ids:
            return {}
        async with acquire(self.pool, "heartbeat") as conn:
            rows = await conn.fetch(
                # A lease means running (runs_lease_only_while_running): no status
                # condition, which would scan every running run instead of the ids.
                """UPDATE runs SET lease_expires_at = now() + make_interval(secs => $3)
                   WHERE id = ANY($2::bigint[]) AND lease_owner = $1
                   RETURNING id, cancel_requested""",
                owner,
                list(run_ids),
                lease_seconds,
            )
        return {r["id"]: r["cancel_requested"] for r in rows}

    async def resume_state(self, run_id: int) -> tuple[dict[str, bytes], dict[str, int]]:
        """What a resumed run needs: outputs of steps already succeeded (not run again) and
        the number of attempts recorded so far per step (numbering continues)."""
        async with acquire(self.pool, "load resume state") as conn:
            rows = await conn.fetch(
                """SELECT step, max(attempt) AS attempts,
                          (array_agg(output ORDER BY attempt DESC)
                               FILTER (WHERE status = 'succeeded'))[1] AS output,
                          bool_or(status = 'succeeded') AS succeeded
                   FROM step_attempts WHERE run_id = $1 GROUP BY step""",
                run_id,
            )
        completed = {r["step"]: r["output"] or b"null" for r in rows if r["succeeded"]}
        attempts = {r["step"]: r["attempts"] for r in rows}
        return completed, attempts

    async def record_outcomes(
        self,
        owner: str,
        attempts: Sequence[AttemptRow],
        finishes: Sequence[RunFinish],
        releases: Sequence[int] = (),
        outbox: Sequence[OutboxWrite] = (),
        *,
        notify_finished: bool = True,
    ) -> tuple[set[int], set[int]]:
        """Write step attempts and run outcomes of many runs in one transaction.

        ``releases`` are runs given back to the queue (interrupted by a shutdown). Only rows
        of runs ``owner`` still holds are written. ``notify_finished`` tells the daemons
        that runs finished (needed when flow control or pipeline limits may be waiting).
        Returns (runs whose attempts were refused because the lease was lost, runs whose
        outcome or release was recorded).
        """
        async with acquire(self.pool, "record outcomes") as conn:
            if not releases and not outbox and not notify_finished:
                return await _record_and_finish(conn, owner, attempts, finishes)  # autocommit
            async with conn.transaction():
                if outbox:  # before the outcomes: it is fenced by the lease they release
                    await conn.execute(
                        _INSERT_OUTBOX,
                        [o.event_id for o in outbox],
                        [o.topic for o in outbox],
                        [o.key for o in outbox],
                        [o.value for o in outbox],
                        [_json.encode(o.headers) for o in outbox],
                        [o.run_id for o in outbox],
                        [o.step for o in outbox],
                        owner,
                    )
                    await conn.execute("SELECT pg_notify($1, '')", self.outbox_channel)
                lost, finished = await _record_and_finish(conn, owner, attempts, finishes)
                if releases:
                    rows = await conn.fetch(
                        """UPDATE runs SET status = 'pending', lease_owner = NULL,
                               lease_expires_at = NULL
                           WHERE id = ANY($1::bigint[]) AND lease_owner = $2
                             AND status = 'running'
                           RETURNING id""",
                        list(releases),
                        owner,
                    )
                    finished |= {r["id"] for r in rows}
                if finished and notify_finished:
                    await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)
        return lost, finished

    async def release_run(self, run_id: int, owner: str) -> bool:
        """Give a run back to the queue (interrupted by shutdown); any daemon resumes it."""
        async with acquire(self.pool, "release run") as conn:
            row = await conn.fetchrow(
                """UPDATE runs SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                   RETURNING id""",
                run_id,
                owner,
            )
            if row is not None:
                await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)
        return row is not None

    # -- operator queries -------------------------------------------------------------

    async def list_runs(
        self, *, status: str | None = None, pipeline: str | None = None, limit: int = 50
    ) -> list[RunRow]:
        async with acquire(self.pool, "list runs") as conn:
            rows = await conn.fetch(
                f"""SELECT {_RUN_COLUMNS} FROM runs
                    WHERE ($1::text IS NULL OR status = $1)
                      AND ($2::text IS NULL OR pipeline = $2)
                    ORDER BY id DESC LIMIT $3""",
                status,
                pipeline,
                limit,
            )
        return [_run_row(r) for r in rows]

    async def get_run(self, run_id: int) -> RunRow | None:
        async with acquire(self.pool, "get run") as conn:
            row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = $1", run_id)
        return None if row is None else _run_row(row)

    async def step_attempts(self, run_id: int) -> list[StepAttemptRow]:
        async with acquire(self.pool, "list step attempts") as conn:
            rows = await conn.fetch(
                """SELECT run_id, step, attempt, status, output, error, owner, started_at,
                          finished_at
                   FROM step_attempts WHERE run_id = $1 ORDER BY started_at, step, attempt""",
                run_id,
            )
        return [
            StepAttemptRow(
                **{**dict(r), "output": None if r["output"] is None else msgspec.Raw(r["output"])}
            )
            for r in rows
        ]

    async def request_cancel(self, run_id: int) -> str | None:
        """Cancel a pending run now, or ask the daemon running it to cancel it.

        Returns the run's status *before* the request (``pending``: now cancelled;
        ``running``: its daemon was asked; anything else: nothing changed), or None if
        there is no such run.
        """
        async with acquire(self.pool, "cancel run") as conn, conn.transaction():
            before = await conn.fetchval("SELECT status FROM runs WHERE id = $1 FOR UPDATE", run_id)
            if before == "pending":
                await conn.execute(
                    """UPDATE runs SET status = 'cancelled', finished_at = now(),
                           error = 'cancelled by operator' WHERE id = $1""",
                    run_id,
                )
            elif before == "running":
                await conn.execute("UPDATE runs SET cancel_requested = true WHERE id = $1", run_id)
                await conn.execute("SELECT pg_notify($1, $2)", f"{self.schema}_cancel", str(run_id))
        return None if before is None else str(before)

    async def retry_run(self, run_id: int) -> str | None:
        """Queue a failed or cancelled run again; it resumes from its first unfinished step."""
        async with acquire(self.pool, "retry run") as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE runs SET status = 'pending', finished_at = NULL, failed_step = NULL,
                       error = NULL, cancel_requested = false
                   WHERE id = $1 AND status IN ('failed', 'cancelled') RETURNING status""",
                run_id,
            )
            if row is None:
                current = await conn.fetchval("SELECT status FROM runs WHERE id = $1", run_id)
                return None if current is None else str(current)
            await conn.execute("SELECT pg_notify($1, '')", self.runs_channel)
        return "pending"

    async def list_dead_letters(self, *, limit: int = 50) -> list[DeadLetterRow]:
        async with acquire(self.pool, "list dead letters") as conn:
            rows = await conn.fetch(
                """SELECT id, topic, kafka_partition, kafka_offset, value_size, reason,
                          created_at, redriven_at
                   FROM dead_letters ORDER BY id DESC LIMIT $1""",
                limit,
            )
        return [DeadLetterRow(**dict(r)) for r in rows]

    async def dead_letters_for_redrive(self, ids: Sequence[int] | None) -> list[DeadLetterRow]:
        """Dead letters with their stored record, by id, or all not yet redriven."""
        async with acquire(self.pool, "load dead letters") as conn:
            rows = await conn.fetch(
                """SELECT id, topic, kafka_partition, kafka_offset, value_size, reason,
                          created_at, redriven_at, value, key, headers
                   FROM dead_letters
                   WHERE CASE WHEN $1::bigint[] IS NULL THEN redriven_at IS NULL
                              ELSE id = ANY($1::bigint[]) END
                   ORDER BY id""",
                None if ids is None else list(ids),
            )
        return [
            DeadLetterRow(
                **{
                    **dict(r),
                    "value": None if r["value"] is None else bytes(r["value"]),
                    "key": None if r["key"] is None else bytes(r["key"]),
                    "headers": [tuple(h) for h in msgspec.json.decode(r["headers"])],
                }
            )
            for r in rows
        ]

    async def mark_redriven(self, dead_letter_id: int) -> None:
        async with acquire(self.pool, "mark dead letter redriven") as conn:
            await conn.execute(
                "UPDATE dead_letters SET redriven_at = now() WHERE id = $1", dead_letter_id
            )

    # -- outbox ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def outbox_batch(self, limit: int) -> AsyncIterator[list[OutboxRow]]:
        """Lock up to ``limit`` unpublished outbox rows for the block; they are marked
        published when the block ends without an error (rolled back otherwise)."""
        async with acquire(self.pool, "publish outbox") as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT id, topic, key, value, headers FROM outbox
                   WHERE published_at IS NULL ORDER BY id LIMIT $1
                   FOR UPDATE SKIP LOCKED""",
                limit,
            )
            batch = [
                OutboxRow(
                    id=r["id"],
                    topic=r["topic"],
                    key=None if r["key"] is None else bytes(r["key"]),
                    value=bytes(r["value"]),
                    headers=[tuple(h) for h in msgspec.json.decode(r["headers"])],
                )
                for r in rows
            ]
            yield batch
            if batch:
                await conn.execute(
                    "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                    [b.id for b in batch],
                )

    # -- replay ---------------------------------------------------------------------------

    async def count_events(
        self,
        *,
        since: datetime | None,
        topic: str | None,
        partition: int | None,
        offsets: tuple[int, int] | None,
    ) -> int:
        async with acquire(self.pool, "count events") as conn:
            value: int = await conn.fetchval(
                f"SELECT count(*) FROM events WHERE {_EVENT_FILTER}",
                since,
                topic,
                partition,
                None if offsets is None else offsets[0],
                None if offsets is None else offsets[1],
            )
        return value

    async def iter_events(
        self,
        *,
        since: datetime | None,
        topic: str | None,
        partition: int | None,
        offsets: tuple[int, int] | None,
        batch: int = 1000,
    ) -> AsyncIterator[list[StoredEvent]]:
        """Stored events in arrival order, in batches (keyset pagination by id)."""
        after = 0
        while True:
            async with acquire(self.pool, "read events") as conn:
                rows = await conn.fetch(
                    f"""SELECT id, envelope, published_at, traceparent, tracestate FROM events
                        WHERE {_EVENT_FILTER} AND id > $6 ORDER BY id LIMIT $7""",
                    since,
                    topic,
                    partition,
                    None if offsets is None else offsets[0],
                    None if offsets is None else offsets[1],
                    after,
                    batch,
                )
            if not rows:
                return
            after = rows[-1]["id"]
            yield [
                StoredEvent(
                    id=r["id"],
                    event=_envelope_decoder.decode(r["envelope"]),
                    published_at=r["published_at"],
                    traceparent=r["traceparent"],
                    tracestate=r["tracestate"],
                )
                for r in rows
            ]

    async def existing_runs(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (rule, trigger_key) pairs already have a run."""
        if not keys:
            return set()
        async with acquire(self.pool, "find runs") as conn:
            rows = await conn.fetch(
                """SELECT r.rule, r.trigger_key FROM runs r
                   JOIN unnest($1::text[], $2::text[]) AS k(rule, trigger_key)
                     ON r.rule = k.rule AND r.trigger_key = k.trigger_key""",
                [k[0] for k in keys],
                [k[1] for k in keys],
            )
        return {(r["rule"], r["trigger_key"]) for r in rows}

    # -- notifications ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def listen(
        self, channel: str, callback: Callable[[str], None], dsn: str
    ) -> AsyncIterator[asyncpg.Connection]:
        """Call ``callback(payload)`` for each NOTIFY on ``channel`` while the block runs."""
        with translate_errors(f"LISTEN {channel}"):
            conn = await asyncpg.connect(dsn, timeout=10)

        def _on_notify(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            callback(str(payload))

        try:
            with translate_errors(f"LISTEN {channel}"):
                await conn.add_listener(channel, _on_notify)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)


async def _record_and_finish(
    conn: asyncpg.Connection,
    owner: str,
    attempts: Sequence[AttemptRow],
    finishes: Sequence[RunFinish],
) -> tuple[set[int], set[int]]:
    """Attempts and outcomes in one statement. Returns (runs whose attempts were refused
    because the lease was lost, runs whose outcome was recorded)."""
    rows = await conn.fetch(
        _RECORD_AND_FINISH, attempt_rows(attempts), owner, outcome_rows(finishes)
    )
    written = {r["id"] for r in rows if not r["finished"]}
    finished = {r["id"] for r in rows if r["finished"]}
    return {a.run_id for a in attempts} - written, finished
