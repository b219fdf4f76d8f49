"""Test helpers: settings for a test's topic and schema, condition waits, a traced daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import asyncpg
import msgspec
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.config import Settings
from orchestrator.daemon import Daemon
from orchestrator.pipeline import Pipeline
from orchestrator.telemetry import Telemetry
from orchestrator.triggers import RuleSet

T = TypeVar("T")


def make_settings(
    bootstrap: str, topic: str, dsn: str, schema: str, **sections: Mapping[str, Any]
) -> Settings:
    doc: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            "publish_topic": topic,
            "group_id": f"g-{topic}",
            "fetch_timeout_ms": 50,
        },
        "postgres": {"dsn": dsn, "schema": schema, "migrate_on_start": True, "pool_max": 8},
        "runner": {"lease_seconds": 6, "shutdown_grace_seconds": 5},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return msgspec.convert(doc, Settings)


class Traced:
    """A fresh tracer and meter provider with in-memory exporters."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.telemetry = Telemetry.from_providers(self.tracer_provider, self.meter_provider)

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        points.extend(m.data.data_points)
        return points


async def wait_for(
    check: Callable[[], Awaitable[T | None]], *, within: float = 20.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns a truthy value, failing after ``within`` seconds."""
    delay = 0.01
    with anyio.fail_after(within):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.25)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


@asynccontextmanager
async def running_daemon(
    settings: Settings,
    pipelines: Mapping[str, Pipeline],
    rules: RuleSet,
    traced: Traced,
    *,
    owner: str | None = None,
) -> AsyncIterator[Daemon]:
    """A daemon running in this event loop; stopped (phased) when the block exits."""
    daemon = Daemon(settings, traced.telemetry, pipelines=pipelines, rules=rules, owner=owner)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


async def fetch(dsn: str, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()
