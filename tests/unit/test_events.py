"""The wire contract: both CloudEvents Kafka bindings, and the reasons bad records get."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from orchestrator.errors import EventError
from orchestrator.events import decode_record, encode_structured, kafka_key, new_arrival

LIMIT = 1 << 20


def test_structured_round_trip_keeps_every_field() -> None:
    ev = new_arrival(
        "sales.orders",
        partition="2026-11-24",
        uri="s3://b/k",
        rows=3,
        size=99,
        attributes={"region": "eu"},
        source="etl://x",
        id="fixed",
    )
    raw = encode_structured(ev)
    doc = msgspec.json.decode(raw)
    assert doc["specversion"] == "1.0"
    assert doc["type"] == "data.arrived"
    assert doc["data"] == {
        "dataset": "sales.orders",
        "partition": "2026-11-24",
        "uri": "s3://b/k",
        "rows": 3,
        "bytes": 99,
        "attributes": {"region": "eu"},
    }
    assert decode_record(raw, [], max_bytes=LIMIT) == ev
    assert ev.key == "sales.orders/2026-11-24"


def test_unknown_fields_are_tolerated() -> None:
    raw = (
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","myext":"x",'
        b'"data":{"dataset":"d","future_field":[1,2]}}'
    )
    ev = decode_record(raw, [], max_bytes=LIMIT)
    assert ev.data.dataset == "d"
    assert kafka_key(ev.data) == "d"


def test_binary_mode_reads_ce_headers() -> None:
    ev = decode_record(
        b'{"dataset":"d","partition":"p","rows":1}',
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"b-1"),
            ("ce_source", b"kcat"),
            ("ce_type", b"data.arrived"),
            ("ce_time", b"2026-11-24T10:00:00Z"),
            ("ce_subject", b"d/p"),
            ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        ],
        max_bytes=LIMIT,
    )
    assert (ev.id, ev.source, ev.subject) == ("b-1", "kcat", "d/p")
    assert ev.time == datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert ev.data.rows == 1


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (None, [], "tombstone"),
        (b"{", [], "not a CloudEvents JSON envelope"),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"t"}',
            [],
            "missing required field `data`",
        ),
        (b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{}}', [], "`dataset`"),
        (
            b'{"specversion":"2.0","id":"1","source":"s","type":"t","data":{"dataset":"d"}}',
            [],
            "specversion",
        ),
        (
            b'{"specversion":"1.0","id":1,"source":"s","type":"t","data":{"dataset":"d"}}',
            [],
            "at `id`",
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"dataset":"d","rows":"x"}}',
            [],
            "at `data.rows`",
        ),
        (
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"dataset":"\\u0000"}}',
            [],
            "NUL",
        ),
        (b'\xff{"x":1}', [], "not a CloudEvents JSON envelope"),
        (b"x" * 11, [], "exceeds the limit of 10 bytes"),
        (
            b'{"dataset":"d"}',
            [("ce_specversion", b"1.0"), ("ce_source", b"s"), ("ce_type", b"t")],
            "missing required field `id`",
        ),
        (
            b'{"dataset":"d"}',
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"\xff"),
                ("ce_source", b"s"),
                ("ce_type", b"t"),
            ],
            "ce_id is not valid UTF-8",
        ),
    ],
)
def test_bad_records_raise_event_error_with_reason(
    value: bytes | None, headers: list[tuple[str, bytes]], reason: str
) -> None:
    with pytest.raises(EventError) as info:
        decode_record(value, headers, max_bytes=10 if reason.startswith("exceeds") else LIMIT)
    assert reason in str(info.value)
