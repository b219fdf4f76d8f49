"""The wire contract: CloudEvents 1.0 arrival events on Kafka.

Both Kafka protocol bindings are accepted:

* *structured*: the record value is the JSON envelope (``specversion``, ``id``, ``source``,
  ``type``, ``time``, ``subject``, ``data``);
* *binary*: attributes travel as ``ce_*`` headers and the value is the ``data`` JSON.

Publishing uses the structured mode. The ``data`` of an arrival event names at least the
``dataset``. Unknown fields are tolerated (forward compatibility); a missing or mistyped
required field makes the record a dead letter whose reason is the decode error.

Schema evolution: new fields get defaults, existing fields never change type.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from orchestrator.errors import EventError

__all__ = [
    "ARRIVAL_TYPE",
    "Arrival",
    "CloudEvent",
    "decode_record",
    "encode_structured",
    "kafka_key",
    "new_arrival",
]

ARRIVAL_TYPE = "data.arrived"
"""Default CloudEvents ``type`` of an arrival event."""

Headers = Sequence[tuple[str, bytes]]


class Arrival(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The ``data`` of an arrival event: which data arrived, where, how much."""

    dataset: str
    partition: str | None = None
    uri: str | None = None
    rows: int | None = None
    bytes: int | None = None
    schema: str | None = None
    attributes: dict[str, Any] = {}


class CloudEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A CloudEvents 1.0 envelope carrying an :class:`Arrival`."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type: str
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Arrival

    @property
    def key(self) -> str:
        """The correlation key: ``dataset`` or ``dataset/partition``."""
        return kafka_key(self.data)


_structured_decoder = msgspec.json.Decoder(CloudEvent)
_data_decoder = msgspec.json.Decoder(Arrival)
_encoder = msgspec.json.Encoder()

_BINARY_ATTRS = ("specversion", "id", "source", "type", "time", "subject", "dataschema")


def kafka_key(data: Arrival) -> str:
    return f"{data.dataset}/{data.partition}" if data.partition else data.dataset


def new_arrival(
    dataset: str,
    *,
    partition: str | None = None,
    uri: str | None = None,
    rows: int | None = None,
    size: int | None = None,
    attributes: dict[str, Any] | None = None,
    source: str = "orchestrator://publish",
    type: str = ARRIVAL_TYPE,
    id: str | None = None,
) -> CloudEvent:
    """Build an arrival event with a fresh id and the current time."""
    return CloudEvent(
        specversion="1.0",
        id=id or str(uuid.uuid4()),
        source=source,
        type=type,
        time=datetime.now(UTC),
        subject=f"{dataset}/{partition}" if partition else dataset,
        datacontenttype="application/json",
        data=Arrival(
            dataset=dataset,
            partition=partition,
            uri=uri,
            rows=rows,
            bytes=size,
            attributes=attributes or {},
        ),
    )


def encode_structured(event: CloudEvent) -> bytes:
    """The structured-mode record value."""
    return _encoder.encode(event)


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.replace("`$.", "`") if text else type(exc).__name__


def decode_record(value: bytes | None, headers: Headers, *, max_bytes: int) -> CloudEvent:
    """Decode one Kafka record in either binding, or raise :class:`EventError` with the reason."""
    if value is None:
        raise EventError("empty record value (tombstone)")
    if len(value) > max_bytes:
        raise EventError(f"record of {len(value)} bytes exceeds the limit of {max_bytes} bytes")
    if b"\\u0000" in value or b"\x00" in value:
        raise EventError("record contains a NUL character, which cannot be stored")
    for k, _ in headers:
        if k.startswith("ce_"):  # binary mode
            return _decode_binary(value, {k[3:]: v for k, v in headers if k.startswith("ce_")})
    try:
        return _structured_decoder.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"not a CloudEvents JSON envelope: {_reason(exc)}") from None


def _decode_binary(value: bytes, attrs: dict[str, bytes]) -> CloudEvent:
    try:
        data = _data_decoder.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"binary-mode data is not an arrival payload: {_reason(exc)}") from None
    fields: dict[str, Any] = {}
    for name in _BINARY_ATTRS:
        raw = attrs.get(name)
        if raw is None:
            continue
        if b"\x00" in raw:
            raise EventError(f"header ce_{name} contains a NUL character")
        try:
            fields[name] = raw.decode()
        except UnicodeDecodeError:
            raise EventError(f"header ce_{name} is not valid UTF-8") from None
    fields["data"] = data
    try:
        return msgspec.convert(fields, CloudEvent, strict=False)
    except msgspec.ValidationError as exc:
        raise EventError(f"binary-mode attributes invalid: {_reason(exc)}") from None
