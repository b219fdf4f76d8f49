"""Pipelines and their steps: what step authors declare.

A :class:`Pipeline` is a named set of ``async def`` steps registered with
:meth:`Pipeline.step`. The dependencies of a step are its ``depends_on`` entries plus the
names of its parameters after the context; those parameters receive the outputs of the
steps they name. Mistakes local to one step (not ``async``, no context parameter, a name
used twice) raise :class:`~orchestrator.errors.PipelineError` where the step is declared;
mistakes in the graph (an unknown dependency, a cycle) raise it from
:meth:`Pipeline.validate`, which the runner calls before the first run. Declaring steps does
no I/O.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar, overload

import msgspec

from orchestrator.errors import PipelineError
from orchestrator.pipeline.retry import RetryPolicy

__all__ = ["Pipeline", "Plan", "Step", "StepFunction"]

StepFunction = Callable[..., Awaitable[Any]]
"""An ``async def`` taking the step context, then one parameter per consumed upstream step."""

F = TypeVar("F", bound=StepFunction)

_log = logging.getLogger(__name__)

_CTX_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_INPUT_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One declared step (built by :meth:`Pipeline.step`)."""

    name: str
    fn: StepFunction
    depends_on: tuple[str, ...]
    """Every dependency: the ``depends_on`` entries first, then the input parameters."""
    inputs: tuple[str, ...]
    """Parameters after the context; each receives the output of the step it names."""
    retry: RetryPolicy | None
    """``None`` uses the runner's default policy."""
    timeout: float | None
    """Seconds per attempt; ``None`` uses the runner's default."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A validated pipeline, ready for the runner (see :meth:`Pipeline.plan`)."""

    pipeline: str
    steps: Mapping[str, Step]
    """The steps in declaration order."""
    order: tuple[str, ...]
    """A topological order: every step after its dependencies."""
    dependents: Mapping[str, tuple[str, ...]]
    """For each step, the steps that depend on it."""
    output_types: Mapping[str, Any]
    """Each step's return annotation (``Any`` when it has none or it cannot be resolved)."""
    decoders: Mapping[str, msgspec.json.Decoder[Any]]
    """Decoders of stored outputs, one per step, typed by ``output_types``."""


class Pipeline:
    """A named set of steps. Declare steps with :meth:`step`."""

    def __init__(self, name: str, *, description: str = "") -> None:
        if not isinstance(name, str) or not name.strip():
            raise PipelineError(f"a pipeline needs a non-empty name, got {name!r}")
        self.name = name
        self.description = description
        self._steps: dict[str, Step] = {}
        self._names_by_fn: dict[StepFunction, str | None] = {}
        self._plan: Plan | None = None

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, steps={list(self._steps)!r})"

    @property
    def steps(self) -> Mapping[str, Step]:
        """The declared steps by name, in declaration order (read-only)."""
        return MappingProxyType(self._steps)

    @overload
    def step(self, fn: F) -> F: ...

    @overload
    def step(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        depends_on: Iterable[str | StepFunction] | str = (),
        retry: RetryPolicy | int | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        depends_on: Iterable[str | StepFunction] | str = (),
        retry: RetryPolicy | int | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Declare a step; use as ``@pipeline.step`` or ``@pipeline.step(...)``.

        ``name`` defaults to the function's name. ``depends_on`` lists steps (names or step
        functions) that must succeed first without passing their output. ``retry`` is a
        :class:`RetryPolicy` or a number of attempts; ``None`` uses the runner's default.
        ``timeout`` is in seconds per attempt; ``None`` uses the runner's default and
        ``math.inf`` disables it. The function is returned unchanged.
        """

        def register(f: F) -> F:
            self._add(f, name=name, depends_on=depends_on, retry=retry, timeout=timeout)
            return f

        return register if fn is None else register(fn)

    def validate(self) -> None:
        """Raise :class:`PipelineError` if the pipeline cannot run (unknown dependency, cycle)."""
        self.plan()

    def plan(self) -> Plan:
        """The validated execution plan, built once and cached until a step is added."""
        if self._plan is None:
            self._plan = self._build_plan()
        return self._plan

    def _where(self, step: object) -> str:
        return f"pipeline {self.name!r} step {step!r}"

    def _add(
        self,
        fn: StepFunction,
        *,
        name: str | None,
        depends_on: Iterable[str | StepFunction] | str,
        retry: RetryPolicy | int | None,
        timeout: float | None,
    ) -> None:
        step_name = name if name is not None else getattr(fn, "__name__", None)
        where = self._where(step_name)
        if not isinstance(step_name, str) or not step_name:
            raise PipelineError(f"{where}: a step needs a non-empty name; pass name=...")
        if not inspect.iscoroutinefunction(fn):
            raise PipelineError(
                f"{where}: {fn!r} is not a coroutine function; declare the step with `async def`"
            )
        if step_name in self._steps:
            other = self._steps[step_name].fn
            raise PipelineError(
                f"{where}: the name is already taken by {other.__module__}.{other.__qualname__};"
                " pass name=... to one of them"
            )
        inputs = _inputs(fn, where)
        entries: Iterable[str | StepFunction] = (
            (depends_on,) if isinstance(depends_on, str) or callable(depends_on) else depends_on
        )
        explicit = [self._dependency_name(d, where) for d in entries]
        step = Step(
            name=step_name,
            fn=fn,
            depends_on=tuple(dict.fromkeys([*explicit, *inputs])),
            inputs=inputs,
            retry=_policy(retry, where),
            timeout=_timeout(timeout, where),
        )
        self._steps[step_name] = step
        self._names_by_fn[fn] = None if fn in self._names_by_fn else step_name
        self._plan = None

    def _dependency_name(self, dep: str | StepFunction, where: str) -> str:
        if isinstance(dep, str):
            if not dep:
                raise PipelineError(f"{where}: depends_on contains an empty step name")
            return dep
        if callable(dep):
            if dep not in self._names_by_fn:
                raise PipelineError(
                    f"{where}: depends_on names {getattr(dep, '__qualname__', dep)!r}, which is"
                    f" not a step of pipeline {self.name!r}; declare it first or pass its name"
                )
            found = self._names_by_fn[dep]
            if found is None:
                raise PipelineError(
                    f"{where}: depends_on names {getattr(dep, '__qualname__', dep)!r}, which is"
                    " declared as several steps; pass the step name instead"
                )
            return found
        raise PipelineError(
            f"{where}: depends_on entries must be step names or step functions, got {dep!r}"
        )

    def _build_plan(self) -> Plan:
        if not self._steps:
            raise PipelineError(f"pipeline {self.name!r} has no steps; declare one with @step")
        for step in self._steps.values():
            for dep in step.depends_on:
                if dep not in self._steps:
                    raise PipelineError(self._unknown(step, dep))
        order = _topological_order(self.name, self._steps)
        dependents: dict[str, list[str]] = {name: [] for name in self._steps}
        for step in self._steps.values():
            for dep in step.depends_on:
                dependents[dep].append(step.name)
        output_types = {s.name: self._output_type(s) for s in self._steps.values()}
        decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        for name, tp in output_types.items():
            try:
                msgspec.json.schema(tp)  # rejects types msgspec would need hooks for
                decoders[name] = msgspec.json.Decoder(tp)
            except TypeError as exc:
                reason = str(exc).rpartition("\n")[2]
                raise PipelineError(
                    f"{self._where(name)}: return annotation {tp!r} cannot be stored ({reason});"
                    " return msgspec-serializable values (Structs, dataclasses, dict, list,"
                    " str, int, float, bool, None, datetime, ...)"
                ) from None
        return Plan(
            pipeline=self.name,
            steps=MappingProxyType(dict(self._steps)),
            order=order,
            dependents=MappingProxyType({k: tuple(v) for k, v in dependents.items()}),
            output_types=MappingProxyType(output_types),
            decoders=MappingProxyType(decoders),
        )

    def _unknown(self, step: Step, dep: str) -> str:
        how = f"its parameter {dep!r}" if dep in step.inputs else f"depends_on {dep!r}"
        close = difflib.get_close_matches(dep, list(self._steps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(repr(s) for s in self._steps)
        return (
            f"{self._where(step.name)}: {how} names no step of the pipeline (steps: {known}){hint}"
        )

    def _output_type(self, step: Step) -> Any:
        try:
            hints = typing.get_type_hints(step.fn)
        except Exception as exc:  # annotations that do not resolve at run time
            _log.warning(
                "%s: return annotation not resolvable (%s); stored output decodes as plain JSON",
                self._where(step.name),
                exc,
            )
            return Any
        tp = hints.get("return", Any)
        return Any if tp is object else tp


def _inputs(fn: StepFunction, where: str) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: cannot read the function signature: {exc}") from None
    if not params or params[0].kind not in _CTX_KINDS:
        raise PipelineError(
            f"{where}: the first parameter must be the step context, as in"
            f" `async def {getattr(fn, '__name__', 'step')}(ctx: StepContext, ...)`"
        )
    inputs: list[str] = []
    for p in params[1:]:
        if p.kind not in _INPUT_KINDS:
            raise PipelineError(
                f"{where}: parameter {p.name!r} must be an ordinary named parameter"
                " (no *args, **kwargs or positional-only); each names an upstream step"
            )
        inputs.append(p.name)
    return tuple(inputs)


def _policy(retry: RetryPolicy | int | None, where: str) -> RetryPolicy | None:
    if retry is None or isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, int) and not isinstance(retry, bool):
        try:
            return RetryPolicy(max_attempts=retry)
        except PipelineError as exc:
            raise PipelineError(f"{where}: retry={retry!r}: {exc}") from None
    raise PipelineError(
        f"{where}: retry must be a RetryPolicy or a number of attempts, got {retry!r}"
    )


def _timeout(timeout: float | None, where: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise PipelineError(
            f"{where}: timeout must be a number of seconds > 0 (or None for the runner's"
            f" default), got {timeout!r}"
        )
    return float(timeout)


def _topological_order(pipeline: str, steps: Mapping[str, Step]) -> tuple[str, ...]:
    """Dependencies first, in declaration order otherwise; a cycle raises with its path."""
    done: set[str] = set()
    order: list[str] = []
    for root in steps:
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root}
        stack = [iter(steps[root].depends_on)]
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                order.append(finished)
            elif dep in on_path:
                cycle = [*path[path.index(dep) :], dep]
                raise PipelineError(
                    f"pipeline {pipeline!r} step {dep!r}: dependency cycle "
                    + " -> ".join(cycle)
                    + " (a -> b: a depends on b)"
                )
            elif dep not in done:
                path.append(dep)
                on_path.add(dep)
                stack.append(iter(steps[dep].depends_on))
    return tuple(order)
