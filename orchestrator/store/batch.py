"""The intake's write transaction: events, dead letters, runs, flow control, correlation state.

The intake opens one :class:`IngestTx` per Kafka batch (``Store.ingest_tx()``), calls these
methods in order, and the transaction commits when the block ends; only then are the
batch's offsets committed. Every method here is SQL only; the decisions (which runs, which
correlation state) are made by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import msgspec

from orchestrator.store.records import AttemptRow, DeadLetter, IncomingEvent, RunFinish, RunRequest

__all__ = [
    "INGEST_SIMPLE",
    "FlowSpec",
    "IngestTx",
    "NewRun",
    "RunOwner",
    "attempt_rows",
    "columns",
    "epoch_seconds",
    "event_rows",
    "json_rows",
    "outcome_rows",
    "pg_text",
    "request_rows",
]

_json = msgspec.json.Encoder()
_NO_PARAMS = msgspec.Raw(b"{}")


def columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to the per-column lists that ``unnest($1::type[], $2::type[], ...)`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


def json_rows(rows: Iterable[tuple[Any, ...]]) -> bytes:
    """Rows as one JSON array of arrays, for ``jsonb_array_elements($n::jsonb) AS u(x)``.

    The hot statements take their rows this way rather than as ``unnest`` columns: asyncpg
    binds an array element in 0.3-1.3 µs (an ABC check and a codec call per element), where
    msgspec encodes a whole row in well under a microsecond. In SQL, ``x->>i`` is the text of
    field ``i`` (cast to its type), ``x->i`` a JSON value. Values already in JSON (an event's
    envelope, a step's output) go in as :class:`msgspec.Raw`, so Postgres parses them once.
    """
    return _json.encode(list(rows))


class NewRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run to create (if its (rule, trigger_key) is new)."""

    rule: str
    pipeline: str
    trigger_key: str
    event_ids: list[int]
    priority: int = 0
    params: dict[str, Any] = {}
    first_event_at: datetime | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    links: list[str] = []
    flow_key: str | None = None
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class RunOwner:
    """A daemon that executes the simple runs its own intake creates.

    Such runs are inserted already claimed (status ``running``, a lease for ``name``) and
    handed to the local scheduler with their events, instead of being queued, claimed and
    loaded back. A run the daemon does not finish is returned to the queue when its lease
    expires, like any claimed run.
    """

    name: str
    lease_seconds: float
    accepts: Callable[[str], bool]
    """Whether a run of this pipeline may be taken this way (loaded here, no pipeline-wide
    limit that only the shared claim can enforce)."""


class FlowSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Flow control of one rule, in seconds."""

    debounce: float | None = None
    batch_max: int | None = None
    batch_wait: float | None = None
    on_overlap: Literal["queue", "skip", "cancel_running"] = "queue"

    @property
    def collects(self) -> bool:
        return (
            self.debounce is not None or self.batch_max is not None or (self.batch_wait is not None)
        )


# An events row of :func:`event_rows` (``x``), as the events table's insert columns.
_EVENT_COLUMNS = """source, event_id, type, subject, event_time, dataset, partition_key,
    envelope, topic, kafka_partition, kafka_offset, published_at, traceparent, tracestate,
    contract_error"""
_EVENT_VALUES = """x->>0, x->>1, x->>2, x->>3, (x->>4)::timestamptz, x->>5, x->>6, x->7, x->>8,
    (x->>9)::int, (x->>10)::bigint, to_timestamp((x->>11)::float8), x->>12, x->>13, x->>14"""

_INSERT_EVENTS = f"""
INSERT INTO events ({_EVENT_COLUMNS})
SELECT {_EVENT_VALUES}
FROM jsonb_array_elements($1::jsonb) AS u(x)
ON CONFLICT (source, event_id) DO NOTHING
RETURNING id, source, event_id
"""

_INSERT_RUNS = """
INSERT INTO runs (rule, trigger_key, pipeline, priority, params, event_ids, first_event_at,
                  traceparent, tracestate)
SELECT r, k, p, pr, pa, ARRAY[e], fe, tp, ts
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::jsonb[], $6::bigint[],
            $7::timestamptz[], $8::text[], $9::text[]) AS u(r, k, p, pr, pa, e, fe, tp, ts)
ON CONFLICT (rule, trigger_key) DO NOTHING
RETURNING id
"""

# The same, created already claimed by the ingesting daemon (which executes them at once).
_INSERT_OWNED_RUNS = """
INSERT INTO runs (rule, trigger_key, pipeline, priority, params, event_ids, first_event_at,
                  traceparent, tracestate, status, lease_owner, lease_expires_at, claims,
                  started_at)
SELECT r, k, p, pr, pa, ARRAY[e], fe, tp, ts, 'running', $10,
       now() + make_interval(secs => $11), 1, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::jsonb[], $6::bigint[],
            $7::timestamptz[], $8::text[], $9::text[]) AS u(r, k, p, pr, pa, e, fe, tp, ts)
ON CONFLICT (rule, trigger_key) DO NOTHING
RETURNING id, rule, trigger_key
"""

# A batch of events whose matches are all simple rules, in one statement (so in autocommit,
# one round trip): new events, and for each new event the runs it triggers, pending or
# (``own``) claimed by the ingesting daemon. Redelivered events create nothing. Events and
# runs travel as :func:`json_rows` documents: ``$1`` as :func:`event_rows`, ``$2`` as
# (source, id, rule, trigger key, pipeline, priority, params, own).
INGEST_SIMPLE = f"""
WITH ev AS (
    INSERT INTO events ({_EVENT_COLUMNS})
    SELECT {_EVENT_VALUES}
    FROM jsonb_array_elements($1::jsonb) AS u(x)
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING id, source, event_id, published_at, traceparent, tracestate
), ru AS (
    INSERT INTO runs (rule, trigger_key, pipeline, priority, params, event_ids, first_event_at,
                      traceparent, tracestate, status, lease_owner, lease_expires_at, claims,
                      started_at)
    SELECT u.rule, u.k, u.p, u.pr, u.pa, ARRAY[ev.id], ev.published_at, ev.traceparent,
           ev.tracestate,
           CASE WHEN u.own THEN 'running' ELSE 'pending' END,
           CASE WHEN u.own THEN $3::text END,
           CASE WHEN u.own THEN now() + make_interval(secs => $4::float8) END,
           CASE WHEN u.own THEN 1 ELSE 0 END,
           CASE WHEN u.own THEN now() END
    FROM (SELECT x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::int, x->6, (x->>7)::bool
          FROM jsonb_array_elements($2::jsonb) AS r(x)) AS u(src, eid, rule, k, p, pr, pa, own)
    JOIN ev ON ev.source = u.src AND ev.event_id = u.eid
    ON CONFLICT (rule, trigger_key) DO NOTHING
    RETURNING id, rule, trigger_key, status
)
SELECT id, source, event_id, NULL::text AS rule, NULL::text AS trigger_key,
       NULL::text AS status
FROM ev
UNION ALL
SELECT id, NULL, NULL, rule, trigger_key, status FROM ru
"""

_INSERT_ONE_RUN = """
INSERT INTO runs (rule, trigger_key, pipeline, priority, params, event_ids, first_event_at,
                  traceparent, tracestate, links, flow_key, concurrency, collecting, not_before)
VALUES ($1, $2, $3, $4, $5, $6::bigint[], $7, $8, $9, $10::text[], $11, $12, $13,
        CASE WHEN $14::float8 IS NULL THEN NULL
             WHEN $14::float8 = 'infinity'::float8 THEN 'infinity'::timestamptz
             ELSE now() + make_interval(secs => $14::float8) END)
ON CONFLICT (rule, trigger_key) DO NOTHING
RETURNING id
"""

_INSERT_DEAD = """
INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, key, value, value_size,
                          headers, reason)
SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bytea[], $5::bytea[],
                     $6::int[], $7::jsonb[], $8::text[])
ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING
"""


class IngestTx:
    """One open intake transaction. Created by ``Store.ingest_tx()``."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self._conn = conn
        self._schema = schema
        self.created: list[int] = []
        self.queued = False
        """True when a pending run was created: a scheduler should look."""
        self.changed = False
        """True when a pending run changed (events appended): the scheduler should look."""

    async def insert_dead(self, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        cols = columns(
            (
                d.topic,
                d.partition,
                d.offset,
                d.key,
                d.value,
                d.value_size,
                _json.encode(d.headers),
                d.reason,
            )
            for d in dead
        )
        await self._conn.execute(_INSERT_DEAD, *cols)

    async def insert_events(self, events: Sequence[IncomingEvent]) -> dict[tuple[str, str], int]:
        """Insert events; returns the primary keys of the ones that were new."""
        if not events:
            return {}
        rows = await self._conn.fetch(_INSERT_EVENTS, event_rows(events))
        return {(r["source"], r["event_id"]): r["id"] for r in rows}

    async def insert_runs(self, runs: Sequence[NewRun]) -> list[int]:
        """Bulk-create single-event runs without flow control."""
        if not runs:
            return []
        ids = [r["id"] for r in await self._conn.fetch(_INSERT_RUNS, *_run_columns(runs))]
        self.created += ids
        self.queued = self.queued or bool(ids)
        return ids

    async def insert_owned_runs(
        self, runs: Sequence[NewRun], owner: str, lease_seconds: float
    ) -> list[tuple[int, NewRun]]:
        """Bulk-create single-event runs already claimed by ``owner`` with a lease, as a
        claim would leave them; returns the runs that were new, with their ids."""
        if not runs:
            return []
        rows = await self._conn.fetch(_INSERT_OWNED_RUNS, *_run_columns(runs), owner, lease_seconds)
        by_key = {(r.rule, r.trigger_key): r for r in runs}
        created = [(row["id"], by_key[(row["rule"], row["trigger_key"])]) for row in rows]
        self.created += [rid for rid, _ in created]
        return created

    async def add_flow_run(self, run: NewRun, flow: FlowSpec) -> int | None:
        """Create ``run`` under its rule's flow control, or fold it into a collecting run.

        Returns the id of the run created or extended, or None when ``on_overlap = "skip"``
        dropped it because a run for the same (rule, key) is pending or running.
        """
        conn = self._conn
        if flow.collects and run.flow_key is not None:
            row = await conn.fetchrow(
                """SELECT id, cardinality(event_ids) AS n FROM runs
                   WHERE rule = $1 AND flow_key = $2 AND status = 'pending' AND collecting
                   ORDER BY id LIMIT 1 FOR UPDATE""",
                run.rule,
                run.flow_key,
            )
            if row is not None:
                total = row["n"] + len(run.event_ids)
                full = flow.batch_max is not None and total >= flow.batch_max
                await conn.execute(
                    """UPDATE runs SET event_ids = event_ids || $2::bigint[],
                           links = links || $3::text[],
                           collecting = NOT $4,
                           not_before = CASE WHEN $4 THEN now()
                                             WHEN $5::float8 IS NOT NULL
                                             THEN now() + make_interval(secs => $5::float8)
                                             ELSE not_before END
                       WHERE id = $1""",
                    row["id"],
                    run.event_ids,
                    [run.traceparent] if run.traceparent else [],
                    full,
                    flow.debounce,
                )
                self.changed = True
                return int(row["id"])
        if flow.on_overlap != "queue" and run.flow_key is not None:
            active = await conn.fetch(
                """SELECT id, status FROM runs
                   WHERE rule = $1 AND flow_key = $2 AND status IN ('pending', 'running')
                   FOR UPDATE""",
                run.rule,
                run.flow_key,
            )
            if active and flow.on_overlap == "skip":
                return None
            for a in active:
                if a["status"] == "pending":
                    await conn.execute(
                        """UPDATE runs SET status = 'cancelled', finished_at = now(),
                               error = 'cancelled: superseded by a newer run (on_overlap)'
                           WHERE id = $1""",
                        a["id"],
                    )
                else:
                    await conn.execute(
                        "UPDATE runs SET cancel_requested = true WHERE id = $1", a["id"]
                    )
                    await conn.execute(
                        "SELECT pg_notify($1, $2)", f"{self._schema}_cancel", str(a["id"])
                    )
        delay: float | None = None
        collecting = flow.collects
        if flow.debounce is not None:
            delay = flow.debounce
        elif flow.batch_max is not None or flow.batch_wait is not None:
            delay = flow.batch_wait if flow.batch_wait is not None else float("inf")
        if flow.batch_max is not None and len(run.event_ids) >= flow.batch_max:
            collecting, delay = False, None
        rid = await conn.fetchval(
            _INSERT_ONE_RUN,
            run.rule,
            run.trigger_key,
            run.pipeline,
            run.priority,
            _json.encode(run.params),
            run.event_ids,
            run.first_event_at,
            run.traceparent,
            run.tracestate,
            run.links,
            run.flow_key,
            run.concurrency,
            collecting,
            delay,
        )
        if rid is not None:
            self.created.append(rid)
            self.queued = True
        return None if rid is None else int(rid)

    async def lock_correlations(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes]:
        """Lock and read the correlation state of these (rule, key) pairs (missing: absent)."""
        if not keys:
            return {}
        ordered = sorted(set(keys))  # a fixed lock order: concurrent batches cannot deadlock
        rows = await self._conn.fetch(
            """SELECT c.rule, c.key, c.state FROM correlations c
               JOIN unnest($1::text[], $2::text[]) AS k(rule, key)
                 ON c.rule = k.rule AND c.key = k.key
               ORDER BY c.rule, c.key
               FOR UPDATE OF c""",
            [r for r, _ in ordered],
            [k for _, k in ordered],
        )
        return {(r["rule"], r["key"]): r["state"] for r in rows}

    async def save_correlation(
        self, rule: str, key: str, state: bytes | None, deadline: datetime | None
    ) -> None:
        if state is None:
            await self._conn.execute(
                "DELETE FROM correlations WHERE rule = $1 AND key = $2", rule, key
            )
            return
        await self._conn.execute(
            """INSERT INTO correlations (rule, key, state, deadline) VALUES ($1, $2, $3, $4)
               ON CONFLICT (rule, key) DO UPDATE
               SET state = $3, deadline = $4, updated_at = now()""",
            rule,
            key,
            state,
            deadline,
        )

    async def due_correlations(self, limit: int) -> list[tuple[str, str, bytes]]:
        """Lock correlation rows whose deadline has passed (skipping ones others hold)."""
        rows = await self._conn.fetch(
            """SELECT rule, key, state FROM correlations
               WHERE deadline IS NOT NULL AND deadline <= now()
               ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED""",
            limit,
        )
        return [(r["rule"], r["key"], r["state"]) for r in rows]

    async def traceparents(self, event_ids: Sequence[int]) -> list[str]:
        """Trace contexts of these events' processing spans (links of a multi-event run)."""
        rows = await self._conn.fetch(
            "SELECT traceparent FROM events WHERE id = ANY($1::bigint[]) ORDER BY id",
            list(event_ids),
        )
        return [r["traceparent"] for r in rows if r["traceparent"]]

    async def envelope(self, event_id: int) -> bytes | None:
        """The stored CloudEvents envelope of one event (raw JSON)."""
        value: bytes | None = await self._conn.fetchval(
            "SELECT envelope FROM events WHERE id = $1", event_id
        )
        return value

    async def now(self) -> datetime:
        value: datetime = await self._conn.fetchval("SELECT now()")
        return value


def _run_columns(runs: Sequence[NewRun]) -> list[list[Any]]:
    return columns(
        (
            r.rule,
            r.trigger_key,
            r.pipeline,
            r.priority,
            _json.encode(r.params),
            r.event_ids[0],
            r.first_event_at,
            r.traceparent,
            r.tracestate,
        )
        for r in runs
    )


def epoch_seconds(at: datetime | None) -> float | None:
    """``at`` as seconds since the epoch, for ``to_timestamp()`` in SQL.

    asyncpg binds a float8 in a quarter of the time of a timestamptz. A double holds every
    microsecond exactly until 2106 (it is used for clock readings, not arbitrary dates).
    """
    return None if at is None else at.timestamp()


def pg_text(text: str) -> str:
    """``text`` as Postgres text (and jsonb) can hold it: NUL characters replaced."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def attempt_rows(attempts: Iterable[AttemptRow]) -> bytes:
    """Step attempts as the outcome statement's :func:`json_rows` document: an attempt's
    output is ``[output]`` or ``[]`` (a step's JSON ``null`` stays apart from no output),
    times are epoch seconds."""
    return json_rows(
        (
            a.run_id,
            a.step,
            a.attempt,
            a.status,
            () if a.output is None else (msgspec.Raw(a.output),),
            a.error if a.error is None else pg_text(a.error),
            a.started_at.timestamp(),
            epoch_seconds(a.finished_at),
            a.skipped,
        )
        for a in attempts
    )


def outcome_rows(finishes: Iterable[RunFinish]) -> bytes:
    """Run outcomes as the outcome statement's :func:`json_rows` document: (id, status,
    failed step, error)."""
    return json_rows(
        (f.run_id, f.status, f.failed_step, None if f.error is None else pg_text(f.error))
        for f in finishes
    )


def request_rows(runs: Iterable[tuple[IncomingEvent, RunRequest, bool]]) -> bytes:
    """The runs of :data:`INGEST_SIMPLE` (``$2``) as :func:`json_rows`: (source, id, rule,
    trigger key, pipeline, priority, params, own) for each (event, request, own)."""
    return json_rows(
        (
            e.event.source,
            e.event.id,
            r.rule,
            r.trigger_key,
            r.pipeline,
            r.priority,
            msgspec.Raw(_json.encode(r.params)) if r.params else _NO_PARAMS,
            own,
        )
        for e, r, own in runs
    )


def event_rows(events: Sequence[IncomingEvent]) -> bytes:
    """The events table's insert rows (:data:`_EVENT_VALUES`), as :func:`json_rows`."""
    return json_rows(
        (
            e.event.source,
            e.event.id,
            e.event.type,
            e.event.subject,
            _aware(e.event.time),
            e.event.data.dataset,
            e.event.data.partition,
            msgspec.Raw(e.envelope),
            e.topic,
            e.partition,
            e.offset,
            epoch_seconds(e.published_at),
            e.traceparent,
            e.tracestate,
            e.contract_error,
        )
        for e in events
    )


def _aware(at: datetime | None) -> datetime | None:
    """A naive event time is taken as UTC (as everywhere else), not as the server's zone."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at
