"""Execute one run of a pipeline: its steps as a DAG of tasks in one task group.

* Steps listed in ``RunSpec.completed`` are not run again; their stored outputs are decoded
  with the producing step's return annotation and passed on.
* Every other step starts as soon as all its dependencies have succeeded; independent steps
  run concurrently.
* Each attempt is recorded (``step_started``, then ``step_finished``), runs under its
  timeout inside a ``step <name>`` span, and is retried by its :class:`RetryPolicy`.
* A step that fails for good fails the run: nothing new starts, steps already running finish,
  and :class:`RunOutcome` names the step. Step exceptions never leave :meth:`Runner.execute`.
* Cancellation from outside records the attempts in flight as ``cancelled`` (or
  ``interrupted``, see ``cancel_status``) under a shielded, bounded call, then propagates.
* An error of the recorder stops the run (running steps are recorded ``interrupted``) and
  propagates from :meth:`Runner.execute`: the run stays unfinished, to be resumed.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import anyio
import anyio.abc
import msgspec
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from orchestrator.errors import NonRetryableError
from orchestrator.pipeline.context import StepContext
from orchestrator.pipeline.model import Plan, Step
from orchestrator.pipeline.records import (
    CancelStatus,
    RunOutcome,
    RunRecorder,
    RunSpec,
    StepRecord,
    StepStatus,
)
from orchestrator.pipeline.retry import RetryPolicy

__all__ = [
    "ATTR_ATTEMPT",
    "ATTR_PIPELINE",
    "ATTR_RUN_ID",
    "ATTR_STATUS",
    "ATTR_STEP",
    "STEP_DURATION",
    "CancelStatus",
    "RunOutcome",
    "RunRecorder",
    "RunSpec",
    "Runner",
    "StepRecord",
    "StepStatus",
]

STEP_DURATION = "orchestrator.step.duration"
ATTR_RUN_ID = "orchestrator.run_id"
ATTR_PIPELINE = "orchestrator.pipeline"
ATTR_STEP = "orchestrator.step"
ATTR_ATTEMPT = "orchestrator.attempt"
ATTR_STATUS = "orchestrator.step.status"

_ERROR_LIMIT = 4000
_TRACEBACK_FRAMES = 3
_CANCEL_MESSAGES: Mapping[str, str] = {
    "cancelled": "cancelled while running",
    "interrupted": "interrupted while running (shutdown or lost persistence); runs again on resume",
}

_log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _cancelled() -> CancelStatus:
    return "cancelled"


class Runner:
    """Executes runs; one instance serves any number of concurrent runs."""

    def __init__(
        self,
        recorder: RunRecorder,
        *,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        default_timeout: float | None = 300.0,
        default_retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], datetime] = _utcnow,
        cleanup_timeout: float = 5.0,
    ) -> None:
        """``default_timeout`` (seconds, ``None`` = none) and ``default_retry`` (one attempt
        when ``None``) apply to steps that set no timeout or retry. ``sleep`` waits out retry
        backoffs and ``clock`` stamps records (both injectable for tests).
        ``cleanup_timeout`` bounds the shielded recording of cancelled attempts."""
        self.recorder = recorder
        self.tracer = tracer
        self.default_timeout = default_timeout
        self.default_retry = default_retry or RetryPolicy()
        self.sleep = sleep
        self.clock = clock
        self.cleanup_timeout = cleanup_timeout
        self.duration = meter.create_histogram(
            STEP_DURATION, unit="s", description="Duration of one step attempt"
        )

    async def execute(
        self, spec: RunSpec, *, cancel_status: Callable[[], CancelStatus] = _cancelled
    ) -> RunOutcome:
        """Run the steps of ``spec`` that have not succeeded yet; return how the run ended.

        ``cancel_status`` is asked, when cancellation reaches an attempt in flight, whether to
        record it as ``"cancelled"`` (an operator cancel) or ``"interrupted"`` (a shutdown).
        Raises :class:`~orchestrator.errors.PipelineError` for an invalid pipeline, whatever
        the recorder raised, or the cancellation.
        """
        return await _Execution(self, spec, spec.pipeline.plan(), cancel_status).run()


@dataclass(frozen=True, slots=True)
class _Succeeded:
    value: Any


@dataclass(frozen=True, slots=True)
class _Failed:
    exc: Exception
    error: str


class _Execution:
    """The mutable state of one :meth:`Runner.execute` call."""

    def __init__(
        self,
        runner: Runner,
        spec: RunSpec,
        plan: Plan,
        cancel_status: Callable[[], CancelStatus],
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.plan = plan
        self.cancel_status = cancel_status
        self.parent = otel_context.get_current()
        self.params = MappingProxyType(dict(spec.params))
        self.connectors = MappingProxyType(dict(spec.connectors))
        self.outputs: dict[str, Any] = {}
        self.waiting: dict[str, int] = {}
        self.failure: tuple[str, str] | None = None
        self.aborts: list[Exception] = []
        self._tg: anyio.abc.TaskGroup | None = None

    def _where(self, step: str) -> str:
        return f"run {self.spec.run_id} pipeline {self.plan.pipeline!r} step {step!r}"

    async def run(self) -> RunOutcome:
        completed = self.spec.completed
        pending = [name for name in self.plan.order if name not in completed]
        needed = {d for n in pending for d in self.plan.steps[n].depends_on if d in completed}
        for name in self.plan.order:
            if name in needed:
                try:
                    self.outputs[name] = self.plan.decoders[name].decode(completed[name])
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    error = (
                        f"stored output of step {name!r} does not decode as"
                        f" {self.plan.output_types[name]!r}: {exc}"
                    )
                    _log.error("%s: %s", self._where(name), error)
                    return RunOutcome("failed", name, error)
        unknown = set(completed) - set(self.plan.steps)
        if unknown:
            _log.info(
                "run %s: ignoring outputs of steps no longer declared: %s",
                self.spec.run_id,
                sorted(unknown),
            )
        for name in pending:
            self.waiting[name] = sum(d not in completed for d in self.plan.steps[name].depends_on)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for name in pending:
                    if self.waiting[name] == 0:
                        self._start(name)
        except anyio.get_cancelled_exc_class():
            for err in self.aborts:
                _log.error("run %s: recorder failed: %r", self.spec.run_id, err)
            raise
        except BaseExceptionGroup as group:  # only non-Exception errors get here
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._tg = None
        if self.aborts:
            first, *rest = self.aborts
            for other in rest:
                first.add_note(f"the recorder also failed with {other!r}")
            raise first
        if self.failure is not None:
            return RunOutcome("failed", *self.failure)
        unfinished = [n for n in pending if n not in self.outputs]
        if unfinished:  # cannot happen for a validated plan; never report a false success
            raise AssertionError(f"run {self.spec.run_id}: steps never started: {unfinished}")
        return RunOutcome("succeeded")

    def _start(self, name: str) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._run_step, name, name=f"step {name}")

    def _stopping(self) -> bool:
        return self.failure is not None or bool(self.aborts)

    def _abort(self, name: str, exc: Exception) -> None:
        _log.debug("%s: stopping the run, the recorder failed: %r", self._where(name), exc)
        self.aborts.append(exc)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _run_step(self, name: str) -> None:
        try:
            await self._attempts(self.plan.steps[name])
        except Exception as exc:  # from the recorder: stop everything, re-raised by run()
            self._abort(name, exc)

    async def _attempts(self, step: Step) -> None:
        policy = step.retry or self.runner.default_retry
        inputs = {p: self.outputs[p] for p in step.inputs}
        upstream = MappingProxyType({d: self.outputs[d] for d in step.depends_on})
        prior = self.spec.prior_attempts.get(step.name, 0)
        tries = 0
        while True:
            tries += 1
            result = await self._attempt(step, prior + tries, inputs, upstream)
            if isinstance(result, _Succeeded):
                self._succeeded(step.name, result.value)
                return
            where = f"{self._where(step.name)} attempt {prior + tries}"
            if not policy.should_retry(result.exc, tries):
                _log.warning("%s failed: %s", where, result.error)
                if self.failure is None:
                    self.failure = (step.name, result.error)
                return
            if self._stopping():
                _log.info("%s failed; not retried, the run is already failing", where)
                return
            delay = policy.delay(tries)
            _log.info("%s failed, retrying in %.3gs: %s", where, delay, result.error)
            await self.runner.sleep(delay)
            if self._stopping():
                return

    def _succeeded(self, name: str, value: Any) -> None:
        self.outputs[name] = value
        for dependent in self.plan.dependents[name]:
            if dependent in self.waiting:
                self.waiting[dependent] -= 1
                if self.waiting[dependent] == 0 and not self._stopping():
                    self._start(dependent)

    async def _attempt(
        self, step: Step, attempt: int, inputs: dict[str, Any], upstream: Mapping[str, Any]
    ) -> _Succeeded | _Failed:
        runner, run_id = self.runner, self.spec.run_id
        started_at = runner.clock()
        t0 = anyio.current_time()
        try:
            await runner.recorder.step_started(run_id, step.name, attempt, started_at)
        except anyio.get_cancelled_exc_class():
            await self._record_cancelled(step.name, attempt, started_at, t0)
            raise
        attributes: dict[str, str | int] = {
            ATTR_RUN_ID: run_id,
            ATTR_PIPELINE: self.plan.pipeline,
            ATTR_STEP: step.name,
            ATTR_ATTEMPT: attempt,
        }
        result: _Succeeded | _Failed
        with runner.tracer.start_as_current_span(
            f"step {step.name}",
            context=self.parent,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            ctx = StepContext.create(
                run_id=run_id,
                pipeline=self.plan.pipeline,
                step=step.name,
                attempt=attempt,
                events=self.spec.events,
                params=self.params,
                upstream=upstream,
                connectors=self.connectors,
                span=span,
            )
            try:
                value = await self._call(step, ctx, inputs)
                output = _encode(step.name, value)
            except anyio.get_cancelled_exc_class():
                status = await self._record_cancelled(step.name, attempt, started_at, t0)
                span.set_attribute(ATTR_STATUS, status)
                raise
            except Exception as exc:
                error = describe(exc)
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.partition("\n")[0]))
                span.set_attribute(ATTR_STATUS, "failed")
                result = _Failed(exc, error)
                record = self._record(step.name, attempt, "failed", started_at, error=error)
            else:
                span.set_attribute(ATTR_STATUS, "succeeded")
                result = _Succeeded(value)
                record = self._record(step.name, attempt, "succeeded", started_at, output=output)
        self._observe(step.name, record.status, t0)
        try:
            await runner.recorder.step_finished(record)
        except anyio.get_cancelled_exc_class():
            await self._record_shielded(record)
            raise
        return result

    async def _call(self, step: Step, ctx: StepContext, inputs: dict[str, Any]) -> Any:
        timeout = step.timeout if step.timeout is not None else self.runner.default_timeout
        if timeout is None or math.isinf(timeout):
            return await step.fn(ctx, **inputs)
        try:
            with anyio.fail_after(timeout) as scope:
                return await step.fn(ctx, **inputs)
        except TimeoutError:
            if scope.cancelled_caught:  # our deadline, not a TimeoutError from the step
                raise TimeoutError(
                    f"step {step.name!r} did not finish within {timeout:g}s"
                ) from None
            raise

    def _record(
        self,
        step: str,
        attempt: int,
        status: StepStatus,
        started_at: datetime,
        *,
        output: bytes | None = None,
        error: str | None = None,
    ) -> StepRecord:
        return StepRecord(
            run_id=self.spec.run_id,
            step=step,
            attempt=attempt,
            status=status,
            output=output,
            error=error,
            started_at=started_at,
            finished_at=self.runner.clock(),
        )

    async def _record_cancelled(
        self, step: str, attempt: int, started_at: datetime, t0: float
    ) -> CancelStatus:
        status: CancelStatus = "interrupted" if self.aborts else self.cancel_status()
        record = self._record(step, attempt, status, started_at, error=_CANCEL_MESSAGES[status])
        self._observe(step, status, t0)
        await self._record_shielded(record)
        return status

    async def _record_shielded(self, record: StepRecord) -> None:
        """Record an attempt while cancellation is pending: shielded, bounded, never raising."""
        timeout = self.runner.cleanup_timeout
        with anyio.move_on_after(timeout, shield=True) as scope:
            try:
                await self.runner.recorder.step_finished(record)
            except Exception:
                _log.exception(
                    "%s attempt %d: could not record status %r",
                    self._where(record.step),
                    record.attempt,
                    record.status,
                )
        if scope.cancelled_caught:
            _log.error(
                "%s attempt %d: recording status %r took longer than %gs; gave up",
                self._where(record.step),
                record.attempt,
                record.status,
                timeout,
            )

    def _observe(self, step: str, status: StepStatus, t0: float) -> None:
        attrs = {ATTR_PIPELINE: self.plan.pipeline, ATTR_STEP: step, ATTR_STATUS: status}
        self.runner.duration.record(max(anyio.current_time() - t0, 0.0), attrs)


def _encode(step: str, value: Any) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise NonRetryableError(
            f"step {step!r} returned {type(value).__qualname__}, which is not"
            f" msgspec-serializable ({exc}); return a Struct, dataclass, dict, list or scalar"
        ) from exc


def describe(exc: BaseException) -> str:
    """``"ExcType: message"`` followed by the innermost frames of the traceback."""
    text = str(exc)
    head = f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__
    frames = traceback.extract_tb(exc.__traceback__)[-_TRACEBACK_FRAMES:]
    tail = "".join(traceback.format_list(frames)).rstrip()
    full = f"{head}\n{tail}" if tail else head
    return full if len(full) <= _ERROR_LIMIT else full[: _ERROR_LIMIT - 3] + "..."
