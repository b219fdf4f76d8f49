"""The context a step receives as its first argument."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
from msgspec.structs import force_setattr
from opentelemetry import trace

from orchestrator.errors import PipelineError
from orchestrator.events import Arrival, CloudEvent

__all__ = ["StepContext"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class StepContext(msgspec.Struct, frozen=True, kw_only=True, dict=False):
    """What one attempt of a step knows about its run. Read-only.

    A frozen struct rather than a dataclass: every attempt builds one, and a struct is built
    in a tenth of the time."""

    run_id: int
    """The run's id; stable across retries and resumes, so usable as an idempotency key."""
    pipeline: str
    step: str
    """The step's name; ``load[3]`` for item 3 of the mapped step ``load``, as recorded."""
    attempt: int
    """1 for the first attempt of the step in this run, counting on across resumes."""
    events: tuple[CloudEvent, ...]
    """The events that triggered the run, oldest first (several when coalesced)."""
    params: Mapping[str, Any]
    """Parameters of the run (from the rule or the operator)."""
    upstream: Mapping[str, Any]
    """Outputs of every dependency, by step name."""
    span: trace.Span
    """The span of this attempt (``step <name>``); add attributes or events to it."""
    connectors: Mapping[str, Any]
    """Connectors configured for the daemon, by name."""
    map_index: int | None = None
    """The item's index in the mapped list, for an item of a mapped step; else ``None``."""
    emitted: list[Arrival] = msgspec.field(default_factory=list)
    """Arrivals announced with :meth:`emit` during this attempt."""
    _logger: logging.Logger | None = None
    """The logger behind :attr:`log`; ``None``: ``orchestrator.steps.<pipeline>``."""
    _log: logging.LoggerAdapter[logging.Logger] | None = None
    """Built on first use of :attr:`log`, then kept."""

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """Logger whose records carry ``run_id``, ``pipeline``, ``step`` and ``attempt``."""
        adapter = self._log
        if adapter is None:
            logger = self._logger or logging.getLogger(f"orchestrator.steps.{self.pipeline}")
            extra = {
                "run_id": self.run_id,
                "pipeline": self.pipeline,
                "step": self.step,
                "attempt": self.attempt,
            }
            adapter = logging.LoggerAdapter(logger, extra)
            force_setattr(self, "_log", adapter)  # built on first use, then kept
        return adapter

    def emit(
        self,
        dataset: str,
        *,
        partition: str | None = None,
        uri: str | None = None,
        rows: int | None = None,
        size: int | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Announce that this step produced data. The arrival event is published (through
        the outbox) if and only if this attempt's success is recorded; an attempt that
        fails or is cancelled announces nothing."""
        if not isinstance(dataset, str) or not dataset:
            raise PipelineError(f"emit: expected a dataset name, got {dataset!r}")
        self.emitted.append(
            Arrival(
                dataset=dataset,
                partition=partition,
                uri=uri,
                rows=rows,
                bytes=size,
                attributes=dict(attributes or {}),
            )
        )

    @property
    def event(self) -> CloudEvent:
        """The first triggering event."""
        if not self.events:
            raise PipelineError(
                f"run {self.run_id} of pipeline {self.pipeline!r} has no triggering event"
                " (an absence rule or a manual run); read ctx.events instead of ctx.event"
            )
        return self.events[0]

    @classmethod
    def create(
        cls,
        *,
        run_id: int,
        pipeline: str,
        step: str,
        attempt: int = 1,
        events: tuple[CloudEvent, ...] = (),
        params: Mapping[str, Any] | None = None,
        upstream: Mapping[str, Any] | None = None,
        connectors: Mapping[str, Any] | None = None,
        span: trace.Span = trace.INVALID_SPAN,
        logger: logging.Logger | None = None,
        map_index: int | None = None,
    ) -> StepContext:
        """Build a context, e.g. to call a step function directly in a test.

        Mappings are copied read-only; the logger defaults to ``orchestrator.steps.<pipeline>``.
        """
        return cls(
            run_id=run_id,
            pipeline=pipeline,
            step=step,
            attempt=attempt,
            events=tuple(events),
            params=_frozen(params),
            upstream=_frozen(upstream),
            span=span,
            connectors=_frozen(connectors),
            map_index=map_index,
            _logger=logger,
        )


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping)) if mapping else _EMPTY
