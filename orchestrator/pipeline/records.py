"""What the runner is given, what it records per attempt, and what it returns.

:class:`RunRecorder` is the persistence seam: the store implements it over Postgres, the
tests in memory. The runner never touches Kafka or Postgres itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec

from orchestrator.events import Arrival, CloudEvent
from orchestrator.pipeline.model import Pipeline

__all__ = [
    "CancelStatus",
    "RunOutcome",
    "RunRecorder",
    "RunSpec",
    "StepRecord",
    "StepStatus",
]

StepStatus = Literal["succeeded", "failed", "cancelled", "interrupted"]
"""How an attempt ended. ``interrupted``: stopped by a shutdown, it runs again on resume."""

CancelStatus = Literal["cancelled", "interrupted"]


class StepRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The end of one step attempt."""

    run_id: int
    step: str
    attempt: int
    status: StepStatus
    output: bytes | None
    """The output as JSON (``msgspec.json.encode``) when ``succeeded``, else ``None``."""
    error: str | None
    """``"ExcType: message"`` and a short traceback tail when ``failed``; a sentence when
    ``cancelled`` or ``interrupted``; ``None`` when ``succeeded``."""
    started_at: datetime
    finished_at: datetime
    skipped: bool = False
    """``True`` when ``skip_if`` skipped the step: then ``status`` is ``succeeded`` and
    ``output`` is ``null``."""
    emitted: tuple[Arrival, ...] = ()
    """Arrivals the attempt announced with ``ctx.emit`` (kept only when it succeeded)."""


class RunRecorder(Protocol):
    """Persists step attempts. Implemented by the store.

    ``step_finished`` must be idempotent per ``(run_id, step, attempt)`` (an upsert): when
    cancellation interrupts a call, the runner makes it again under a shield. It may also be
    called for an attempt whose ``step_started`` was itself interrupted by cancellation.
    Exceptions raised here are not step failures: they stop the run's execution and
    propagate from :meth:`Runner.execute` (the run stays unfinished, to be resumed).

    ``step`` is a step name, or ``load[3]`` for item 3 of the mapped step ``load``: each
    item's attempts are recorded like a step's. The mapped step's own record (its output
    the list of item outputs, or the failure naming the item) is reported by
    ``step_finished`` alone, once the items have ended.
    """

    async def step_started(
        self, run_id: int, step: str, attempt: int, started_at: datetime
    ) -> None:
        """Record that an attempt begins."""
        ...

    async def step_finished(self, record: StepRecord) -> None:
        """Record how an attempt ended."""
        ...


class RunSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One run to execute (or resume)."""

    run_id: int
    pipeline: Pipeline
    events: tuple[CloudEvent, ...]
    """The triggering events, oldest first; may be empty (absence rules, manual runs)."""
    params: Mapping[str, Any] = {}
    completed: Mapping[str, bytes] = {}
    """Stored JSON outputs of the steps that already succeeded: they are not run again.
    Keys ``load[3]`` hold outputs of items of the mapped step ``load``: those items are
    not run again either."""
    connectors: Mapping[str, Any] = {}
    prior_attempts: Mapping[str, int] = {}
    """Attempts already recorded per unfinished step (or item, ``load[3]``), so that
    numbering continues on resume (each execution still gets the full ``max_attempts``)."""


class RunOutcome(msgspec.Struct, frozen=True):
    """How a run ended, when it ended by itself (cancellation propagates instead)."""

    status: Literal["succeeded", "failed"]
    failed_step: str | None = None
    error: str | None = None
