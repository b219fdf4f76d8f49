"""Execute one run of a pipeline: its steps as a DAG, concurrent ones as tasks of a task group.

* When at most one step can be ready at a time (each pending step depends on the one before
  it and none is mapped: a chain), the steps run one after the other in the task that called
  :meth:`Runner.execute`, without a task group; otherwise each step that becomes ready
  while another is too gets a task of its own.

* Steps listed in ``RunSpec.completed`` are not run again; their stored outputs are decoded
  with the producing step's return annotation and passed on. So are items (``load[3]``) of
  a mapped step that did not finish.
* Every other step starts as soon as all its dependencies have succeeded; independent steps
  run concurrently. Its parameters receive the upstream outputs converted to their
  annotations (:mod:`~orchestrator.pipeline.dataflow`); a mismatch fails it, not retried.
* A step with ``skip_if`` asks it first; a skipped step records one ``succeeded`` attempt
  with output ``null`` and ``skipped=True``, and its dependents receive ``None``.
* A mapped step runs its function once per item of its ``map_over`` list, at most
  ``concurrency`` items at once, each item with its own attempts, retries and timeouts,
  recorded as ``load[3]``; then records its own output, the list of item outputs.
* Each attempt is recorded (``step_started``, then ``step_finished``), runs under its
  timeout inside a ``step <name>`` span, and is retried by its :class:`RetryPolicy`
  (:mod:`~orchestrator.pipeline.attempt`). When the tracer records no span at all (the
  API's no-op tracer, or an SDK tracer whose sampler is ``ALWAYS_OFF``) and the span current
  when :meth:`Runner.execute` is called is valid, unsampled and not recording (the run span
  of a daemon without an exporter), no step span is started: ``ctx.span`` is that span and
  its context stays current, so trace context injected by a step carries the run's trace
  and flags as a step span's would (only the span id differs).
* A step (or item) that fails for good fails the run: nothing new starts, steps and items
  already running finish, and :class:`RunOutcome` names the step. Step exceptions never
  leave :meth:`Runner.execute`.
* A pipeline ``timeout`` bounds the execution: when it passes, the attempts in flight are
  recorded ``failed`` and the run fails, naming a step that was in flight.
* Cancellation from outside records the attempts in flight as ``cancelled`` (or
  ``interrupted``, see ``cancel_status``) under a shielded, bounded call, then propagates.
* An error of the recorder stops the run (running steps are recorded ``interrupted``) and
  propagates from :meth:`Runner.execute`: the run stays unfinished, to be resumed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from orchestrator.pipeline.attempt import (
    ATTR_ATTEMPT,
    ATTR_INDEX,
    ATTR_ITEMS,
    ATTR_PIPELINE,
    ATTR_RUN_ID,
    ATTR_SKIPPED,
    ATTR_STATUS,
    ATTR_STEP,
    STEP_DURATION,
    Attempts,
    Call,
    Failed,
    Succeeded,
    describe,
)
from orchestrator.pipeline.context import StepContext
from orchestrator.pipeline.dataflow import (
    convert_input,
    convert_item,
    item_name,
    join_json,
    parse_item,
)
from orchestrator.pipeline.deadlines import Deadlines
from orchestrator.pipeline.model import DEFAULT_MAP_CONCURRENCY, Plan, Step
from orchestrator.pipeline.records import (
    CancelStatus,
    RunOutcome,
    RunRecorder,
    RunSpec,
    StepRecord,
    StepStatus,
)
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.telemetry import measures, skips_unsampled

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
    "CancelStatus",
    "RunOutcome",
    "RunRecorder",
    "RunSpec",
    "Runner",
    "StepRecord",
    "StepStatus",
    "describe",
]

_CANCEL_MESSAGES: Mapping[str, str] = {
    "cancelled": "cancelled while running",
    "interrupted": "interrupted while running (shutdown or lost persistence); runs again on resume",
}

_log = logging.getLogger(__name__)

_Items = dict[int, tuple[Any, bytes]]
"""Outputs of the items of a mapped step that succeeded: index -> (value, JSON)."""


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
        self.skips_unsampled = skips_unsampled(tracer)
        """Whether ``tracer`` records no span under an unsampled parent (decided once)."""
        self.default_timeout = default_timeout
        self.default_retry = default_retry or RetryPolicy()
        self.sleep = sleep
        self.clock = clock
        self.cleanup_timeout = cleanup_timeout
        self.duration = meter.create_histogram(
            STEP_DURATION, unit="s", description="Duration of one step attempt"
        )
        self.measures = measures(meter)
        """Whether durations are kept (not by the API's no-op meter): else none is taken."""
        self._deadlines: Deadlines | None = None

    def deadlines(self) -> Deadlines | None:
        """The step deadlines of the running event loop; ``None`` off asyncio (attempts'
        cancel scopes then keep their own deadlines)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        d = self._deadlines
        if d is None or d.loop is not loop:
            d = self._deadlines = Deadlines(loop)
        return d

    async def execute(
        self,
        spec: RunSpec,
        *,
        cancel_status: Callable[[], CancelStatus] = _cancelled,
        stand_in: trace.Span | None = None,
    ) -> RunOutcome:
        """Run the steps of ``spec`` that have not succeeded yet; return how the run ended.

        ``cancel_status`` is asked, when cancellation reaches an attempt in flight, whether to
        record it as ``"cancelled"`` (an operator cancel) or ``"interrupted"`` (a shutdown).
        ``stand_in``: the current span, when the caller knows it is valid, unsampled and not
        recording, so that this tracer would record no step span under it: the steps then
        start none and see it as their span (found out from the current context otherwise).
        Raises :class:`~orchestrator.errors.PipelineError` for an invalid pipeline, whatever
        the recorder raised, or the cancellation.
        """
        execution = _Execution(self, spec, spec.pipeline.plan(), cancel_status, stand_in)
        try:
            return await execution.run()
        finally:
            execution.close()


class _Execution:
    """The mutable state of one :meth:`Runner.execute` call."""

    def __init__(
        self,
        runner: Runner,
        spec: RunSpec,
        plan: Plan,
        cancel_status: Callable[[], CancelStatus],
        stand_in: trace.Span | None = None,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.plan = plan
        self.cancel_status = cancel_status
        self.outputs: dict[str, Any] = {}
        self.skipped: set[str] = set()
        self.resumed_items: dict[str, _Items] = {}
        self.waiting: dict[str, int] = {}
        self.failure: tuple[str, str] | None = None
        self.aborts: list[Exception] = []
        self.in_flight: dict[str, None] = {}
        """Steps started and not ended, oldest first (kept when cancellation stops them)."""
        self._ready: list[str] = []
        """Steps made ready by the success just recorded (taken at once by its task)."""
        self.attempts = Attempts(
            runner,
            spec,
            plan.pipeline,
            stop_status=self._stop_status,
            stopping=self._stopping,
            stand_in=stand_in,
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None

    def close(self) -> None:
        """Forget :attr:`attempts`, which calls back into this execution: without that
        reference cycle both are freed as the run returns, by reference counting, instead
        of by the cyclic garbage collector (whose passes over every run's objects cost the
        daemon a tenth of its CPU)."""
        del self.attempts

    def _where(self, step: str) -> str:
        return self.attempts.where(step)

    async def run(self) -> RunOutcome:
        completed, steps = self.spec.completed, self.plan.steps
        if completed:
            pending = [name for name in self.plan.order if name not in completed]
            failed = self._load_completed(pending)
            if failed is not None:
                return failed
            for name in pending:
                self.waiting[name] = sum(d not in completed for d in steps[name].depends_on)
        else:
            pending = list(self.plan.order)
            for name in pending:
                self.waiting[name] = len(steps[name].depends_on)
        timeout = self.spec.pipeline.timeout
        try:
            if not pending:
                pass
            elif _sequential(self.plan, pending):
                # One step ready at a time: run them here, without a task group.
                if timeout is None:
                    await self._run_step(pending[0])
                else:
                    deadline = anyio.current_time() + timeout
                    self.attempts.deadline = deadline
                    with anyio.CancelScope(deadline=deadline) as self._scope:
                        await self._run_step(pending[0])
            else:
                deadline = math.inf if timeout is None else anyio.current_time() + timeout
                self.attempts.deadline = deadline
                with anyio.CancelScope(deadline=deadline) as self._scope:
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
        if unfinished and self._timed_out():
            step = next(iter(self.in_flight), None)
            _log.warning(
                "run %s: %s (in flight: %s)",
                self.spec.run_id,
                self._timeout_message(),
                list(self.in_flight),
            )
            return RunOutcome("failed", step, self._timeout_message())
        if unfinished:  # cannot happen for a validated plan; never report a false success
            raise AssertionError(f"run {self.spec.run_id}: steps never started: {unfinished}")
        return RunOutcome("succeeded")

    def _load_completed(self, pending: list[str]) -> RunOutcome | None:
        """Decode the stored outputs that pending steps need; a failed outcome if one does not."""
        completed, steps = self.spec.completed, self.plan.steps
        needed = {d for n in pending for d in steps[n].depends_on if d in completed}
        for name in self.plan.order:
            if name not in needed:
                continue
            try:
                self.outputs[name] = self.plan.decoders[name].decode(completed[name])
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                if completed[name].strip() == b"null":  # recorded by a skipped step
                    self.outputs[name] = None
                    self.skipped.add(name)
                    continue
                error = (
                    f"stored output of step {name!r} does not decode as"
                    f" {self.plan.output_types[name]!r}: {exc}"
                )
                _log.error("%s: %s", self._where(name), error)
                return RunOutcome("failed", name, error)
        unknown: list[str] = []
        for key, raw in completed.items():
            if key in steps:
                continue
            item = parse_item(key)
            if item is None or item[0] not in steps or steps[item[0]].map_over is None:
                unknown.append(key)
            elif item[0] in pending:
                decoder = self.plan.item_decoders[item[0]]
                try:
                    value = decoder.decode(raw)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    error = f"stored output of item {key!r} does not decode: {exc}"
                    _log.error("%s: %s", self._where(key), error)
                    return RunOutcome("failed", key, error)
                self.resumed_items.setdefault(item[0], {})[item[1]] = (value, raw)
        if unknown:
            _log.info(
                "run %s: ignoring outputs of steps no longer declared: %s",
                self.spec.run_id,
                sorted(unknown),
            )
        return None

    def _start(self, name: str) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._run_step, name, name=f"step {name}")

    def _stopping(self) -> bool:
        return self.failure is not None or bool(self.aborts)

    def _timed_out(self) -> bool:
        """Whether the pipeline's timeout passed (its scope is cancelled by nothing else)."""
        return self._scope is not None and self._scope.cancel_called

    def _timeout_message(self) -> str:
        return f"run timed out after {self.spec.pipeline.timeout:g} s"

    def _stop_status(self) -> tuple[StepStatus, str]:
        """How to record an attempt that cancellation stops, and why."""
        if self.aborts:
            return "interrupted", _CANCEL_MESSAGES["interrupted"]
        if self._timed_out():
            return "failed", self._timeout_message()
        status = self.cancel_status()
        return status, _CANCEL_MESSAGES[status]

    def _abort(self, name: str, exc: Exception) -> None:
        _log.debug("%s: stopping the run, the recorder failed: %r", self._where(name), exc)
        self.aborts.append(exc)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _fail(self, name: str, error: str) -> None:
        if self.failure is None:
            self.failure = (name, error)

    def _succeeded(self, name: str, value: Any) -> None:
        self.outputs[name] = value
        for dependent in self.plan.dependents[name]:
            if dependent in self.waiting:
                self.waiting[dependent] -= 1
                if self.waiting[dependent] == 0 and not self._stopping():
                    self._ready.append(dependent)

    async def _run_step(self, name: str) -> None:
        """Run ``name``, then the steps its success made ready: the first in this task (a
        chain a -> b -> c costs one task, not three), the others in tasks of their own."""
        current: str | None = name
        while current is not None:
            step = self.plan.steps[current]
            self.in_flight[current] = None
            try:
                if step.skip_if is not None and await self._skip(step):
                    pass
                elif step.map_over is None:
                    await self._single(step)
                else:
                    await self._map(step)
            except Exception as exc:  # from the recorder: stop everything, re-raised by run()
                self._abort(current, exc)
                return
            del self.in_flight[current]
            # No await since this step's _succeeded: the ready list holds only its dependents.
            ready, self._ready = self._ready, []
            for other in ready[1:]:
                self._start(other)
            current = ready[0] if ready else None

    def _upstream(self, step: Step) -> Mapping[str, Any]:
        return MappingProxyType({d: self.outputs[d] for d in step.depends_on})

    def _inputs(self, step: Step) -> dict[str, Any]:
        """The step's parameters, converted to their annotations; raises NonRetryableError."""
        types = self.plan.input_types.get(step.name, {})
        inputs: dict[str, Any] = {}
        for param in step.inputs:
            value = self.outputs[param]
            if value is None and param in self.skipped:
                inputs[param] = None  # a skipped step's dependents receive None
            else:
                tp = types.get(param, Any)
                inputs[param] = convert_input(value, tp, step=step.name, param=param)
        return inputs

    async def _single(self, step: Step) -> None:
        try:
            inputs = self._inputs(step)
        except NonRetryableError as exc:
            call = _raising(exc)
        else:
            call = _calling(step, inputs)
        result = await self.attempts.retrying(step, step.name, call, self._upstream(step))
        if isinstance(result, Succeeded):
            self._succeeded(step.name, result.value)
        elif isinstance(result, Failed):
            self._fail(step.name, result.error)

    # -- skip conditions ---------------------------------------------------------------------

    async def _skip(self, step: Step) -> bool:
        """Ask ``skip_if``; when it says skip (or raises), record the attempt and say so."""
        if step.skip_if is None:
            return False
        name = step.name
        attempt = self.spec.prior_attempts.get(name, 0) + 1
        upstream = self._upstream(step)
        ctx = self.attempts.context(name, attempt, upstream, trace.INVALID_SPAN)
        try:
            decision = step.skip_if(ctx, **{p: self.outputs[p] for p in step.skip_inputs})
            if inspect.isawaitable(decision):
                if inspect.iscoroutine(decision):
                    decision.close()
                raise TypeError("it returned an awaitable; it must be a plain function")  # noqa: TRY301
            skip = bool(decision)
        except Exception as exc:
            error = NonRetryableError(
                f"skip_if of step {name!r} raised {type(exc).__qualname__}: {exc}"
            )
            error.__cause__ = exc
            result = await self.attempts.attempt(step, name, attempt, _raising(error), upstream)
            if isinstance(result, Failed):
                self._fail(name, result.error)
            return True
        if not skip:
            return False
        _log.info("%s: skipped by skip_if", self._where(name))
        result = await self.attempts.attempt(
            step, name, attempt, _returning_none, upstream, skipped=True
        )
        if isinstance(result, Succeeded):
            self.skipped.add(name)
            self._succeeded(name, None)
        else:
            self._fail(name, result.error)
        return True

    # -- fan-out ------------------------------------------------------------------------------

    async def _map(self, step: Step) -> None:
        """Run the items of a mapped step, then record the step's own outcome."""
        name, runner, attempts = step.name, self.runner, self.attempts
        attempt = self.spec.prior_attempts.get(name, 0) + 1
        started_at = runner.clock()
        upstream = self._upstream(step)
        items: Sequence[Any] = ()
        done: _Items = {}
        failures: list[tuple[int, str]] = []
        attributes = attempts.attributes(name, attempt)
        with runner.tracer.start_as_current_span(
            f"step {name}",
            context=attempts.parent,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                items = self._items(step)
                inputs = self._inputs(step)
            except NonRetryableError as exc:
                error = f"{type(exc).__qualname__}: {exc}"
                _log.warning("%s failed: %s", self._where(name), error)
                self._fail(name, error)
                await self._map_ended(span, name, attempt, started_at, error=error)
                return
            span.set_attribute(ATTR_ITEMS, len(items))
            done = {i: v for i, v in self.resumed_items.get(name, {}).items() if i < len(items)}
            parent = trace.set_span_in_context(span, attempts.parent)
            limit = anyio.Semaphore(step.concurrency or DEFAULT_MAP_CONCURRENCY)
            try:
                async with anyio.create_task_group() as tg:
                    for index, item in enumerate(items):
                        if index in done:
                            continue
                        await limit.acquire()
                        if self._stopping():
                            limit.release()
                            break
                        tg.start_soon(
                            self._item,
                            _Item(step, index, len(items), item, inputs, upstream, parent),
                            done,
                            failures,
                            limit,
                            name=f"step {item_name(name, index)}",
                        )
            except anyio.get_cancelled_exc_class():
                span.set_attribute(ATTR_STATUS, self._stop_status()[0])
                raise
            if failures:
                index, error = failures[0]
                await self._map_ended(
                    span, name, attempt, started_at, error=_item_error(index, len(items), error)
                )
                return
            if len(done) < len(items):  # stopped: the run failed elsewhere
                return
            ordered = [done[i] for i in range(len(items))]
            output = join_json(raw for _, raw in ordered)
            await self._map_ended(span, name, attempt, started_at, output=output)
        self._succeeded(name, [value for value, _ in ordered])

    def _items(self, step: Step) -> Sequence[Any]:
        assert step.map_over is not None
        source = self.outputs[step.map_over]
        if source is None and step.map_over in self.skipped:
            return ()  # a skipped step maps to nothing
        if not isinstance(source, list | tuple):
            raise NonRetryableError(
                f"step {step.name!r} maps over the output of step {step.map_over!r}, which is"
                f" {type(source).__qualname__}, not a list"
            )
        return source

    async def _item(
        self, item: _Item, done: _Items, failures: list[tuple[int, str]], limit: anyio.Semaphore
    ) -> None:
        step, index = item.step, item.index
        label = item_name(step.name, index)
        try:
            assert step.item is not None
            assert step.map_over is not None
            call: Call
            try:
                value = convert_item(
                    item.value,
                    self.plan.item_types.get(step.name, Any),
                    step=step.name,
                    source=step.map_over,
                    index=index,
                )
            except NonRetryableError as exc:
                call = _raising(exc)
            else:
                call = _calling(step, {**item.inputs, step.item: value})
            result = await self.attempts.retrying(
                step, label, call, item.upstream, index=index, parent=item.parent
            )
            if isinstance(result, Succeeded):
                done[index] = (result.value, result.output)
            elif isinstance(result, Failed):
                failures.append((index, result.error))
                self._fail(step.name, _item_error(index, item.count, result.error))
        except Exception as exc:  # from the recorder: stop everything, re-raised by run()
            self._abort(label, exc)
        finally:
            limit.release()

    async def _map_ended(
        self,
        span: trace.Span,
        name: str,
        attempt: int,
        started_at: datetime,
        *,
        output: bytes | None = None,
        error: str | None = None,
    ) -> None:
        """Record the mapped step's own outcome (``step_finished`` alone) on its span."""
        status: StepStatus = "failed" if error is not None else "succeeded"
        span.set_attribute(ATTR_STATUS, status)
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.partition("\n")[0]))
        record = self.attempts.record(name, attempt, status, started_at, output=output, error=error)
        await self.attempts.finished(record)


@dataclass(frozen=True, slots=True)
class _Item:
    """One item of a mapped step, with what every attempt of it needs."""

    step: Step
    index: int
    count: int
    """The number of items of the step."""
    value: Any
    inputs: Mapping[str, Any]
    """The step's other parameters, already converted."""
    upstream: Mapping[str, Any]
    parent: otel_context.Context
    """The context of the mapped step's span."""


def _sequential(plan: Plan, pending: Sequence[str]) -> bool:
    """Whether at most one of ``pending`` (in plan order) can be ready at any time: each
    depends on the one before it, and none is mapped (its items run concurrently)."""
    steps = plan.steps
    previous: str | None = None
    for name in pending:
        step = steps[name]
        if step.map_over is not None or (previous is not None and previous not in step.depends_on):
            return False
        previous = name
    return True


def _item_error(index: int, count: int, error: str) -> str:
    return f"item {index} of {count} failed: {error}"


def _calling(step: Step, inputs: Mapping[str, Any]) -> Call:
    def call(ctx: StepContext) -> Awaitable[Any]:
        return step.fn(ctx, **inputs)

    return call


def _raising(exc: Exception) -> Call:
    async def call(ctx: StepContext) -> Any:
        raise exc

    return call


async def _returning_none(ctx: StepContext) -> None:
    return None
