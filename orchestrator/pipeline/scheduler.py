"""Claims runnable runs from Postgres and executes them under a capacity limit.

Ownership: a run is claimed with ``FOR UPDATE SKIP LOCKED`` and a lease that a heartbeat
renews. If the daemon dies, the lease expires and any daemon returns the run to the queue;
the resumed run skips steps whose success is recorded and continues the same trace (its
parent context is stored with the run).

Wake-ups are pushed, not polled: the local intake calls :meth:`Scheduler.wake`, other
daemons' inserts arrive by LISTEN/NOTIFY, and a timer at a third of the lease covers
expired leases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from orchestrator.backoff import backoff_delay
from orchestrator.config import RunnerSettings
from orchestrator.errors import PipelineError, StoreError
from orchestrator.health import Health
from orchestrator.pipeline.group_commit import OutcomeWriter
from orchestrator.pipeline.model import Pipeline
from orchestrator.pipeline.produced import announcement, produced_event
from orchestrator.pipeline.records import RunOutcome, RunSpec, StepRecord
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.pipeline.runner import Runner
from orchestrator.store import AttemptWrite, ClaimedRun, RunFinish, Store
from orchestrator.telemetry import Telemetry, context_from_traceparent

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

StopReason = Literal["cancelled", "interrupted", "lost"]


@dataclass(slots=True)
class _InFlight:
    run: ClaimedRun
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reason: StopReason | None = None
    first_step_seen: bool = False


class _StoreRecorder:
    """Records step attempts through the daemon's group-commit writer."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    async def step_started(
        self, run_id: int, step: str, attempt: int, started_at: datetime
    ) -> None:
        inflight = self._s._inflight.get(run_id)
        if inflight is not None and not inflight.first_step_seen:
            inflight.first_step_seen = True
            first = inflight.run.first_event_at
            if first is not None:
                latency = max(0.0, (started_at - first).total_seconds())
                self._s._tel.instruments.event_to_step_latency.record(
                    latency, {"pipeline": inflight.run.pipeline}
                )
        self._s.writer.add_attempt(
            AttemptWrite(
                run_id=run_id, step=step, attempt=attempt, status="running", started_at=started_at
            )
        )

    async def step_finished(self, record: StepRecord) -> None:
        self._s.writer.add_attempt(
            AttemptWrite(
                run_id=record.run_id,
                step=record.step,
                attempt=record.attempt,
                status=record.status,
                output=record.output,
                error=record.error,
                started_at=record.started_at,
                finished_at=record.finished_at,
                skipped=record.skipped,
            )
        )
        if record.status != "succeeded" or record.skipped:
            return
        inflight = self._s._inflight.get(record.run_id)
        if inflight is None:
            return
        topic = self._s.publish_topic
        for i, arrival in enumerate(record.emitted):
            self._s.writer.add_outbox(
                announcement(inflight.run, record.step, arrival, f"emit/{i}", topic)
            )
        pipeline = self._s._pipelines.get(inflight.run.pipeline)
        step = pipeline.steps.get(record.step) if pipeline else None
        if step is not None and step.produces:
            self._s.writer.add_outbox(produced_event(inflight.run, record, step.produces, topic))


class Scheduler:
    """Executes runs from the shared queue in Postgres; one per daemon."""

    def __init__(
        self,
        store: Store,
        pipelines: Mapping[str, Pipeline],
        telemetry: Telemetry,
        settings: RunnerSettings,
        health: Health,
        *,
        owner: str,
        connectors: Mapping[str, Any] | None = None,
        flow: bool = False,
        publish_topic: str = "arrivals",
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._pipelines = pipelines
        self._tel = telemetry
        self._settings = settings
        self._health = health
        self.owner = owner
        self._flow = flow
        self._pipeline_limits = {
            name: p.max_concurrent_runs
            for name, p in pipelines.items()
            if p.max_concurrent_runs is not None
        }
        self._connectors = connectors or {}
        self._inflight: dict[int, _InFlight] = {}
        self._wake = anyio.Event()
        self._claiming = True
        self._idle = anyio.Event()
        self._idle.set()
        self.publish_topic = publish_topic
        self.writer = OutcomeWriter(store, owner, health, on_lost=self._lost, on_outbox=on_outbox)
        self._runner = Runner(
            _StoreRecorder(self),
            tracer=telemetry.tracer,
            meter=telemetry.meter,
            default_timeout=settings.default_step_timeout,
            default_retry=RetryPolicy(max_attempts=settings.default_retries + 1),
        )
        self.completed = 0

    # -- control ------------------------------------------------------------------------

    def wake(self) -> None:
        """New runs may be waiting: claim now rather than at the next timer."""
        self._wake.set()

    def cancel_run(self, run_id: int, reason: StopReason = "cancelled") -> bool:
        inflight = self._inflight.get(run_id)
        if inflight is None:
            return False
        if inflight.reason is None:
            inflight.reason = reason
        inflight.scope.cancel()
        return True

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def drain(self, grace: float) -> int:
        """Stop claiming; let in-flight runs finish for ``grace`` seconds, then interrupt the
        rest (recorded as interrupted and returned to the queue). Returns how many were
        interrupted. Safe to call twice."""
        self._claiming = False
        self._wake.set()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        interrupted = 0
        for run_id in list(self._inflight):
            if self.cancel_run(run_id, "interrupted"):
                interrupted += 1
        with anyio.move_on_after(10, shield=True):
            await self._idle.wait()
        return interrupted

    def _lost(self, run_id: int) -> None:
        if run_id in self._inflight:
            log.warning("run %d: lease lost to another daemon; stopping it here", run_id)
            self.cancel_run(run_id, "lost")

    # -- loops --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            await tg.start(self.writer.run)
            task_status.started()
            await self._claim_loop(tg)
            # Claiming stopped: wait for the runs still executing, write what they recorded,
            # then stop the heartbeat and the writer.
            await self._idle.wait()
            with anyio.move_on_after(10, shield=True):
                await self.writer.flush()
            tg.cancel_scope.cancel()

    async def _claim_loop(self, tg: TaskGroup) -> None:
        attempt = 0
        while self._claiming:
            self._wake = anyio.Event()  # before looking: a wake-up from now on is not lost
            free = self._settings.max_concurrent_runs - len(self._inflight)
            claimed: list[ClaimedRun] = []
            wait = self._settings.lease_seconds / 3
            if free > 0:
                try:
                    claimed = await self._store.claim_runs(
                        self.owner,
                        free,
                        self._settings.lease_seconds,
                        flow=self._flow,
                        pipeline_limits=self._pipeline_limits,
                    )
                    if self._flow and len(claimed) < free:
                        wait = await self._until_due(wait)
                except StoreError as exc:
                    self._health.set("postgres", False, str(exc))
                    await anyio.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                attempt = 0
                self._health.set("postgres", True)
                for run in claimed:
                    self._inflight[run.id] = _InFlight(run)
                    self._idle = anyio.Event() if self._idle.is_set() else self._idle
                    tg.start_soon(self._execute, self._inflight[run.id])
                if len(claimed) == free:
                    continue  # the queue may hold more
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def _until_due(self, longest: float) -> float:
        """Seconds until the next debounced/batched run or deadline comes due."""
        due = await self._store.next_due()
        if due is None:
            return longest
        return max(0.0, min(longest, (due - datetime.now(UTC)).total_seconds() + 0.005))

    async def _heartbeat_loop(self) -> None:
        interval = self._settings.lease_seconds / 3
        while True:
            await anyio.sleep(interval)
            sent = list(self._inflight)
            try:
                held = await self._store.heartbeat(self.owner, sent, self._settings.lease_seconds)
                expired = await self._store.reclaim_expired()
            except StoreError as exc:
                self._health.set("postgres", False, str(exc))
                continue
            # Only the runs this heartbeat asked about: runs claimed meanwhile have a fresh lease.
            for run_id in sent:
                if run_id not in self._inflight:
                    continue
                if run_id not in held:
                    log.warning("run %d: lease lost to another daemon; stopping it here", run_id)
                    self.cancel_run(run_id, "lost")
                elif held[run_id]:
                    self.cancel_run(run_id, "cancelled")
            if expired:
                log.info("returned %d runs with expired leases to the queue", len(expired))
                self.wake()

    async def _retry(self, op: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await op()
            except StoreError as exc:
                if not exc.retryable:
                    raise
                self._health.set("postgres", False, str(exc))
                await anyio.sleep(backoff_delay(attempt))
                attempt += 1

    # -- one run --------------------------------------------------------------------------

    async def _execute(self, inflight: _InFlight) -> None:
        run = inflight.run
        inst = self._tel.instruments
        inst.runs_in_flight.add(1, {"pipeline": run.pipeline})
        try:
            await self._execute_traced(inflight)
        except Exception:
            log.exception("run %d: internal error; returning it to the queue", run.id)
            with anyio.move_on_after(5, shield=True):
                await self._store.release_run(run.id, self.owner)
        finally:
            inst.runs_in_flight.add(-1, {"pipeline": run.pipeline})
            if self._inflight.get(run.id) is inflight:  # not a newer claim of the same run
                del self._inflight[run.id]
            if not self._inflight:
                self._idle.set()
            self.wake()

    async def _execute_traced(self, inflight: _InFlight) -> None:
        run = inflight.run
        parent = context_from_traceparent(run.traceparent, run.tracestate)
        links = [
            Link(trace.get_current_span(context_from_traceparent(tp)).get_span_context())
            for tp in run.links
        ]
        tracer = self._tel.tracer
        with tracer.start_as_current_span(
            f"run {run.pipeline}",
            context=parent,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                "orchestrator.run_id": run.id,
                "orchestrator.rule": run.rule,
                "orchestrator.pipeline": run.pipeline,
                "orchestrator.claims": run.claims,
            },
        ) as span:
            pipeline = self._pipelines.get(run.pipeline)
            if pipeline is None:
                error = (
                    f"pipeline {run.pipeline!r} is not loaded by this daemon (rule {run.rule!r})"
                )
                span.set_status(Status(StatusCode.ERROR, error))
                await self._finish(run, "failed", None, error)
                return
            if run.cancel_requested:
                await self._finish(run, "cancelled", None, "cancelled by operator")
                return
            completed: Mapping[str, bytes] = {}
            prior: Mapping[str, int] = {}
            if run.claims > 1:  # resumed: skip what succeeded, continue attempt numbering
                completed, prior = await self._retry(lambda: self._store.resume_state(run.id))
            spec = RunSpec(
                run_id=run.id,
                pipeline=pipeline,
                events=run.events,
                params=run.params,
                completed=completed,
                prior_attempts=prior,
                connectors=self._connectors,
            )
            outcome: RunOutcome | None = None
            with inflight.scope:
                try:
                    pipeline.validate()
                except PipelineError as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    await self._finish(run, "failed", None, str(exc))
                    return
                outcome = await self._runner.execute(
                    spec,
                    cancel_status=lambda: (
                        "interrupted" if inflight.reason == "interrupted" else "cancelled"
                    ),
                )
            if outcome is None or inflight.scope.cancelled_caught:
                reason = inflight.reason or "interrupted"
                span.set_attribute("orchestrator.stopped", reason)
                if reason == "cancelled":
                    await self._finish(run, "cancelled", None, "cancelled by operator")
                elif reason == "interrupted":
                    with anyio.move_on_after(10, shield=True):
                        await self.writer.release(run.id)
                    log.info("run %d interrupted by shutdown; queued to resume", run.id)
                return
            if outcome.status == "failed":
                span.set_status(Status(StatusCode.ERROR, outcome.error or "failed"))
            await self._finish(run, outcome.status, outcome.failed_step, outcome.error)

    async def _finish(
        self, run: ClaimedRun, status: str, failed_step: str | None, error: str | None
    ) -> None:
        held = False
        with anyio.move_on_after(30, shield=True):
            held = await self.writer.finish(
                RunFinish(run_id=run.id, status=status, failed_step=failed_step, error=error)
            )
        if held:
            self.completed += 1
            self._tel.instruments.runs.add(1, {"status": status, "pipeline": run.pipeline})
            log.log(
                logging.INFO if status != "succeeded" else logging.DEBUG,
                "run %d %s (%s)%s",
                run.id,
                status,
                run.pipeline,
                f": {failed_step}: {error}" if error else "",
                extra={"run_id": run.id},
            )
        else:
            log.warning("run %d: finished here but its lease had been lost", run.id)
