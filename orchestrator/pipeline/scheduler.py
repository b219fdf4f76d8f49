"""Executes runs under a capacity limit: runs the local intake created, and runs claimed
from the shared queue in Postgres.

Ownership: a run is held with a lease that a heartbeat renews. The intake creates the
simple runs it triggers already leased to this daemon and hands them over with their
events (:meth:`Scheduler.adopt`); every other run (flow control, pipeline limits, retries,
runs whose daemon died) is claimed with ``FOR UPDATE SKIP LOCKED``. If the daemon dies,
the lease expires and any daemon returns the run to the queue; the resumed run skips steps
whose success is recorded and continues the same trace (its parent context is stored with
the run).

Execution: ``max_concurrent_runs`` worker tasks take runs from a local queue, so starting
a run costs no task. Finished runs are written by the group-commit writer; a worker moves on
without waiting for the write, and the run counts as finished once it is durable.

Wake-ups are pushed, not polled: the local intake calls :meth:`Scheduler.wake` when it
queued runs for any daemon, other daemons' inserts arrive by LISTEN/NOTIFY, and a timer at
a third of the lease covers expired leases.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from orchestrator.backoff import backoff_delay
from orchestrator.config import RunnerSettings
from orchestrator.errors import PipelineError, StoreError
from orchestrator.health import Health
from orchestrator.pipeline.group_commit import OutcomeWriter
from orchestrator.pipeline.model import Pipeline, Step
from orchestrator.pipeline.produced import announcement, produced_event
from orchestrator.pipeline.records import RunSpec, StepRecord
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.pipeline.runner import Runner
from orchestrator.store import AttemptWrite, ClaimedRun, RunFinish, Store
from orchestrator.store.batch import RunOwner
from orchestrator.telemetry import (
    Telemetry,
    context_from_traceparent,
    span_context_from_traceparent,
    trace_id_and_flags,
    unsampled,
)

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

StopReason = Literal["cancelled", "interrupted", "lost"]

_SLICE = 0.01
"""Seconds a worker executes runs back to back before it yields to the event loop."""


@dataclass(slots=True)
class _InFlight:
    run: ClaimedRun
    claimed: bool = False
    """Taken from the shared queue (not handed over by the local intake)."""
    reason: StopReason | None = None
    first_step_seen: bool = False
    finishing: bool = False
    """Its outcome is queued for the writer; the run leaves once that is durable."""
    scope: anyio.CancelScope | None = None
    """The cancel scope of the worker executing it, while it executes."""


class _StoreRecorder:
    """Records step attempts through the daemon's group-commit writer."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    async def step_started(
        self, run_id: int, step: str, attempt: int, started_at: datetime
    ) -> None:
        instruments = self._s._tel.instruments
        inflight = self._s._inflight.get(run_id) if instruments.measuring else None
        if inflight is not None and not inflight.first_step_seen:
            inflight.first_step_seen = True
            first = inflight.run.first_event_at
            if first is not None:
                latency = max(0.0, (started_at - first).total_seconds())
                instruments.event_to_step_latency.record(
                    latency, {"pipeline": inflight.run.pipeline}
                )
        self._s.writer.add_attempt(
            AttemptWrite(
                run_id=run_id, step=step, attempt=attempt, status="running", started_at=started_at
            )
        )

    async def step_finished(self, record: StepRecord) -> None:
        self._s.writer.add_attempt(record)  # the record is the attempt's row
        if (
            record.status != "succeeded"
            or record.skipped
            or not (record.emitted or record.step in self._s._producing)
        ):
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
        # The plan's steps: ``Pipeline.steps`` makes a read-only view at each call.
        step = pipeline.plan().steps.get(record.step) if pipeline else None
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
        self._producing = frozenset(
            name
            for pipeline in pipelines.values()
            for name, step in _steps(pipeline).items()
            if step.produces
        )
        """Names of steps that announce what they produce (in any pipeline)."""
        self._inflight: dict[int, _InFlight] = {}
        """Runs held here: queued, executing, or finished and not yet durable."""
        self._queue: deque[_InFlight] = deque()
        """Runs held here that no worker has started."""
        self._busy = 0
        """Workers executing a run."""
        self._idle_workers: deque[anyio.Event] = deque()
        """One event per worker waiting for a run: a new run wakes one worker, not all."""
        self._room = anyio.Event()
        self._room.set()
        self._wake = anyio.Event()
        self._more = True
        """The shared queue may hold runs for us: a claim is worth making."""
        self._claiming = True
        self._idle = anyio.Event()
        self._idle.set()
        self.publish_topic = publish_topic
        self.writer = OutcomeWriter(
            store,
            owner,
            health,
            on_lost=self._lost,
            on_outbox=on_outbox,
            on_finished=self._finished,
            notify_finished=flow or bool(self._pipeline_limits),
        )
        self._runner = Runner(
            _StoreRecorder(self),
            tracer=telemetry.tracer,
            meter=telemetry.meter,
            default_timeout=settings.default_step_timeout,
            default_retry=RetryPolicy(max_attempts=settings.default_retries + 1),
        )
        self._recording = telemetry.recording
        self._skips_unsampled = telemetry.skips_unsampled
        self.completed = 0
        telemetry.instruments.observe_in_flight(self._in_flight_by_pipeline)

    # -- control ------------------------------------------------------------------------

    @property
    def run_owner(self) -> RunOwner:
        """How the local intake creates runs for this scheduler (see :meth:`adopt`)."""
        return RunOwner(
            name=self.owner,
            lease_seconds=self._settings.lease_seconds,
            accepts=lambda p: p in self._pipelines and p not in self._pipeline_limits,
        )

    def adopt(self, runs: Sequence[ClaimedRun]) -> None:
        """Execute runs the local intake created leased to this daemon."""
        for run in runs:
            self._enqueue(run)

    async def room(self) -> None:
        """Return once fewer than ``runner.queue_depth`` runs wait for a worker."""
        while len(self._queue) >= self._settings.queue_depth:
            self._room = anyio.Event()
            await self._room.wait()

    def wake(self) -> None:
        """New runs may be waiting in the shared queue: claim now, not at the next timer."""
        self._more = True
        self._wake.set()

    def cancel_run(self, run_id: int, reason: StopReason = "cancelled") -> bool:
        inflight = self._inflight.get(run_id)
        if inflight is None or inflight.finishing:
            return False
        if inflight.reason is None:
            inflight.reason = reason
        if inflight.scope is not None:  # executing; a queued run stops when a worker takes it
            inflight.scope.cancel()
        return True

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _in_flight_by_pipeline(self) -> Iterable[tuple[str, int]]:
        counts = Counter(i.run.pipeline for i in self._inflight.values() if not i.finishing)
        for pipeline in self._pipelines:
            counts.setdefault(pipeline, 0)
        return counts.items()

    async def drain(self, grace: float) -> int:
        """Stop claiming and give back the runs no worker started; let the executing runs
        finish for ``grace`` seconds, then interrupt the rest (recorded as interrupted and
        returned to the queue). Returns how many were interrupted. Safe to call twice."""
        self._claiming = False
        self._wake.set()
        waiting = [i for i in self._queue]
        self._queue.clear()
        self._room.set()
        if waiting:
            with anyio.move_on_after(10, shield=True):
                await self.writer.release(i.run.id for i in waiting)
            for i in waiting:
                self._forget(i)
            log.info("returned %d runs not yet started to the queue", len(waiting))
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

    def _claimed_waiting(self) -> int:
        """Claimed runs not started yet (they are at the front of the queue)."""
        n = 0
        for inflight in self._queue:
            if not inflight.claimed:
                break
            n += 1
        return n

    def _enqueue(self, run: ClaimedRun, *, front: bool = False) -> None:
        inflight = _InFlight(run, claimed=front)
        self._inflight[run.id] = inflight
        if front:
            self._queue.appendleft(inflight)
        else:
            self._queue.append(inflight)
        if self._idle.is_set():
            self._idle = anyio.Event()
        if self._idle_workers:
            self._idle_workers.popleft().set()

    def _forget(self, inflight: _InFlight) -> None:
        run_id = inflight.run.id
        if self._inflight.get(run_id) is inflight:  # not a newer claim of the same run
            del self._inflight[run_id]
        if not self._inflight:
            self._idle.set()

    # -- loops --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            await tg.start(self.writer.run)
            async with anyio.create_task_group() as workers:
                for _ in range(self._settings.max_concurrent_runs):
                    workers.start_soon(self._worker)
                task_status.started()
                await self._claim_loop()
                # Claiming stopped: wait for the runs still executing and for their
                # outcomes to be written, then stop the workers, heartbeat and writer.
                await self._idle.wait()
                workers.cancel_scope.cancel()
            with anyio.move_on_after(10, shield=True):
                await self.writer.flush()
            tg.cancel_scope.cancel()

    async def _worker(self) -> None:
        """Execute queued runs one after another, in one cancel scope for as long as no run
        is stopped (a scope per run would cost as much as a trivial step): :meth:`cancel_run`
        cancels the scope of the worker executing the run, and the worker, once the scope
        has exited, records the stop and goes on in a new scope."""
        queue = self._queue
        backend = anyio.lowlevel.current_token().backend_class
        new_event, new_scope = backend.create_event, backend.create_cancel_scope
        clock = time.monotonic
        slice_ends = clock() + _SLICE
        while True:
            stopped: _InFlight | None = None
            with new_scope() as scope:
                while True:
                    if not queue:
                        woken = new_event()
                        self._idle_workers.append(woken)
                        await woken.wait()
                        slice_ends = clock() + _SLICE
                        continue
                    inflight = queue.popleft()
                    if len(queue) < self._settings.queue_depth:
                        self._room.set()
                    stopped = inflight
                    if inflight.reason is not None:  # stopped while it waited in the queue
                        break
                    inflight.scope = scope
                    self._busy += 1
                    try:
                        await self._execute(inflight)
                    finally:
                        self._busy -= 1
                        inflight.scope = None
                    stopped = None
                    if self._more:
                        self._wake.set()  # a worker is free and the shared queue may hold more
                    if scope.cancel_called:
                        # Stopped after its last await: the run ended anyway. The next run
                        # must not receive the cancellation: leave this scope before any await.
                        break
                    await self.writer.room()
                    if clock() >= slice_ends:
                        # Runs whose steps never wait would keep the event loop to themselves:
                        # let the writer, the intake and the heartbeat in.
                        await anyio.lowlevel.checkpoint()
                        slice_ends = clock() + _SLICE
            if stopped is not None:
                await self._stopped(stopped)
                if self._more:
                    self._wake.set()  # as after any run: this worker is free again

    async def _claim_loop(self) -> None:
        attempt = 0
        while self._claiming:
            self._wake = anyio.Event()  # before looking: a wake-up from now on is not lost
            # Claim what free workers can start; claimed runs go to the front of the queue,
            # so runs the local intake keeps handing over cannot starve them.
            free = self._settings.max_concurrent_runs - self._busy - self._claimed_waiting()
            claimed: list[ClaimedRun] = []
            wait = self._settings.lease_seconds / 3
            if free > 0 and self._more:
                self._more = False
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
                    self._more = True
                    self._health.set("postgres", False, str(exc))
                    await anyio.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                attempt = 0
                self._health.set("postgres", True)
                for run in reversed(claimed):
                    self._enqueue(run, front=True)
                if len(claimed) == free:
                    self._more = True  # the queue may hold more
                    continue
            elif free > 0 and self._flow:
                wait = await self._until_due(wait)
            with anyio.move_on_after(wait):
                await self._wake.wait()
            if not self._wake.is_set():
                self._more = True  # the timer: look again (expired leases, due runs)

    async def _until_due(self, longest: float) -> float:
        """Seconds until the next debounced/batched run or deadline comes due."""
        try:
            due = await self._store.next_due()
        except StoreError:
            return longest
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
                    if self._inflight[run_id].finishing:
                        continue  # its outcome was written meanwhile
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
        try:
            # A run of an unsampled trace gets the span a non-recording tracer would start,
            # when the tracer would record nothing under it anyway.
            if self._recording and not (self._skips_unsampled and unsampled(run.traceparent)):
                await self._execute_traced(inflight)
            else:
                span = _unrecorded_run_span(run)
                token = otel_context.attach(trace.set_span_in_context(span, otel_context.Context()))
                try:
                    await self._execute_in(inflight, span, unrecorded=True)
                finally:
                    otel_context.detach(token)
        except Exception:
            log.exception("run %d: internal error; returning it to the queue", run.id)
            with anyio.move_on_after(5, shield=True):
                try:
                    await self._store.release_run(run.id, self.owner)
                except StoreError as exc:  # its lease expires instead
                    log.warning("run %d: could not return it to the queue: %s", run.id, exc)
            inflight.finishing = False
        if not inflight.finishing:
            self._forget(inflight)

    async def _execute_traced(self, inflight: _InFlight) -> None:
        run = inflight.run
        parent = context_from_traceparent(run.traceparent, run.tracestate)
        links = [
            Link(trace.get_current_span(context_from_traceparent(tp)).get_span_context())
            for tp in run.links
        ]
        with self._tel.tracer.start_as_current_span(
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
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self._execute_in(inflight, span)
            except Exception as exc:  # as the tracer would record it; a stop is no error
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise

    async def _execute_in(
        self, inflight: _InFlight, span: trace.Span, *, unrecorded: bool = False
    ) -> None:
        """Execute the run in ``span``; ``unrecorded``: a span of :func:`_unrecorded_run_span`
        (the steps then start none)."""
        run = inflight.run
        pipeline = self._pipelines.get(run.pipeline)
        if pipeline is None:
            error = f"pipeline {run.pipeline!r} is not loaded by this daemon (rule {run.rule!r})"
            span.set_status(Status(StatusCode.ERROR, error))
            self._finish(inflight, "failed", None, error)
            return
        if run.cancel_requested:
            self._finish(inflight, "cancelled", None, "cancelled by operator")
            return
        completed: Mapping[str, bytes] = {}
        prior: Mapping[str, int] = {}
        try:
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
            try:
                pipeline.validate()
            except PipelineError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self._finish(inflight, "failed", None, str(exc))
                return
            outcome = await self._runner.execute(
                spec,
                cancel_status=lambda: (
                    "interrupted" if inflight.reason == "interrupted" else "cancelled"
                ),
                stand_in=span if unrecorded else None,
            )
        except anyio.get_cancelled_exc_class():
            # Stopped by cancel_run: the worker records the stop once its scope has exited.
            span.set_attribute("orchestrator.stopped", inflight.reason or "interrupted")
            raise
        if outcome.status == "failed":
            span.set_status(Status(StatusCode.ERROR, outcome.error or "failed"))
        self._finish(inflight, outcome.status, outcome.failed_step, outcome.error)

    async def _stopped(self, inflight: _InFlight) -> None:
        """Record the end of a run :meth:`cancel_run` stopped, executing or queued: cancelled
        (by an operator), returned to the queue (interrupted by a shutdown), or nothing more
        (its lease was lost to another daemon)."""
        run = inflight.run
        reason = inflight.reason or "interrupted"
        if reason == "cancelled":
            self._finish(inflight, "cancelled", None, "cancelled by operator")
        elif reason == "interrupted":
            with anyio.move_on_after(10, shield=True):
                await self.writer.release([run.id])
            log.info("run %d interrupted by shutdown; queued to resume", run.id)
        if not inflight.finishing:
            self._forget(inflight)

    def _finish(
        self, inflight: _InFlight, status: str, failed_step: str | None, error: str | None
    ) -> None:
        """Queue the run's outcome; :meth:`_finished` hears when it is durable."""
        inflight.finishing = True
        self.writer.finish(
            RunFinish(
                run_id=inflight.run.id,
                status=status,
                failed_step=failed_step,
                error=error,
            )
        )

    def _finished(self, results: list[tuple[RunFinish, bool]]) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        measuring = self._tel.instruments.measuring
        for outcome, held in results:
            inflight = self._inflight.get(outcome.run_id)
            if inflight is None or not inflight.finishing:
                continue
            run = inflight.run
            self._forget(inflight)
            if not held:
                log.warning("run %d: finished here but its lease had been lost", run.id)
                continue
            self.completed += 1
            if measuring:
                counts[(outcome.status, run.pipeline)] += 1
            if outcome.status != "succeeded":
                log.info(
                    "run %d %s (%s)%s",
                    run.id,
                    outcome.status,
                    run.pipeline,
                    f": {outcome.failed_step}: {outcome.error}" if outcome.error else "",
                    extra={"run_id": run.id},
                )
        for (status, pipeline), n in counts.items():
            self._tel.instruments.runs.add(n, {"status": status, "pipeline": pipeline})


_ids = RandomIdGenerator()


def _unrecorded_run_span(run: ClaimedRun) -> trace.Span:
    """The run span a tracer that never records would start (see ``Telemetry.recording``
    and ``Telemetry.skips_unsampled``):
    in the triggering event's trace (a new one if it has none), with a span id of its own
    and the sampled flag cleared. Built directly; steps of the run use it as their span."""
    common = None if run.tracestate else trace_id_and_flags(run.traceparent)
    state: trace.TraceState | None = None
    if common is not None:  # read directly: no parent span context to build
        trace_id, flags = common
    else:
        parent = span_context_from_traceparent(run.traceparent, run.tracestate)
        trace_id, flags = parent.trace_id, int(parent.trace_flags)
        state = parent.trace_state
        if not parent.is_valid:
            trace_id, flags = _ids.generate_trace_id(), trace.TraceFlags.DEFAULT
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=trace_id,
            span_id=_ids.generate_span_id(),
            is_remote=False,
            trace_flags=trace.TraceFlags(flags & ~trace.TraceFlags.SAMPLED),
            trace_state=state,
        )
    )


def _steps(pipeline: Pipeline) -> Mapping[str, Step]:
    """The steps of ``pipeline``'s plan; none when it has no valid plan (its runs fail)."""
    try:
        return pipeline.plan().steps
    except PipelineError:
        return {}
