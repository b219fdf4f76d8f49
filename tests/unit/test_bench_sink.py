"""The traced W1 drain's OTLP receiver (``bench.worker sink``) counts what exporters send."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from orchestrator.dev._proc import free_port

ROOT = Path(__file__).resolve().parents[2]


def _post(url: str, body: bytes, **headers: str) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        status: int = response.status
        return status


def test_sink_answers_exports_and_counts_spans_until_sigterm() -> None:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.worker", "sink", json.dumps({"port": port})],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        spans = [
            Span(name=f"s{i}", trace_id=b"\x01" * 16, span_id=bytes([i + 1]) * 8) for i in range(3)
        ]
        request = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(
                    scope_spans=[ScopeSpans(spans=spans[:2]), ScopeSpans(spans=spans[2:])]
                )
            ]
        ).SerializeToString()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert _post(f"{base}/v1/traces", request) == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the sink never listened"
                time.sleep(0.05)
        gzipped = gzip.compress(request)
        assert _post(f"{base}/v1/traces", gzipped, **{"Content-Encoding": "gzip"}) == 200
        assert _post(f"{base}/v1/metrics", b"\x0a\x00") == 200
        bad = b"\xff not protobuf"
        assert _post(f"{base}/v1/traces", bad) == 200
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
        child.wait()
    counts = json.loads(out.decode().strip().splitlines()[-1])
    assert child.returncode == 0
    assert counts["spans"] == 6
    assert counts["trace_requests"] == 2
    assert counts["metric_requests"] == 1
    assert counts["errors"] == 1
    assert counts["bytes"] == len(request) + len(gzipped) + 2 + len(bad)  # as received
