"""orchestrator: event-driven data orchestration on Kafka and Postgres.

The names below are the step author's API; everything else is internal to the daemon.
"""

from orchestrator.errors import NonRetryableError, OrchestratorError, StepError
from orchestrator.events import Arrival, CloudEvent, new_arrival
from orchestrator.pipeline import Pipeline, RetryPolicy, StepContext

__all__ = [
    "Arrival",
    "CloudEvent",
    "NonRetryableError",
    "OrchestratorError",
    "Pipeline",
    "RetryPolicy",
    "StepContext",
    "StepError",
    "new_arrival",
]
