"""Rows the store reads and writes, as frozen msgspec Structs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec

from orchestrator.events import CloudEvent

__all__ = [
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
    "StoredEvent",
]

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]


class RunRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A run a rule asks for; created only if (rule, trigger_key) is new."""

    rule: str
    pipeline: str
    trigger_key: str
    priority: int = 0
    params: dict[str, Any] = {}
    flow_key: str | None = None
    """The rule's key value for this event (flow control groups runs by it)."""


class IncomingEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded Kafka record on its way into the events table."""

    event: CloudEvent
    envelope: bytes
    topic: str
    partition: int
    offset: int
    published_at: datetime | None
    traceparent: str | None = None
    """Context of the record's ``<topic> process`` span: the parent of the runs it triggers."""
    tracestate: str | None = None
    runs: tuple[RunRequest, ...] = ()
    """Runs of simple rules this event matched."""
    correlations: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(rule, key, conditions) for each correlated rule this event contributes to."""
    contract_error: str | None = None
    """Why the event breaks its dataset's data contract (it is then quarantined)."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    value_size: int
    headers: list[tuple[str, str]]
    reason: str


class ClaimedRun(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    rule: str
    pipeline: str
    params: dict[str, Any]
    event_ids: list[int]
    first_event_at: datetime | None
    traceparent: str | None
    tracestate: str | None
    links: list[str]
    claims: int
    cancel_requested: bool
    events: tuple[CloudEvent, ...] = ()
    """The triggering events, loaded with the claim (in ``event_ids`` order)."""
    priority: int = 0


class IngestResult(msgspec.Struct, frozen=True, kw_only=True):
    new_events: int
    duplicate_events: int
    dead_letters: int
    run_ids: list[int]
    owned: list[ClaimedRun] = []
    """Runs created already claimed by the ingesting daemon (see ``RunOwner``)."""
    queued: bool = False
    """Whether the batch created or changed runs any daemon may claim."""


class RunRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    rule: str
    pipeline: str
    trigger_key: str
    status: RunStatus
    priority: int
    params: dict[str, Any]
    event_ids: list[int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    claims: int
    failed_step: str | None
    error: str | None
    traceparent: str | None


class StepAttemptRow(msgspec.Struct, frozen=True, kw_only=True):
    run_id: int
    step: str
    attempt: int
    status: str
    output: msgspec.Raw | None
    error: str | None
    owner: str | None
    started_at: datetime
    finished_at: datetime | None


class DeadLetterRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    topic: str
    kafka_partition: int
    kafka_offset: int
    value_size: int
    reason: str
    created_at: datetime
    redriven_at: datetime | None
    value: bytes | None = None
    key: bytes | None = None
    headers: list[tuple[str, str]] = []


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as kept in the events table (for replay)."""

    id: int
    event: CloudEvent
    published_at: datetime | None
    traceparent: str | None
    tracestate: str | None


class AttemptRow(Protocol):
    """A step attempt's row as the store writes it: an :class:`AttemptWrite`, or a record
    with the same attributes (the runner's ``StepRecord`` of a finished attempt)."""

    @property
    def run_id(self) -> int: ...
    @property
    def step(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def output(self) -> bytes | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def skipped(self) -> bool: ...


class AttemptWrite(msgspec.Struct, frozen=True, kw_only=True):
    """A step attempt's row as the scheduler writes it (start, then outcome)."""

    run_id: int
    step: str
    attempt: int
    status: str
    output: bytes | None = None
    error: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    skipped: bool = False


class OutboxWrite(msgspec.Struct, frozen=True, kw_only=True):
    """An event to publish once the attempt that produced it is recorded."""

    event_id: str
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, str]]
    run_id: int
    step: str


class OutboxRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, str]]


class RunFinish(msgspec.Struct, frozen=True, kw_only=True):
    run_id: int
    status: str
    failed_step: str | None = None
    error: str | None = None
