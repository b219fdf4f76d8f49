"""A fixed single-threaded CPU workload: this machine's speed at a moment of the run.

The VMs the benchmark runs on change speed by 20-40% within minutes (other tenants, CPU
frequency). ``speed_index()`` times a small, fixed mix of what the daemon does per event
(msgspec JSON decoding and encoding, dict and string work) and returns microseconds per
round, best of a few short repeats. The harness records it before and after each workload,
so figures from different runs can be compared with the machine's state next to them.
"""

from __future__ import annotations

import time

import msgspec

__all__ = ["speed_index"]

_EVENT = (
    b'{"specversion":"1.0","id":"evt-000123","source":"bench/calibrate","type":'
    b'"data.arrived","time":"2026-11-25T07:00:00Z","data":{"dataset":"orders",'
    b'"partition":"2026-11-25","rows":1200,"attributes":{"region":"eu","tier":"gold"}}}'
)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _round() -> int:
    event = _decode(_EVENT)
    data = event["data"]
    key = f"event:{event['source']}#{event['id']}"
    view = {"type": event["type"], "dataset": data["dataset"], **data["attributes"]}
    out = _encode({"key": key, "view": view, "rows": data["rows"] + 1})
    return len(out) + len(sorted(view))


def speed_index(rounds: int = 20_000, repeats: int = 3) -> float:
    """Microseconds of CPU per round of the fixed workload (lower is faster), best of
    ``repeats``; about 0.1 s per repeat on a 2026 x86 core."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(rounds):
            _round()
        best = min(best, time.process_time() - t0)
    return round(best / rounds * 1e6, 3)
