"""The orchestrator's exceptions.

Every error raised on purpose by this package derives from one root::

    OrchestratorError
    ├── ConfigError            a config file or ORCH_* variable is wrong (names the key)
    ├── RuleError              a rules file is wrong (names the file, rule and field)
    ├── PipelineError          a pipeline definition is wrong (cycle, unknown dependency, ...)
    ├── EventError             a Kafka record is not a valid arrival event (the dead-letter reason)
    ├── StoreError             Postgres failed or is unreachable (retryable)
    │   └── StoreRejected      Postgres refused the data itself (not retryable)
    ├── BrokerError            Kafka failed or is unreachable (retryable)
    └── StepError              raised by step code to control retries
        └── NonRetryableError  fail the step now, do not retry

Retryability is an attribute (``retryable``), never a string match on a message.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "EventError",
    "NonRetryableError",
    "OrchestratorError",
    "PipelineError",
    "RuleError",
    "StepError",
    "StoreError",
    "StoreRejected",
]


class OrchestratorError(Exception):
    """Root of every error this package raises on purpose."""

    retryable: bool = False


class ConfigError(OrchestratorError):
    """A configuration file, key or environment variable is invalid."""


class RuleError(OrchestratorError):
    """A rules file is invalid. The message names the file, the rule and the field."""

    def __init__(self, message: str, *, file: str = "", rule: str = "", field: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.rule = rule
        self.field = field


class PipelineError(OrchestratorError):
    """A pipeline definition is invalid or a pipeline cannot be found."""


class EventError(OrchestratorError):
    """A Kafka record could not be decoded as a CloudEvents arrival event."""


class StoreError(OrchestratorError):
    """Postgres is unreachable or a statement failed for a transient reason."""

    retryable = True


class StoreRejected(StoreError):
    """Postgres refused a value (encoding, range, constraint); retrying cannot help."""

    retryable = False


class BrokerError(OrchestratorError):
    """Kafka is unreachable or refused a request."""

    retryable = True


class StepError(OrchestratorError):
    """Raised by step code. ``retryable=False`` fails the step without further attempts."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class NonRetryableError(StepError):
    """A step failure that retrying cannot fix (bad input, missing permission, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
