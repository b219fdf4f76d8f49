"""Postgres state: events, runs, step attempts, dead letters. All SQL lives in this package."""

from orchestrator.store.connection import KEY_LOOKUP_PLANNER, create_pool, redact_dsn
from orchestrator.store.migrate import available as available_migrations
from orchestrator.store.migrate import migrate
from orchestrator.store.records import (
    AttemptRow,
    AttemptWrite,
    ClaimedRun,
    DeadLetter,
    DeadLetterRow,
    IncomingEvent,
    IngestResult,
    OutboxRow,
    OutboxWrite,
    RunFinish,
    RunRequest,
    RunRow,
    RunStatus,
    StepAttemptRow,
    StoredEvent,
)
from orchestrator.store.store import Store

__all__ = [
    "KEY_LOOKUP_PLANNER",
    "AttemptRow",
    "AttemptWrite",
    "ClaimedRun",
    "DeadLetter",
    "DeadLetterRow",
    "IncomingEvent",
    "IngestResult",
    "OutboxRow",
    "OutboxWrite",
    "RunFinish",
    "RunRequest",
    "RunRow",
    "RunStatus",
    "StepAttemptRow",
    "Store",
    "StoredEvent",
    "available_migrations",
    "create_pool",
    "migrate",
    "redact_dsn",
]
