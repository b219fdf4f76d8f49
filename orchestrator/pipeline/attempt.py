"""Attempts: one call of a step function (or of one item of a mapped step), recorded and traced.

An attempt is recorded (``step_started``, then ``step_finished``), runs under the step's
timeout inside a ``step <name>`` span, and is retried by the step's :class:`RetryPolicy`.
When cancellation reaches an attempt in flight, it is recorded under a shielded, bounded
call with the status the execution chooses (``cancelled``, ``interrupted``, or ``failed``
when the run timed out), then the cancellation propagates.

An attempt whose timeout would end after the run's own deadline gets no cancel scope of its
own: the run's fires first, and the attempt is recorded ``failed`` for the run's timeout.
Nor does a step whose function never waits (no ``await``, ``async with`` or ``async for``;
:mod:`orchestrator.pipeline.suspension`): nothing could interrupt it.
"""

from __future__ import annotations

import logging
import math
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace

from orchestrator.errors import NonRetryableError
from orchestrator.events import Arrival
from orchestrator.pipeline.context import StepContext
from orchestrator.pipeline.model import Step
from orchestrator.pipeline.records import RunSpec, StepRecord, StepStatus

if TYPE_CHECKING:
    from orchestrator.pipeline.deadlines import Deadlines
    from orchestrator.pipeline.runner import Runner

__all__ = [
    "ATTR_ATTEMPT",
    "ATTR_INDEX",
    "ATTR_ITEMS",
    "ATTR_PIPELINE",
    "ATTR_RUN_ID",
    "ATTR_SKIPPED",
    "ATTR_STATUS",
    "ATTR_STEP",
    "STEP_DURATION",
    "Attempts",
    "Call",
    "Failed",
    "Succeeded",
    "describe",
]

STEP_DURATION = "orchestrator.step.duration"
ATTR_RUN_ID = "orchestrator.run_id"
ATTR_PIPELINE = "orchestrator.pipeline"
ATTR_STEP = "orchestrator.step"
ATTR_ATTEMPT = "orchestrator.attempt"
ATTR_STATUS = "orchestrator.step.status"
ATTR_SKIPPED = "orchestrator.step.skipped"
ATTR_INDEX = "orchestrator.step.index"
"""The item's index, on the span of an item of a mapped step."""
ATTR_ITEMS = "orchestrator.step.items"
"""The number of items, on the span of a mapped step."""

_ERROR_LIMIT = 4000
_TRACEBACK_FRAMES = 3

_log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_monotonic = time.monotonic
"""Times attempts for the duration histogram."""
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_DURATION_ATTRIBUTES: dict[tuple[str, str, str], Mapping[str, str]] = {}
"""Histogram attributes by (pipeline, step, status), shared by every attempt."""
_DURATION_ATTRIBUTES_LIMIT = 10_000
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
"""A JSON ``\\u0000`` escape: not itself an escaped backslash followed by ``u0000``."""

Call = Callable[[StepContext], Awaitable[Any]]
"""Calls the step function with the context and its prepared inputs."""


class Succeeded(msgspec.Struct, frozen=True):
    value: Any
    output: bytes
    """``value`` as JSON, as recorded."""


class Failed(msgspec.Struct, frozen=True):
    exc: Exception
    error: str


@dataclass(frozen=True, slots=True)
class _Timing:
    """What attempts' timeouts need from the running event loop."""

    now: Callable[[], float]
    """``anyio.current_time`` of the running backend."""
    cancel_scope: Callable[..., anyio.CancelScope]
    """``anyio.CancelScope`` of the running backend, without looking it up at each call."""
    deadlines: Deadlines | None
    """Shared step deadlines (:meth:`Runner.deadlines`); ``None`` off asyncio."""


class Attempts:
    """Runs and records the attempts of one execution of a run."""

    def __init__(
        self,
        runner: Runner,
        spec: RunSpec,
        pipeline: str,
        *,
        stop_status: Callable[[], tuple[StepStatus, str]],
        stopping: Callable[[], bool],
        stand_in: trace.Span | None = None,
    ) -> None:
        """``stop_status`` says how to record an attempt that cancellation stopped (status and
        error); ``stopping`` whether the run is failing, so that nothing is retried.
        ``stand_in``: the current span, when the caller knows it can stand in for the
        attempts' spans (see :func:`_stand_in`); else that is found out here."""
        self.runner = runner
        self.spec = spec
        self.pipeline = pipeline
        self.parent = otel_context.get_current()
        self.stop_status = stop_status
        self.stopping = stopping
        self._events = tuple(spec.events)
        self._params = _frozen(spec.params)
        self._connectors = _frozen(spec.connectors)
        self.quiet_span = (
            stand_in
            if stand_in is not None and runner.skips_unsampled
            else _stand_in(runner.skips_unsampled, self.parent)
        )
        """The parent's span when it stands in for the attempts' spans (see
        :func:`_stand_in`): attempts then start no span, and it stays current."""
        self.deadline = math.inf
        """The run's deadline (``anyio.current_time()`` clock), set once its scope exists."""
        self._timing: _Timing | None = None
        """Looked up by the first attempt with a timeout scope (a run whose steps never
        wait needs none)."""

    def where(self, label: str) -> str:
        return f"run {self.spec.run_id} pipeline {self.pipeline!r} step {label!r}"

    def context(
        self,
        label: str,
        attempt: int,
        upstream: Mapping[str, Any],
        span: trace.Span,
        index: int | None = None,
    ) -> StepContext:
        """The attempt's context; ``upstream`` must be read-only already (not copied)."""
        return StepContext(
            run_id=self.spec.run_id,
            pipeline=self.pipeline,
            step=label,
            attempt=attempt,
            events=self._events,
            params=self._params,
            upstream=upstream,
            connectors=self._connectors,
            span=span,
            map_index=index,
        )

    def attributes(self, label: str, attempt: int) -> dict[str, str | int | bool]:
        return {
            ATTR_RUN_ID: self.spec.run_id,
            ATTR_PIPELINE: self.pipeline,
            ATTR_STEP: label,
            ATTR_ATTEMPT: attempt,
        }

    async def retrying(
        self,
        step: Step,
        label: str,
        call: Call,
        upstream: Mapping[str, Any],
        *,
        index: int | None = None,
        parent: otel_context.Context | None = None,
    ) -> Succeeded | Failed | None:
        """Attempt until success, a failure not to retry, or the run failing (``None``)."""
        policy = step.retry or self.runner.default_retry
        prior = self.spec.prior_attempts.get(label, 0)
        tries = 0
        while True:
            tries += 1
            result = await self.attempt(
                step, label, prior + tries, call, upstream, index=index, parent=parent
            )
            if isinstance(result, Succeeded):
                return result
            where = f"{self.where(label)} attempt {prior + tries}"
            if not policy.should_retry(result.exc, tries):
                _log.warning("%s failed: %s", where, result.error)
                return result
            if self.stopping():
                _log.info("%s failed; not retried, the run is already failing", where)
                return None
            delay = policy.delay(tries)
            _log.info("%s failed, retrying in %.3gs: %s", where, delay, result.error)
            await self.runner.sleep(delay)
            if self.stopping():
                return None

    async def attempt(
        self,
        step: Step,
        label: str,
        attempt: int,
        call: Call,
        upstream: Mapping[str, Any],
        *,
        index: int | None = None,
        parent: otel_context.Context | None = None,
        skipped: bool = False,
    ) -> Succeeded | Failed:
        """One recorded, traced attempt of ``call`` under the step's timeout."""
        runner, run_id = self.runner, self.spec.run_id
        started_at = runner.clock()
        t0 = _monotonic()
        try:
            await runner.recorder.step_started(run_id, label, attempt, started_at)
        except anyio.get_cancelled_exc_class():
            await self._record_stopped(step.name, label, attempt, started_at, t0)
            raise
        quiet = self.quiet_span
        if quiet is not None:  # no span to start: the current one stands in
            span = quiet if parent is None else trace.get_current_span(parent)
            result, record = await self._run(
                step, label, attempt, call, upstream, span, started_at, t0, index, skipped
            )
        else:
            attributes = self.attributes(label, attempt)
            if index is not None:
                attributes[ATTR_INDEX] = index
            if skipped:
                attributes[ATTR_SKIPPED] = True
            with runner.tracer.start_as_current_span(
                f"step {label}",
                context=self.parent if parent is None else parent,
                kind=trace.SpanKind.INTERNAL,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                result, record = await self._run(
                    step, label, attempt, call, upstream, span, started_at, t0, index, skipped
                )
        self.observe(step.name, record.status, t0)
        await self.finished(record)
        return result

    async def _run(
        self,
        step: Step,
        label: str,
        attempt: int,
        call: Call,
        upstream: Mapping[str, Any],
        span: trace.Span,
        started_at: datetime,
        t0: float,
        index: int | None,
        skipped: bool,
    ) -> tuple[Succeeded | Failed, StepRecord]:
        """Call the step in ``span``; the outcome and its record (cancellation propagates)."""
        ctx = self.context(label, attempt, upstream, span, index)
        try:
            value = await self._call(step, label, ctx, call)
            output = _encode(label, value)
        except anyio.get_cancelled_exc_class():
            status, error = await self._record_stopped(step.name, label, attempt, started_at, t0)
            span.set_attribute(ATTR_STATUS, status)
            if status == "failed":
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
            raise
        except Exception as exc:
            error = describe(exc)
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.partition("\n")[0]))
            span.set_attribute(ATTR_STATUS, "failed")
            return Failed(exc, error), self.record(
                label, attempt, "failed", started_at, error=error
            )
        span.set_attribute(ATTR_STATUS, "succeeded")
        record = self.record(
            label,
            attempt,
            "succeeded",
            started_at,
            output=output,
            skipped=skipped,
            emitted=tuple(ctx.emitted),
        )
        return Succeeded(value, output), record

    async def _call(self, step: Step, label: str, ctx: StepContext, call: Call) -> Any:
        timeout = step.timeout if step.timeout is not None else self.runner.default_timeout
        if timeout is None or math.isinf(timeout) or step.never_waits:
            return await call(ctx)  # nothing to time out, or nothing a timeout could stop
        timing = self._timing or self._time()
        deadline = timing.now() + timeout
        if self.deadline < deadline:  # the run's own scope fires first: the attempt's is moot
            return await call(ctx)
        deadlines = timing.deadlines
        if deadlines is None:
            with timing.cancel_scope(deadline=deadline):
                return await call(ctx)
        else:
            scope = timing.cancel_scope()
            key = deadlines.add(scope, deadline)
            try:
                with scope:
                    return await call(ctx)
            finally:
                deadlines.discard(scope, key)
        # Only its deadline cancels this scope, and the scope swallowed that cancellation.
        raise TimeoutError(f"step {label!r} did not finish within {timeout:g}s")

    def _time(self) -> _Timing:
        backend = anyio.lowlevel.current_token().backend_class
        self._timing = _Timing(
            backend.current_time, backend.create_cancel_scope, self.runner.deadlines()
        )
        return self._timing

    def record(
        self,
        label: str,
        attempt: int,
        status: StepStatus,
        started_at: datetime,
        *,
        output: bytes | None = None,
        error: str | None = None,
        skipped: bool = False,
        emitted: tuple[Arrival, ...] = (),
    ) -> StepRecord:
        return StepRecord(
            run_id=self.spec.run_id,
            step=label,
            attempt=attempt,
            status=status,
            output=output,
            error=error,
            started_at=started_at,
            finished_at=self.runner.clock(),
            skipped=skipped,
            emitted=emitted,
        )

    async def finished(self, record: StepRecord) -> None:
        """``step_finished``; made again under a shield if cancellation interrupts it."""
        try:
            await self.runner.recorder.step_finished(record)
        except anyio.get_cancelled_exc_class():
            await self.shielded(record)
            raise

    async def _record_stopped(
        self, step: str, label: str, attempt: int, started_at: datetime, t0: float
    ) -> tuple[StepStatus, str]:
        status, error = self.stop_status()
        record = self.record(label, attempt, status, started_at, error=error)
        self.observe(step, status, t0)
        await self.shielded(record)
        return status, error

    async def shielded(self, record: StepRecord) -> None:
        """Record an attempt while cancellation is pending: shielded, bounded, never raising."""
        timeout = self.runner.cleanup_timeout
        with anyio.move_on_after(timeout, shield=True) as scope:
            try:
                await self.runner.recorder.step_finished(record)
            except Exception:
                _log.exception(
                    "%s attempt %d: could not record status %r",
                    self.where(record.step),
                    record.attempt,
                    record.status,
                )
        if scope.cancelled_caught:
            _log.error(
                "%s attempt %d: recording status %r took longer than %gs; gave up",
                self.where(record.step),
                record.attempt,
                record.status,
                timeout,
            )

    def observe(self, step: str, status: StepStatus, t0: float) -> None:
        """Record the duration; ``step`` is the declared name (never an item's ``load[3]``)."""
        if not self.runner.measures:
            return
        key = (self.pipeline, step, status)
        attrs = _DURATION_ATTRIBUTES.get(key)
        if attrs is None:
            attrs = {ATTR_PIPELINE: self.pipeline, ATTR_STEP: step, ATTR_STATUS: status}
            if len(_DURATION_ATTRIBUTES) < _DURATION_ATTRIBUTES_LIMIT:
                _DURATION_ATTRIBUTES[key] = attrs
        self.runner.duration.record(max(_monotonic() - t0, 0.0), attrs)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping)) if mapping else _EMPTY


def _stand_in(skips: bool, parent: otel_context.Context) -> trace.Span | None:
    """The span of ``parent`` when it can stand in for the spans the runner's tracer would
    start in that context, else ``None``.

    It can when the tracer records no span under an unsampled parent (``skips``: the API's
    no-op tracer, an SDK tracer whose sampler is ``ALWAYS_OFF``, or the SDK's parent-based
    samplers; see :func:`~orchestrator.telemetry.skips_unsampled`) and the parent span is
    valid, not recording and not sampled: the spans started would then carry the same
    trace, the same (unsampled) flags and trace state, and differ only in their span id.
    """
    if not skips:
        return None
    span = trace.get_current_span(parent)
    context = span.get_span_context()
    if not context.is_valid or context.trace_flags.sampled or span.is_recording():
        return None
    return span


def _encode(step: str, value: Any) -> bytes:
    try:
        output = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise NonRetryableError(
            f"step {step!r} returned {type(value).__qualname__}, which is not"
            f" msgspec-serializable ({exc}); return a Struct, dataclass, dict, list or scalar"
        ) from exc
    if b"\\u0000" in output and _NUL_ESCAPE.search(output):
        # Postgres' jsonb refuses it, and the row would hold up every row written with it.
        raise NonRetryableError(
            f"step {step!r} returned a string with a NUL character (\\u0000), which Postgres"
            " cannot store; remove it, or return binary data encoded (base64)"
        )
    return output


def describe(exc: BaseException) -> str:
    """``"ExcType: message"`` followed by the innermost frames of the traceback."""
    text = str(exc)
    head = f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__
    frames = traceback.extract_tb(exc.__traceback__)[-_TRACEBACK_FRAMES:]
    tail = "".join(traceback.format_list(frames)).rstrip()
    full = f"{head}\n{tail}" if tail else head
    return full if len(full) <= _ERROR_LIMIT else full[: _ERROR_LIMIT - 3] + "..."
