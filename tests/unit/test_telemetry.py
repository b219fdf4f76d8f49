"""Trace context travels through Kafka headers and Postgres text columns unchanged."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from orchestrator.telemetry import (
    context_from_traceparent,
    extract_headers,
    inject_headers,
    traceparent_of,
)


def test_headers_and_traceparent_round_trip() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("producer") as span:
        headers = inject_headers()
    assert [k for k, _ in headers] == ["traceparent"]
    ctx = extract_headers([("other", b"x"), *headers])
    remote = trace.get_current_span(ctx).get_span_context()
    assert remote.trace_id == span.get_span_context().trace_id
    assert remote.span_id == span.get_span_context().span_id
    assert remote.is_remote
    tp, _ts = traceparent_of(span)
    assert tp == headers[0][1].decode()
    again = trace.get_current_span(context_from_traceparent(tp)).get_span_context()
    assert again.span_id == span.get_span_context().span_id


def test_missing_or_garbage_context_starts_a_new_trace() -> None:
    for headers in ([], [("traceparent", b"garbage")]):
        ctx = extract_headers(headers)
        assert not trace.get_current_span(ctx).get_span_context().is_valid
    assert not trace.get_current_span(context_from_traceparent(None)).get_span_context().is_valid


def _sampled_after_install(record_without_exporter: bool) -> str:
    import subprocess
    import sys

    code = (
        "from orchestrator.telemetry import install, Telemetry, inject_headers\n"
        f"install('t', record_without_exporter={record_without_exporter})\n"
        "tracer = Telemetry.from_providers().tracer\n"
        "with tracer.start_as_current_span('s') as span:\n"
        "    flags = int(inject_headers()[0][1].decode()[-2:], 16)\n"
        "    print(span.is_recording(), 'sampled' if flags & 1 else 'unsampled')\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    return result.stdout.strip()


def test_daemon_without_exporter_records_nothing_but_still_propagates() -> None:
    assert _sampled_after_install(False) == "False unsampled"


def test_publish_without_exporter_sends_a_sampled_context() -> None:
    assert _sampled_after_install(True) == "True sampled"
