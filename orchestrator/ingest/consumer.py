"""The Kafka intake loop: getmany batch → decode → match → one Postgres transaction → commit.

Delivery semantics: ``enable_auto_commit=False``; a batch's offsets are committed only after
its events (or their dead letters) and the runs they trigger are committed in Postgres. A
crash or rebalance before the offset commit redelivers the batch; the store deduplicates
events by (source, id) and runs by (rule, trigger key), so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import anyio
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from orchestrator.backoff import backoff_delay
from orchestrator.config import Settings
from orchestrator.contracts import Contracts
from orchestrator.errors import BrokerError, EventError, StoreError, StoreRejected
from orchestrator.events import decode_record
from orchestrator.health import Health
from orchestrator.ingest.writer import FlowPlan, RunOwner, write_batch
from orchestrator.kafka import client_options, ensure_topics
from orchestrator.store import (
    ClaimedRun,
    DeadLetter,
    IncomingEvent,
    IngestResult,
    RunRequest,
    Store,
)
from orchestrator.store.batch import pg_text
from orchestrator.telemetry import (
    Telemetry,
    extract_headers,
    traceparent_from_headers,
    traceparent_of,
    unsampled,
)
from orchestrator.triggers import RuleSet, event_to_dict, key_of, render_params

__all__ = ["Ingestor", "LocalRuns"]

log = logging.getLogger(__name__)

_DEAD_VALUE_PREFIX = 64 * 1024  # bytes of an oversize record kept in the dead-letter row


class LocalRuns(Protocol):
    """The daemon's own scheduler, as the intake sees it: it executes the simple runs the
    intake creates at once, and the intake fetches no more while it is busy."""

    @property
    def run_owner(self) -> RunOwner: ...

    def adopt(self, runs: Sequence[ClaimedRun]) -> None:
        """Execute these runs, created claimed by :attr:`run_owner`."""

    async def room(self) -> None:
        """Return once the runs handed over so far are mostly under way."""


class Ingestor:
    """Consumes arrival events and turns them into durable events and runs."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        rules: RuleSet,
        telemetry: Telemetry,
        health: Health,
        *,
        on_runs_created: Callable[[], None] = lambda: None,
        plan: FlowPlan | None = None,
        local: LocalRuns | None = None,
    ) -> None:
        self._settings = settings
        self._local = local
        self._owner = local.run_owner if local is not None else None
        self._store = store
        self._rules = rules
        self._plan = plan if plan is not None else FlowPlan(rules)
        self._contracts = Contracts(settings.contracts)
        self._tel = telemetry
        self._health = health
        self._on_runs_created = on_runs_created
        self._stopping = False
        self._stop_requested = anyio.Event()
        self._fetch_scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._dlq: AIOKafkaProducer | None = None
        self._pending_offsets: dict[TopicPartition, int] = {}
        self._commit_due = anyio.Event()
        self.batches = 0

    def stop(self) -> None:
        """Stop intake: the batch being written is finished and committed, then the loop ends."""
        self._stopping = True
        self._stop_requested.set()
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _consumer(self) -> AIOKafkaConsumer:
        k = self._settings.kafka
        return AIOKafkaConsumer(
            *k.topics,
            **client_options(self._settings),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_partition_fetch_bytes=max(k.max_record_bytes + 1024, 1_048_576),
            fetch_max_bytes=max(k.max_record_bytes * 2, 52_428_800),
            metadata_max_age_ms=30_000,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop`. Reports started at once, even while Kafka is down
        (the daemon then shows not-ready and keeps retrying with backoff)."""
        task_status.started()
        try:
            consumer = await self._connect()
            if consumer is None:
                return
            try:
                if self._settings.kafka.dead_letter_topic:
                    self._dlq = AIOKafkaProducer(**client_options(self._settings), acks="all")
                    await self._dlq.start()
                log.info(
                    "consuming %s as group %r",
                    ", ".join(self._settings.kafka.topics),
                    self._settings.kafka.group_id,
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_broker, consumer)
                    tg.start_soon(self._committer, consumer)
                    await self._loop(consumer)
                    tg.cancel_scope.cancel()
            finally:
                with anyio.move_on_after(10, shield=True):
                    await self._commit(consumer)
                    if self._dlq is not None:
                        await self._dlq.stop()
                    await consumer.stop()
        finally:
            self._stopped.set()
            log.info("intake stopped")

    async def _connect(self) -> AIOKafkaConsumer | None:
        attempt = 0
        while not self._stopping:
            consumer = self._consumer()
            try:
                if self._settings.kafka.create_topics:
                    await ensure_topics(self._settings, list(self._settings.kafka.topics))
                await consumer.start()
            except (KafkaError, BrokerError) as exc:
                with anyio.move_on_after(5, shield=True):
                    await consumer.stop()
                self._health.set("kafka", False, f"cannot reach Kafka: {exc}")
                delay = backoff_delay(attempt)
                log.warning("Kafka unavailable (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await self._pause(delay)
                continue
            self._health.set("kafka", True)
            return consumer
        return None

    async def _pause(self, seconds: float) -> None:
        """Sleep for a backoff delay, waking early when a stop is requested."""
        with anyio.move_on_after(seconds):
            await self._stop_requested.wait()

    async def _watch_broker(
        self, consumer: AIOKafkaConsumer, interval: float = 2.0, patience: float = 3.0
    ) -> None:
        """Readiness: ask the cluster for metadata every ``interval`` seconds."""
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(patience):
                    await consumer.topics()
            except (KafkaError, TimeoutError) as exc:
                reason = str(exc) or f"no answer within {patience:.0f}s"
                self._health.set("kafka", False, f"Kafka unreachable: {reason}")
            else:
                self._health.set("kafka", True)

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        k = self._settings.kafka
        while not self._stopping:
            with anyio.CancelScope() as scope:
                self._fetch_scope = scope
                if self._local is not None:
                    await self._local.room()  # backpressure: the backlog stays in Kafka
                batch = await consumer.getmany(
                    timeout_ms=k.fetch_timeout_ms, max_records=k.max_batch
                )
            self._fetch_scope = None
            if scope.cancelled_caught or not batch:
                continue
            records = [r for recs in batch.values() for r in recs]
            await self._process(consumer, records)
            self._update_lag(consumer, batch)

    async def _process(self, consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord]) -> None:
        recording, skips = self._tel.recording, self._tel.skips_unsampled
        events: list[IncomingEvent] = []
        dead: list[DeadLetter] = []
        spans: list[trace.Span] = []
        for rec in records:
            headers = list(rec.headers or ())
            traced, parent = recording, None
            if traced and skips:  # a producer's unsampled span: no span to start under it
                parent = traceparent_from_headers(headers)
                traced = not unsampled(parent[0])
            span = self._span(rec, headers) if traced else trace.INVALID_SPAN
            if traced:
                spans.append(span)
            try:
                event = decode_record(
                    rec.value, headers, max_bytes=self._settings.kafka.max_record_bytes
                )
            except EventError as exc:
                reason = str(exc)
                span.set_status(Status(StatusCode.ERROR, reason))
                span.set_attribute("orchestrator.dead_letter.reason", reason)
                dead.append(_dead_letter(rec, headers, reason))
                log.warning(
                    "dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, reason
                )
                continue
            if traced:
                span.set_attribute("messaging.message.id", event.id)
                span.set_attribute("orchestrator.dataset", event.data.dataset)
            if traced:
                tp, ts = traceparent_of(span)
            else:
                tp, ts = parent if parent is not None else traceparent_from_headers(headers)
            view = event_to_dict(event)
            problem = self._contracts.check(event) if self._contracts else None
            if problem is not None:
                reason = f"contract {event.data.dataset}: {problem}"
                span.set_status(Status(StatusCode.ERROR, reason))
                span.set_attribute("orchestrator.contract_error", problem)
                dead.append(_dead_letter(rec, headers, reason))
                log.warning(
                    "quarantined %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, reason
                )
            # Lists built by comprehension, then frozen: cheaper than tuple(generator).
            requests = tuple(
                [
                    RunRequest(
                        rule=rule.name,
                        pipeline=rule.pipeline,
                        trigger_key=f"event:{event.source}#{event.id}",
                        priority=rule.priority,
                        params=_params(rule.params, view, problem),
                        flow_key=key_of(rule, view) if rule.name in self._plan.specs else None,
                    )
                    for rule in self._rules.match(view)
                    if problem is None or rule.contract == "flag"
                ]
            )
            correlated = self._rules.correlate(view)
            correlations = (
                tuple(
                    [
                        (corr.rule.name, key, tuple(conditions))
                        for corr, key, conditions in correlated
                        if problem is None or corr.rule.contract == "flag"
                    ]
                )
                if correlated
                else ()
            )
            events.append(
                IncomingEvent(
                    event=event,
                    envelope=_envelope(rec, headers, event),
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    published_at=_timestamp(rec),
                    traceparent=tp,
                    tracestate=ts,
                    runs=requests,
                    correlations=correlations,
                    contract_error=problem,
                )
            )
        try:
            result = await self._write(events, dead)
        finally:
            for span in spans:
                span.end()
        if result is None:
            return  # stopping while Postgres is down: nothing committed, Kafka redelivers
        inst = self._tel.instruments
        inst.events_consumed.add(result.new_events)
        if result.duplicate_events:
            inst.events_duplicate.add(result.duplicate_events)
        if result.dead_letters:
            inst.dead_letters.add(result.dead_letters)
        if result.run_ids:
            inst.runs.add(len(result.run_ids), {"status": "pending"})
        if result.owned and self._local is not None:
            self._local.adopt(result.owned)
        if result.queued or any(e.correlations for e in events):
            self._on_runs_created()  # runs to claim, or new deadlines to watch
        if dead and self._settings.kafka.dead_letter_topic:
            await self._copy_dead_letters(dead)
        self._note(records)
        self.batches += 1

    def _span(self, rec: ConsumerRecord, headers: list[tuple[str, bytes]]) -> trace.Span:
        """The record's ``<topic> process`` span, continuing the producer's trace."""
        return self._tel.tracer.start_span(
            f"{rec.topic} process",
            context=extract_headers(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": rec.topic,
                "messaging.destination.partition.id": str(rec.partition),
                "messaging.kafka.offset": rec.offset,
                "messaging.consumer.group.name": self._settings.kafka.group_id,
            },
        )

    async def _write(
        self, events: list[IncomingEvent], dead: list[DeadLetter]
    ) -> IngestResult | None:
        """Write the batch, retrying while Postgres is unavailable.

        If Postgres rejects a value in the batch, events are written one at a time and the
        rejected ones become dead letters, so one bad record never blocks its partition.
        """
        try:
            return await self._retrying(
                lambda: write_batch(self._store, self._rules, self._plan, events, dead, self._owner)
            )
        except StoreRejected as exc:
            log.warning("batch rejected by Postgres (%s); isolating the bad records", exc)
        new = dup = 0
        run_ids: list[int] = []
        owned: list[ClaimedRun] = []
        queued = False
        rejected = list(dead)
        for e in events:
            try:
                r = await self._retrying(partial(self._write_one, e))
            except StoreRejected as exc:
                rejected.append(_rejected(e, str(exc)))
                continue
            if r is None:
                return None
            new, dup, run_ids = new + r.new_events, dup + r.duplicate_events, run_ids + r.run_ids
            owned += r.owned
            queued = queued or r.queued
        r = await self._retrying(
            lambda: write_batch(self._store, self._rules, self._plan, [], rejected)
        )
        if r is None:
            return None
        return IngestResult(
            new_events=new,
            duplicate_events=dup,
            dead_letters=len(rejected),
            run_ids=run_ids,
            owned=owned,
            queued=queued,
        )

    async def _write_one(self, event: IncomingEvent) -> IngestResult:
        return await write_batch(self._store, self._rules, self._plan, [event], [], self._owner)

    async def _retrying(self, write: Callable[[], Awaitable[IngestResult]]) -> IngestResult | None:
        attempt = 0
        while True:
            try:
                result = await write()
            except StoreRejected:
                raise
            except StoreError as exc:
                self._health.set("postgres", False, str(exc))
                if self._stopping:
                    return None
                delay = backoff_delay(attempt)
                log.warning("cannot write batch (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await self._pause(delay)
                continue
            self._health.set("postgres", True)
            return result

    async def _copy_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Copy dead letters to the dead-letter topic (the table stays the record)."""
        if self._dlq is None:
            return
        topic = self._settings.kafka.dead_letter_topic
        try:
            for d in dead:
                headers = [(k, v.encode()) for k, v in d.headers] + [
                    ("orchestrator-dead-letter-reason", d.reason.encode()),
                    (
                        "orchestrator-dead-letter-origin",
                        f"{d.topic}/{d.partition}/{d.offset}".encode(),
                    ),
                ]
                await self._dlq.send(topic, d.value, key=d.key, headers=headers)
            await self._dlq.flush()
        except KafkaError as exc:
            log.warning("could not copy %d dead letters to %s: %s", len(dead), topic, exc)

    def _note(self, records: Sequence[ConsumerRecord]) -> None:
        """These records are durable in Postgres: their offsets may be committed."""
        last: dict[tuple[str, int], int] = {}  # plain tuples per record: cheaper to make
        for rec in records:
            key = (rec.topic, rec.partition)
            if last.get(key, -1) < rec.offset:
                last[key] = rec.offset
        pending = self._pending_offsets
        for (topic, partition), offset in last.items():
            tp = TopicPartition(topic, partition)
            pending[tp] = max(pending.get(tp, 0), offset + 1)
        self._commit_due.set()

    async def _committer(self, consumer: AIOKafkaConsumer) -> None:
        """Commit durable offsets beside the intake loop, at most every
        ``kafka.commit_interval_ms``: a commit is a broker round trip that the next batch
        need not wait for, and committing later only means a crash redelivers more records,
        which the store deduplicates. The loop's end commits what is left."""
        interval = self._settings.kafka.commit_interval_ms / 1000
        while True:
            await self._commit_due.wait()
            self._commit_due = anyio.Event()
            await self._commit(consumer)
            await anyio.sleep(interval)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets of batches already durable in Postgres."""
        offsets, self._pending_offsets = self._pending_offsets, {}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another member; it re-reads from the last commit and
            # the store deduplicates what this batch already wrote.
            log.info("offset commit skipped after rebalance: %s", exc)
        except KafkaError as exc:
            self._health.set("kafka", False, f"offset commit failed: {exc}")
            log.warning("offset commit failed (%s); the batch will be redelivered", exc)
        except BaseException:
            # Cancelled mid-commit (stopping): keep the offsets for the final commit.
            for tp, offset in offsets.items():
                self._pending_offsets[tp] = max(self._pending_offsets.get(tp, 0), offset)
            raise
        else:
            self._health.set("kafka", True)

    def _update_lag(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]]
    ) -> None:
        inst = self._tel.instruments
        for tp, recs in batch.items():
            hw = consumer.highwater(tp)
            if hw is not None and recs:
                inst.set_lag(tp.topic, tp.partition, max(0, hw - recs[-1].offset - 1))


def _params(
    template: dict[str, Any], view: dict[str, Any], contract_error: str | None
) -> dict[str, Any]:
    params = render_params(template, view) if template else {}
    if contract_error is not None:
        params["contract_error"] = contract_error
    return params


def _timestamp(rec: ConsumerRecord) -> datetime | None:
    ts = rec.timestamp
    return datetime.fromtimestamp(ts / 1000, UTC) if ts and ts > 0 else None


_json = msgspec.json.Encoder()


def _envelope(rec: ConsumerRecord, headers: list[tuple[str, bytes]], event: Any) -> bytes:
    # Structured records are stored as received (extensions kept); binary ones re-encoded.
    for key, _ in headers:  # a loop, not any(generator): this runs for every record
        if key.startswith("ce_"):
            return _json.encode(event)
    return bytes(rec.value)


def _dead_letter(rec: ConsumerRecord, headers: list[tuple[str, bytes]], reason: str) -> DeadLetter:
    value = rec.value
    return DeadLetter(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=None if value is None else bytes(value[:_DEAD_VALUE_PREFIX]),
        value_size=0 if value is None else len(value),
        headers=[
            (pg_text(k), pg_text(v.decode("utf-8", "replace")) if v else "") for k, v in headers
        ],
        reason=pg_text(reason),
    )


def _rejected(e: IncomingEvent, reason: str) -> DeadLetter:
    return DeadLetter(
        topic=e.topic,
        partition=e.partition,
        offset=e.offset,
        key=None,
        value=e.envelope[:_DEAD_VALUE_PREFIX],
        value_size=len(e.envelope),
        headers=[],
        reason=pg_text(reason),
    )
