"""The arrival event a step announces when it produced a dataset (``produces=``)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from orchestrator.events import encode_structured, new_arrival
from orchestrator.pipeline.records import StepRecord
from orchestrator.store import ClaimedRun, OutboxWrite
from orchestrator.telemetry import inject_headers

__all__ = ["produced_event"]

_NAMESPACE = uuid.UUID("5b1f3d6e-9a57-4e4b-8a63-0c7f6a0e2d41")
_decoder = msgspec.json.Decoder()


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def produced_event(run: ClaimedRun, record: StepRecord, dataset: str, topic: str) -> OutboxWrite:
    """The outbox row announcing ``dataset``, described by the step's output when it is an
    object (``partition``, ``uri``, ``rows``, ``bytes``, ``attributes``).

    The CloudEvents id depends only on the run and the step, so a step re-run after a crash
    announces the same event and consumers deduplicate it.
    """
    doc: dict[str, Any] = {}
    if record.output:
        decoded = _decoder.decode(record.output)
        if isinstance(decoded, dict):
            doc = decoded
    partition = _field(doc, "partition", str)
    if partition is None and run.events:
        partition = run.events[0].data.partition
    attributes = doc.get("attributes")
    event = new_arrival(
        dataset,
        partition=partition,
        uri=_field(doc, "uri", str),
        rows=_field(doc, "rows", int),
        size=_field(doc, "bytes", int),
        attributes=attributes if isinstance(attributes, dict) else {},
        source=f"orchestrator://{run.pipeline}/{record.step}",
        id=str(uuid.uuid5(_NAMESPACE, f"{run.id}/{record.step}")),
    )
    headers = [("content-type", "application/cloudevents+json")]
    headers += [(k, v.decode("latin-1")) for k, v in inject_headers()]
    return OutboxWrite(
        event_id=event.id,
        topic=topic,
        key=event.key.encode(),
        value=encode_structured(event),
        headers=headers,
        run_id=run.id,
        step=record.step,
    )
