"""Pipelines: what step authors write, and the runner that executes a run.

Step authors use :class:`Pipeline`, :class:`StepContext` and :class:`RetryPolicy`; the
daemon uses :class:`Runner` with a :class:`RunRecorder` implemented by the store. Nothing
here talks to Kafka or Postgres. See ``docs/pipelines.md``.
"""

from orchestrator.pipeline.context import StepContext
from orchestrator.pipeline.model import Pipeline, Step
from orchestrator.pipeline.records import (
    CancelStatus,
    RunOutcome,
    RunRecorder,
    RunSpec,
    StepRecord,
    StepStatus,
)
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.pipeline.runner import Runner

__all__ = [
    "CancelStatus",
    "Pipeline",
    "RetryPolicy",
    "RunOutcome",
    "RunRecorder",
    "RunSpec",
    "Runner",
    "Step",
    "StepContext",
    "StepRecord",
    "StepStatus",
]
