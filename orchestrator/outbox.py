"""The outbox relay: publishes events that steps produced, after their success committed.

Rows are taken with ``FOR UPDATE SKIP LOCKED`` (several daemons share the work), sent, and
marked published in the same transaction once Kafka acknowledged them. A crash between
the acknowledgement and the commit publishes them again with the same CloudEvents id:
at least once, deduplicated by consumers.
"""

from __future__ import annotations

import logging

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from anyio.abc import TaskStatus

from orchestrator.backoff import backoff_delay
from orchestrator.config import Settings
from orchestrator.errors import BrokerError, StoreError
from orchestrator.health import Health
from orchestrator.kafka import client_options
from orchestrator.store import Store

__all__ = ["OutboxRelay"]

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        health: Health,
        *,
        batch: int = 500,
        longest_sleep: float = 5.0,
    ) -> None:
        self._store = store
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._health = health
        self._batch = batch
        self._longest = longest_sleep
        self._wake = anyio.Event()
        self.published = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish until cancelled; connects to Kafka lazily and keeps retrying."""
        task_status.started()
        try:
            await self._relay()
        finally:
            if self._producer is not None:
                with anyio.move_on_after(10, shield=True):
                    await self._producer.stop()

    async def _relay(self) -> None:
        attempt = 0
        while True:
            self._wake = anyio.Event()
            try:
                if self._producer is None:
                    self._producer = await self._connect()
                sent = await self.publish_pending()
            except (StoreError, KafkaError, BrokerError) as exc:
                component = "postgres" if isinstance(exc, StoreError) else "kafka"
                if isinstance(exc, KafkaError) and self._producer is not None:
                    with anyio.move_on_after(5, shield=True):
                        await self._producer.stop()
                    self._producer = None
                self._health.set(component, False, f"outbox: {exc}")
                delay = backoff_delay(attempt)
                log.warning("outbox: %s; retrying in %.1fs", exc, delay)
                attempt += 1
                await anyio.sleep(delay)
                continue
            attempt = 0
            if sent == self._batch:
                continue
            with anyio.move_on_after(self._longest):
                await self._wake.wait()

    async def _connect(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **client_options(self._settings),
            enable_idempotence=self._settings.kafka.enable_idempotence,
            acks="all",
            linger_ms=2,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            with anyio.move_on_after(5, shield=True):
                await producer.stop()
            raise BrokerError(f"cannot reach Kafka to publish produced events: {exc}") from None
        return producer

    async def publish_pending(self) -> int:
        producer = self._producer
        assert producer is not None
        async with self._store.outbox_batch(self._batch) as rows:
            if not rows:
                return 0
            acks = [
                await producer.send(
                    row.topic,
                    row.value,
                    key=row.key,
                    headers=[(k, v.encode("latin-1")) for k, v in row.headers],
                )
                for row in rows
            ]
            for ack in acks:
                await ack
        self.published += len(rows)
        return len(rows)
