"""Kafka client settings and publishing arrival events (structured CloudEvents, traced)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from orchestrator.config import Settings
from orchestrator.errors import BrokerError
from orchestrator.events import CloudEvent, encode_structured
from orchestrator.telemetry import inject_headers

__all__ = ["client_options", "ensure_topics", "open_producer", "publish_event"]


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every aiokafka client."""
    k = settings.kafka
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.resolve(k.ssl_cafile)) if k.ssl_cafile else None
        ctx = ssl.create_default_context(cafile=cafile)
        if k.ssl_certfile:
            keyfile = str(settings.resolve(k.ssl_keyfile)) if k.ssl_keyfile else None
            ctx.load_cert_chain(str(settings.resolve(k.ssl_certfile)), keyfile)
        opts["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = settings.sasl_password()
    return opts


async def ensure_topics(settings: Settings, topics: list[str]) -> None:
    """Create the topics that do not exist yet (already-existing ones are fine)."""
    k = settings.kafka
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(t, k.topic_partitions, k.topic_replication) for t in missing]
                )
    except KafkaError as exc:
        raise BrokerError(
            f"cannot create topics {topics} at {k.bootstrap_servers}: {exc}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


@contextlib.asynccontextmanager
async def open_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        **client_options(settings),
        enable_idempotence=settings.kafka.enable_idempotence,
        acks="all",
        linger_ms=1,
    )
    try:
        await producer.start()
    except KafkaError as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise BrokerError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from None
    try:
        yield producer
    finally:
        await producer.stop()


async def publish_event(
    producer: AIOKafkaProducer, topic: str, event: CloudEvent, tracer: trace.Tracer
) -> tuple[int, int]:
    """Publish ``event`` in structured mode under a ``<topic> publish`` PRODUCER span.

    The span's context travels in the record headers, so the daemon's processing and the
    runs it starts continue this trace. Returns (partition, offset).
    """
    with tracer.start_as_current_span(
        f"{topic} publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "publish",
            "messaging.destination.name": topic,
            "messaging.message.id": event.id,
            "messaging.kafka.message.key": event.key,
        },
    ):
        headers = [("content-type", b"application/cloudevents+json"), *inject_headers()]
        try:
            meta = await producer.send_and_wait(
                topic, encode_structured(event), key=event.key.encode(), headers=headers
            )
        except KafkaError as exc:
            raise BrokerError(f"publishing to {topic!r} failed: {exc}") from None
        return meta.partition, meta.offset
