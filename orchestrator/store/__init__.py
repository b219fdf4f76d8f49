"""Postgres state: events, runs, step attempts, dead letters. All SQL lives in this package."""

from orchestrator.store.connection import create_pool, redact_dsn
from orchestrator.store.migrate import available as available_migrations
from orchestrator.store.migrate import migrate
from orchestrator.store.records import (
    ClaimedRun,
    DeadLetter,
    DeadLetterRow,
    IncomingEvent,
    IngestResult,
    RunRequest,
    RunRow,
    RunStatus,
    StepAttemptRow,
)
from orchestrator.store.store import Store

__all__ = [
    "ClaimedRun",
    "DeadLetter",
    "DeadLetterRow",
    "IncomingEvent",
    "IngestResult",
    "RunRequest",
    "RunRow",
    "RunStatus",
    "StepAttemptRow",
    "Store",
    "available_migrations",
    "create_pool",
    "migrate",
    "redact_dsn",
]
