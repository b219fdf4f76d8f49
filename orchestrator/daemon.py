"""The composition root: resources in an exit stack, services in one task group, phased stop.

Start order: Postgres pool (retried until reachable) → migrations (if asked) → health →
scheduler → notifications → Kafka intake. Stop (first SIGTERM/SIGINT):

1. stop intake: the batch being written is finished, its offsets committed, consumer closed;
2. drain: in-flight runs get ``runner.shutdown_grace_seconds`` to finish, then the rest are
   interrupted (their steps recorded as interrupted, the runs returned to the queue);
3. cancel the remaining services (notifications, health);
4. close resources in reverse order.

:meth:`Daemon.stop` is safe to call more than once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Mapping

import anyio
import asyncpg
from anyio.abc import TaskStatus

from connectors import Connector, ConnectorError, Source, create_all, open_all
from orchestrator.backoff import backoff_delay
from orchestrator.config import Settings
from orchestrator.errors import BrokerError, StoreError
from orchestrator.health import Health, serve_health
from orchestrator.ingest import DeadlineWatcher, FlowPlan, Ingestor
from orchestrator.kafka import open_producer, publish_event
from orchestrator.loading import load_pipelines, load_ruleset
from orchestrator.outbox import OutboxRelay
from orchestrator.pipeline import Pipeline
from orchestrator.pipeline.scheduler import Scheduler
from orchestrator.store import KEY_LOOKUP_PLANNER, Store
from orchestrator.telemetry import Telemetry
from orchestrator.triggers import RuleSet

__all__ = ["Daemon", "daemon_id"]

log = logging.getLogger(__name__)


def daemon_id() -> str:
    """``host:pid:random``: the owner name written on leases this process holds."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Daemon:
    """One orchestrator process: intake, scheduling and execution against shared state."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        *,
        pipelines: Mapping[str, Pipeline] | None = None,
        rules: RuleSet | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.owner = owner or daemon_id()
        self.pipelines = dict(pipelines) if pipelines is not None else load_pipelines(settings)
        self.rules = rules if rules is not None else load_ruleset(settings, self.pipelines)
        create_all(settings.connectors, base_dir=settings.base_dir)  # a typo fails start-up
        self.connectors: Mapping[str, Connector] = {}
        self.health = Health()
        self.health.expect("kafka", "postgres")
        self.health_port: int | None = None
        self.scheduler: Scheduler | None = None
        self.ingestor: Ingestor | None = None
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Begin the phased shutdown (idempotent)."""
        if not self._stop.is_set():
            log.info("shutdown requested")
            self.health.stopping = True
            self._stop.set()

    async def _open_store(self, stack: contextlib.AsyncExitStack) -> Store | None:
        """Open the pool, retrying with backoff while Postgres is unreachable."""
        s = self.settings
        attempt = 0
        while not self._stop.is_set():
            cm = Store.open(
                s.postgres_dsn(),
                schema=s.postgres.schema,
                min_size=s.postgres.pool_min,
                max_size=s.postgres.pool_max,
                sslmode=s.postgres.sslmode,
                sslrootcert=s.postgres.sslrootcert,
                planner=KEY_LOOKUP_PLANNER,
            )
            try:
                return await stack.enter_async_context(cm)
            except StoreError as exc:
                self.health.set("postgres", False, str(exc))
                delay = backoff_delay(attempt)
                log.warning("%s; retrying in %.1fs", exc, delay)
                attempt += 1
                with anyio.move_on_after(delay):
                    await self._stop.wait()
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        log.info(
            "daemon %s starting: %d pipelines, %d rules",
            self.owner,
            len(self.pipelines),
            len(self.rules),
        )
        async with contextlib.AsyncExitStack() as stack:
            async with anyio.create_task_group() as tg:
                await tg.start(self.health.tick)
                if s.health.port:
                    self.health_port = await tg.start(
                        serve_health, self.health, s.health.host, s.health.port
                    )
                store = await self._open_store(stack)
                if store is None:
                    tg.cancel_scope.cancel()
                    task_status.started()
                    return
                self.health.set("postgres", True)
                if s.postgres.migrate_on_start:
                    applied = await store.migrate()
                    if applied:
                        log.info("applied migrations: %s", ", ".join(applied))
                plan = FlowPlan(self.rules)
                conns = await self._open_connectors(stack)
                if conns is None:
                    tg.cancel_scope.cancel()
                    task_status.started()
                    return
                self.connectors = conns
                sources = [c for c in conns.values() if isinstance(c, Source)]
                relay = OutboxRelay(store, s, self.health)
                scheduler = Scheduler(
                    store,
                    self.pipelines,
                    self.telemetry,
                    s.runner,
                    self.health,
                    owner=self.owner,
                    flow=plan.any or bool(plan.correlators),
                    connectors=conns,
                    publish_topic=s.kafka.publish_topic,
                    on_outbox=relay.wake,
                )
                deadlines = DeadlineWatcher(
                    store, plan, self.health, on_runs_created=scheduler.wake
                )

                def _created() -> None:
                    scheduler.wake()
                    deadlines.wake()

                ingestor = Ingestor(
                    s,
                    store,
                    self.rules,
                    self.telemetry,
                    self.health,
                    on_runs_created=_created,
                    plan=plan,
                    local=scheduler,
                )
                self.scheduler, self.ingestor = scheduler, ingestor
                services = anyio.CancelScope()

                async def _services() -> None:
                    with services:
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(self._notifications, store, scheduler, relay)
                            inner.start_soon(relay.run)
                            for source in sources:
                                inner.start_soon(self._pump, source)
                            if plan.correlators:
                                inner.start_soon(deadlines.run)
                            await anyio.sleep_forever()

                tg.start_soon(_services)
                scheduler_done = anyio.Event()

                async def _scheduler() -> None:
                    try:
                        await scheduler.run()
                    finally:
                        scheduler_done.set()

                tg.start_soon(_scheduler)
                await tg.start(ingestor.run)
                log.info("daemon %s ready", self.owner)
                task_status.started()
                await self._stop.wait()

                log.info("shutdown 1/4: stopping intake")
                ingestor.stop()
                with anyio.move_on_after(30):
                    await ingestor.wait_stopped()
                grace = s.runner.shutdown_grace_seconds
                log.info(
                    "shutdown 2/4: draining %d in-flight runs (grace %.0fs)",
                    scheduler.in_flight,
                    grace,
                )
                interrupted = await scheduler.drain(grace)
                if interrupted:
                    log.warning(
                        "interrupted %d runs; they will resume on the next daemon", interrupted
                    )
                with anyio.move_on_after(10):
                    await scheduler_done.wait()
                log.info("shutdown 3/4: stopping services")
                services.cancel()
                tg.cancel_scope.cancel()
            log.info("shutdown 4/4: closing connections")
        log.info("daemon %s stopped", self.owner)

    async def _open_connectors(
        self, stack: contextlib.AsyncExitStack
    ) -> Mapping[str, Connector] | None:
        """Open the configured connectors (retrying while they are unreachable)."""
        s = self.settings
        attempt = 0
        while not self._stop.is_set():
            try:
                opened: Mapping[str, Connector] = await stack.enter_async_context(
                    open_all(s.connectors, base_dir=s.base_dir)
                )
            except ConnectorError as exc:
                if not exc.retryable:
                    raise
                delay = backoff_delay(attempt)
                log.warning("%s; retrying in %.1fs", exc, delay)
                attempt += 1
                with anyio.move_on_after(delay):
                    await self._stop.wait()
            else:
                return opened
        return None

    async def _pump(self, source: Source) -> None:
        """Publish what a source connector announces (a file watcher, ...) to Kafka."""
        topic = self.settings.kafka.publish_topic
        attempt = 0
        while True:
            try:
                async with open_producer(self.settings) as producer:
                    attempt = 0
                    async for event in source.events():
                        await publish_event(producer, topic, event, self.telemetry.tracer)
            except BrokerError as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("connector %r: %s; retrying in %.1fs", source.name, exc, delay)
                await anyio.sleep(delay)
            else:
                return

    async def _notifications(self, store: Store, scheduler: Scheduler, relay: OutboxRelay) -> None:
        """LISTEN for runs created and cancels requested by other daemons or the CLI."""
        dsn = self.settings.postgres_dsn()
        attempt = 0

        def _on_cancel(payload: str) -> None:
            with contextlib.suppress(ValueError):
                scheduler.cancel_run(int(payload), "cancelled")

        while True:
            closed = anyio.Event()
            try:
                async with (
                    store.listen(store.runs_channel, lambda _p: scheduler.wake(), dsn) as conn,
                    store.listen(f"{store.schema}_cancel", _on_cancel, dsn) as conn2,
                    store.listen(store.outbox_channel, lambda _p: relay.wake(), dsn) as conn3,
                ):
                    attempt = 0
                    for c in (conn, conn2, conn3):
                        c.add_termination_listener(lambda _c, ev=closed: ev.set())
                    scheduler.wake()  # catch up on anything created while not listening
                    await closed.wait()
            except (StoreError, asyncpg.PostgresError, OSError) as exc:
                log.debug("LISTEN unavailable: %s", exc)
            await anyio.sleep(backoff_delay(attempt))
            attempt += 1
