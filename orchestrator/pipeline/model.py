"""Pipelines and their steps: what step authors declare.

A :class:`Pipeline` is a named set of ``async def`` steps registered with
:meth:`Pipeline.step`. The dependencies of a step are its ``depends_on`` entries, its
``map_over`` step, the names of its parameters after the context (and after the item, for a
mapped step) and the names of its ``skip_if`` parameters after the context; parameters
receive the outputs of the steps they name. Mistakes local to one step (not ``async``, no
context parameter, a name used twice) raise :class:`~orchestrator.errors.PipelineError`
where the step is declared; mistakes in the graph (an unknown dependency, a cycle, mapping
over a step that does not return a list) raise it from :meth:`Pipeline.validate`, which the
runner calls before the first run. Declaring steps does no I/O.
"""

from __future__ import annotations

import difflib
import inspect
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar, overload

import msgspec

from orchestrator.errors import PipelineError
from orchestrator.pipeline import dataflow
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.pipeline.suspension import never_waits

__all__ = ["DEFAULT_MAP_CONCURRENCY", "Pipeline", "Plan", "SkipCondition", "Step", "StepFunction"]

StepFunction = Callable[..., Awaitable[Any]]
"""An ``async def`` taking the step context, then one parameter per consumed upstream step."""

SkipCondition = Callable[..., object]
"""A plain function taking the step context, then one parameter per upstream step it reads;
a true result skips the step."""

F = TypeVar("F", bound=StepFunction)

DEFAULT_MAP_CONCURRENCY = 8
"""Items of a mapped step in flight at once when the step sets no ``concurrency``."""

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
    map_over: str | None = None
    """The step whose list this step maps over, one call per item; ``None``: not mapped."""
    item: str | None = None
    """The parameter that receives one item (mapped steps only)."""
    concurrency: int | None = None
    """Items in flight at once (mapped steps only)."""
    skip_if: SkipCondition | None = None
    """Called before the first attempt; a true result skips the step."""
    skip_inputs: tuple[str, ...] = ()
    """Parameters of ``skip_if`` after the context; each receives the output it names."""
    produces: str | None = None
    """Dataset this step produces: on success an arrival event for it is published."""
    never_waits: bool = False
    """Its function has no ``await``, ``async with`` or ``async for``: it cannot be
    interrupted, and runs without a timeout scope (see :mod:`.suspension`)."""


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


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
    """Each step's return annotation (``Any`` when it has none or it cannot be resolved);
    ``list[R]`` for a mapped step whose function returns ``R``."""
    decoders: Mapping[str, msgspec.json.Decoder[Any]]
    """Decoders of stored outputs, one per step, typed by ``output_types``."""
    input_types: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)
    """For each step, the annotation of each input parameter (``Any``: not converted)."""
    item_types: Mapping[str, Any] = field(default_factory=_empty)
    """For each mapped step, the annotation of its item parameter."""
    item_decoders: Mapping[str, msgspec.json.Decoder[Any]] = field(default_factory=_empty)
    """For each mapped step, the decoder of one item's stored output."""


class Pipeline:
    """A named set of steps. Declare steps with :meth:`step`."""

    def __init__(
        self,
        name: str,
        *,
        description: str = "",
        timeout: float | None = None,
        max_concurrent_runs: int | None = None,
    ) -> None:
        """``timeout``: seconds a run may take, each execution counted alone (``None``: no
        limit). ``max_concurrent_runs``: runs of this pipeline executing at once across the
        daemons (``None``: only the daemon's own limit); enforced by the scheduler."""
        if not isinstance(name, str) or not name.strip():
            raise PipelineError(f"a pipeline needs a non-empty name, got {name!r}")
        where = f"pipeline {name!r}"
        self.name = name
        self.description = description
        self._timeout = _timeout(timeout, where, "no limit")
        if max_concurrent_runs is not None and (
            isinstance(max_concurrent_runs, bool)
            or not isinstance(max_concurrent_runs, int)
            or max_concurrent_runs < 1
        ):
            raise PipelineError(
                f"{where}: max_concurrent_runs must be an integer >= 1 (or None for no limit"
                f" of its own), got {max_concurrent_runs!r}"
            )
        self._max_concurrent_runs = max_concurrent_runs
        self._steps: dict[str, Step] = {}
        self._names_by_fn: dict[StepFunction, str | None] = {}
        self._plan: Plan | None = None

    @property
    def timeout(self) -> float | None:
        """Seconds one execution of a run may take; ``None``: no limit."""
        return self._timeout

    @property
    def max_concurrent_runs(self) -> int | None:
        """Runs of this pipeline executing at once; ``None``: no limit of its own."""
        return self._max_concurrent_runs

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
        map_over: str | StepFunction | None = None,
        concurrency: int | None = None,
        skip_if: SkipCondition | None = None,
        produces: str | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        depends_on: Iterable[str | StepFunction] | str = (),
        retry: RetryPolicy | int | None = None,
        timeout: float | None = None,
        map_over: str | StepFunction | None = None,
        concurrency: int | None = None,
        skip_if: SkipCondition | None = None,
        produces: str | None = None,
    ) -> F | Callable[[F], F]:
        """Declare a step; use as ``@pipeline.step`` or ``@pipeline.step(...)``.

        ``name`` defaults to the function's name. ``depends_on`` lists steps (names or step
        functions) that must succeed first without passing their output. ``retry`` is a
        :class:`RetryPolicy` or a number of attempts; ``None`` uses the runner's default.
        ``timeout`` is in seconds per attempt; ``None`` uses the runner's default and
        ``math.inf`` disables it. ``map_over`` names a step returning a list: the function
        then takes one item after the context and runs once per item, at most
        ``concurrency`` (default :data:`DEFAULT_MAP_CONCURRENCY`) at once; its output is the
        list of item outputs. ``skip_if`` is a plain function of the context (and of upstream
        outputs, by parameter name) whose true result skips the step. ``produces`` names
        the dataset the step produces: when it succeeds, an arrival event for that dataset
        is published through the outbox (see ``docs/pipelines.md``). The function is
        returned unchanged.
        """

        def register(f: F) -> F:
            self._add(
                f,
                name=name,
                depends_on=depends_on,
                retry=retry,
                timeout=timeout,
                map_over=map_over,
                concurrency=concurrency,
                skip_if=skip_if,
                produces=produces,
            )
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
        map_over: str | StepFunction | None,
        concurrency: int | None,
        skip_if: SkipCondition | None,
        produces: str | None = None,
    ) -> None:
        step_name = name if name is not None else getattr(fn, "__name__", None)
        where = self._where(step_name)
        if not isinstance(step_name, str) or not step_name:
            raise PipelineError(f"{where}: a step needs a non-empty name; pass name=...")
        if dataflow.parse_item(step_name) is not None:
            raise PipelineError(
                f"{where}: names ending in [n] are reserved for the items of mapped steps;"
                " pass another name=..."
            )
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
        inputs = _parameters(fn, where, what="step")
        entries: Iterable[str | StepFunction] = (
            (depends_on,) if isinstance(depends_on, str) or callable(depends_on) else depends_on
        )
        explicit = [self._dependency_name(d, where) for d in entries]
        source: str | None = None
        item: str | None = None
        if map_over is not None:
            source = self._dependency_name(map_over, where, option="map_over")
            if not inputs:
                raise PipelineError(
                    f"{where}: a mapped step takes one item after the context, as in"
                    f" `async def {step_name}(ctx: StepContext, item: Item) -> Result`"
                )
            item, *rest = inputs
            inputs = tuple(rest)
        elif concurrency is not None:
            raise PipelineError(
                f"{where}: concurrency bounds the items of a mapped step; pass map_over=... too"
            )
        skip_inputs = _skip_inputs(skip_if, where)
        step = Step(
            name=step_name,
            fn=fn,
            depends_on=tuple(
                dict.fromkeys([*explicit, *([source] if source else []), *inputs, *skip_inputs])
            ),
            inputs=inputs,
            retry=_policy(retry, where),
            timeout=_timeout(timeout, where),
            map_over=source,
            item=item,
            concurrency=_concurrency(concurrency, where) if source else None,
            skip_if=skip_if,
            skip_inputs=skip_inputs,
            produces=_dataset(produces, where),
            never_waits=never_waits(fn),
        )
        self._steps[step_name] = step
        self._names_by_fn[fn] = None if fn in self._names_by_fn else step_name
        self._plan = None

    def _dependency_name(
        self, dep: str | StepFunction, where: str, *, option: str = "depends_on"
    ) -> str:
        if isinstance(dep, str):
            if not dep:
                what = "contains" if option == "depends_on" else "is"
                raise PipelineError(f"{where}: {option} {what} an empty step name")
            return dep
        if callable(dep):
            if dep not in self._names_by_fn:
                raise PipelineError(
                    f"{where}: {option} names {getattr(dep, '__qualname__', dep)!r}, which is"
                    f" not a step of pipeline {self.name!r}; declare it first or pass its name"
                )
            found = self._names_by_fn[dep]
            if found is None:
                raise PipelineError(
                    f"{where}: {option} names {getattr(dep, '__qualname__', dep)!r}, which is"
                    " declared as several steps; pass the step name instead"
                )
            return found
        what = "entries must be" if option == "depends_on" else "must be"
        raise PipelineError(f"{where}: {option} {what} step names or step functions, got {dep!r}")

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
        output_types: dict[str, Any] = {}
        decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        input_types: dict[str, Mapping[str, Any]] = {}
        item_types: dict[str, Any] = {}
        item_decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        for step in self._steps.values():
            where = self._where(step.name)
            found = dataflow.hints(step.fn, where)
            returns = found.get("return", Any)
            returns = Any if returns is object else returns
            input_types[step.name] = MappingProxyType(
                {
                    p: dataflow.usable_input_type(found.get(p, Any), f"{where} parameter {p!r}")
                    for p in step.inputs
                }
            )
            if step.item is None:
                output_types[step.name] = returns
                decoders[step.name] = self._decoder(step.name, returns)
                continue
            item_decoders[step.name] = self._decoder(step.name, returns)
            output_types[step.name] = types.GenericAlias(list, (returns,))
            decoders[step.name] = msgspec.json.Decoder(output_types[step.name])
            item_types[step.name] = dataflow.usable_input_type(
                found.get(step.item, Any), f"{where} item parameter {step.item!r}"
            )
        for step in self._steps.values():
            tp = output_types[step.map_over] if step.map_over is not None else Any
            if not dataflow.is_list_type(tp):
                raise PipelineError(
                    f"{self._where(step.name)}: map_over {step.map_over!r} names a step that"
                    f" returns {dataflow.type_name(tp)}, not a list; annotate step"
                    f" {step.map_over!r} with `-> list[...]` and return a list (empty when"
                    " there is nothing to map)"
                )
        return Plan(
            pipeline=self.name,
            steps=MappingProxyType(dict(self._steps)),
            order=order,
            dependents=MappingProxyType({k: tuple(v) for k, v in dependents.items()}),
            output_types=MappingProxyType(output_types),
            decoders=MappingProxyType(decoders),
            input_types=MappingProxyType(input_types),
            item_types=MappingProxyType(item_types),
            item_decoders=MappingProxyType(item_decoders),
        )

    def _decoder(self, name: str, tp: Any) -> msgspec.json.Decoder[Any]:
        try:
            msgspec.json.schema(tp)  # rejects types msgspec would need hooks for
            return msgspec.json.Decoder(tp)
        except TypeError as exc:
            reason = str(exc).rpartition("\n")[2]
            raise PipelineError(
                f"{self._where(name)}: return annotation {tp!r} cannot be stored ({reason});"
                " return msgspec-serializable values (Structs, dataclasses, dict, list,"
                " str, int, float, bool, None, datetime, ...)"
            ) from None

    def _unknown(self, step: Step, dep: str) -> str:
        if dep in step.inputs:
            how = f"its parameter {dep!r}"
        elif dep == step.map_over:
            how = f"map_over {dep!r}"
        elif dep in step.skip_inputs:
            how = f"the parameter {dep!r} of skip_if"
        else:
            how = f"depends_on {dep!r}"
        close = difflib.get_close_matches(dep, list(self._steps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(repr(s) for s in self._steps)
        return (
            f"{self._where(step.name)}: {how} names no step of the pipeline (steps: {known}){hint}"
        )


def _parameters(fn: Callable[..., object], where: str, *, what: str) -> tuple[str, ...]:
    """The names of ``fn``'s parameters after the context (``what``: "step" or "skip_if")."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise PipelineError(
            f"{where}: cannot read the {'function' if what == 'step' else what} signature: {exc}"
        ) from None
    if not params or params[0].kind not in _CTX_KINDS:
        example = (
            f"`async def {getattr(fn, '__name__', 'step')}(ctx: StepContext, ...)`"
            if what == "step"
            else "`skip_if=lambda ctx: ...`"
        )
        subject = "the first parameter" if what == "step" else "the first parameter of skip_if"
        raise PipelineError(f"{where}: {subject} must be the step context, as in {example}")
    inputs: list[str] = []
    for p in params[1:]:
        if p.kind not in _INPUT_KINDS:
            raise PipelineError(
                f"{where}: parameter {p.name!r}{'' if what == 'step' else ' of ' + what} must"
                " be an ordinary named parameter (no *args, **kwargs or positional-only);"
                " each names an upstream step"
            )
        inputs.append(p.name)
    return tuple(inputs)


def _skip_inputs(skip_if: SkipCondition | None, where: str) -> tuple[str, ...]:
    if skip_if is None:
        return ()
    if not callable(skip_if):
        raise PipelineError(f"{where}: skip_if must be a function of the context, got {skip_if!r}")
    if inspect.iscoroutinefunction(skip_if) or inspect.isasyncgenfunction(skip_if):
        raise PipelineError(
            f"{where}: skip_if must be a plain (not async) function returning a bool, as in"
            " `skip_if=lambda ctx: ...`; do I/O in a step and pass its output instead"
        )
    return _parameters(skip_if, where, what="skip_if")


def _concurrency(concurrency: int | None, where: str) -> int:
    if concurrency is None:
        return DEFAULT_MAP_CONCURRENCY
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise PipelineError(
            f"{where}: concurrency must be an integer >= 1 (items in flight at once), got"
            f" {concurrency!r}"
        )
    return concurrency


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


def _timeout(
    timeout: float | None, where: str, default: str = "the runner's default"
) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise PipelineError(
            f"{where}: timeout must be a number of seconds > 0 (or None for {default}),"
            f" got {timeout!r}"
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


def _dataset(produces: str | None, where: str) -> str | None:
    if produces is None:
        return None
    if not isinstance(produces, str) or not produces.strip():
        raise PipelineError(f"{where}: produces= expects a dataset name, got {produces!r}")
    return produces
