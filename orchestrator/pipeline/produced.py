"""The arrival event a step announces when it produced a dataset (``produces=``)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from orchestrator.events import Arrival, encode_structured, new_arrival
from orchestrator.pipeline.records import StepRecord
from orchestrator.store import ClaimedRun, OutboxWrite
from orchestrator.telemetry import inject_headers

__all__ = ["announcement", "produced_event"]

_NAMESPACE = uuid.UUID("5b1f3d6e-9a57-4e4b-8a63-0c7f6a0e2d41")
_decoder = msgspec.json.Decoder()


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def produced_event(run: ClaimedRun, record: StepRecord, dataset: str, topic: str) -> OutboxWrite:
    """The outbox row announcing ``dataset`` (``produces=``), described by the step's output
    when it is an object (``partition``, ``uri``, ``rows``, ``bytes``, ``attributes``)."""
    doc: dict[str, Any] = {}
    if record.output:
        decoded = _decoder.decode(record.output)
        if isinstance(decoded, dict):
            doc = decoded
    attributes = doc.get("attributes")
    arrival = Arrival(
        dataset=dataset,
        partition=_field(doc, "partition", str),
        uri=_field(doc, "uri", str),
        rows=_field(doc, "rows", int),
        bytes=_field(doc, "bytes", int),
        attributes=attributes if isinstance(attributes, dict) else {},
    )
    return announcement(run, record.step, arrival, "produces", topic)


def announcement(
    run: ClaimedRun, step: str, arrival: Arrival, slot: str, topic: str
) -> OutboxWrite:
    """The outbox row for an arrival a step announced.

    The CloudEvents id depends only on the run, the step and ``slot`` (which announcement of
    the step it is), so a step re-run after a crash announces the same event and consumers
    deduplicate it. A missing partition is taken from the run's first triggering event.
    """
    partition = arrival.partition
    if partition is None and run.events:
        partition = run.events[0].data.partition
    event = new_arrival(
        arrival.dataset,
        partition=partition,
        uri=arrival.uri,
        rows=arrival.rows,
        size=arrival.bytes,
        attributes=dict(arrival.attributes),
        source=f"orchestrator://{run.pipeline}/{step}",
        id=str(uuid.uuid5(_NAMESPACE, f"{run.id}/{step}/{slot}")),
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
        step=step,
    )
