"""Trace context travels through Kafka headers and Postgres text columns unchanged."""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from orchestrator.telemetry import (
    Instruments,
    context_from_traceparent,
    extract_headers,
    inject_headers,
    measures,
    records,
    skips_unsampled,
    span_context_from_traceparent,
    trace_id_and_flags,
    traceparent_from_headers,
    traceparent_of,
    unsampled,
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
        "t = Telemetry.from_providers()\n"
        "assert t.recording is " + str(record_without_exporter) + "\n"
        "from opentelemetry.metrics import NoOpMeter\n"
        "assert isinstance(t.meter, NoOpMeter), t.meter  # no reader: no aggregation\n"
        "with t.tracer.start_as_current_span('s') as span:\n"
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


def test_records_is_false_only_when_spans_are_never_recorded() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased

    assert records(TracerProvider().get_tracer("t"))
    assert records(TracerProvider(sampler=TraceIdRatioBased(0.001)).get_tracer("t"))
    assert not records(TracerProvider(sampler=ALWAYS_OFF).get_tracer("t"))
    assert not records(trace.NoOpTracer())


def test_skips_unsampled_only_for_samplers_that_never_record_under_unsampled_parents() -> None:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    def tracer(sampler: Any = None) -> trace.Tracer:
        return TracerProvider(sampler=sampler).get_tracer("t")

    assert skips_unsampled(tracer())  # the SDK's default: parentbased_always_on
    assert skips_unsampled(tracer(ParentBased(TraceIdRatioBased(0.1))))
    assert skips_unsampled(tracer(ALWAYS_OFF))
    assert skips_unsampled(trace.NoOpTracer())
    assert not skips_unsampled(tracer(ALWAYS_ON))
    assert not skips_unsampled(tracer(TraceIdRatioBased(0.5)))
    assert not skips_unsampled(tracer(ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)))
    assert not skips_unsampled(tracer(ParentBased(ALWAYS_ON, local_parent_not_sampled=ALWAYS_ON)))
    # A parent-based root inside one that records unsampled parents: the outer one decides.
    nested = ParentBased(ParentBased(ALWAYS_ON), remote_parent_not_sampled=ALWAYS_ON)
    assert not skips_unsampled(tracer(nested))


def test_unsampled_reads_the_flags_of_a_valid_traceparent() -> None:
    ids = f"{1:032x}-{2:016x}"
    assert unsampled(f"00-{ids}-00")
    assert unsampled(f"00-{ids}-02")  # other flags, sampled bit clear
    assert not unsampled(f"00-{ids}-01")
    assert not unsampled(f"00-{ids}-03")
    assert not unsampled(None)
    assert not unsampled(f"00-{0:032x}-{2:016x}-00")  # invalid: all-zero trace id
    assert not unsampled("garbage-00")


def test_traceparent_from_headers_keeps_the_producers_context() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("publish") as span:
        headers = [*inject_headers(), ("tracestate", b"vendor=1")]
    parent, state = traceparent_from_headers(headers)
    c = span.get_span_context()
    assert parent == f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"
    assert state == "vendor=1"
    # What the daemon later rebuilds from the stored value is the producer's span.
    restored = trace.get_current_span(context_from_traceparent(parent, state))
    assert restored.get_span_context().span_id == c.span_id


def test_traceparent_from_headers_rejects_what_the_propagator_rejects() -> None:
    bad = [
        b"",
        b"garbage",
        b"00-00000000000000000000000000000000-0000000000000001-01",  # zero trace id
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # 00 has 4 parts
    ]
    for value in bad:
        assert traceparent_from_headers([("traceparent", value)]) == (None, None), value
        assert (
            not trace.get_current_span(extract_headers([("traceparent", value)]))
            .get_span_context()
            .is_valid
        )
    assert traceparent_from_headers([]) == (None, None)
    # A future version is read as the propagator reads it, and stored as version 00.
    future = b"cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-whatever"
    assert traceparent_from_headers([("traceparent", future)]) == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert traceparent_from_headers([("other", b"x"), ("traceparent", good)]) == (
        good.decode(),
        None,
    )


def test_context_from_traceparent_matches_the_propagator() -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    for value, state in [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03", "k=v"),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),
        ("garbage", None),
        (None, None),
    ]:
        carrier = {"traceparent": value or ""} | ({"tracestate": state} if state else {})
        want = trace.get_current_span(propagator.extract(carrier)).get_span_context()
        got = trace.get_current_span(context_from_traceparent(value, state)).get_span_context()
        assert got == want, value
        assert got.trace_state == want.trace_state


def test_span_context_from_traceparent_matches_the_context() -> None:
    for value, state in [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03", "k=v"),
        ("garbage", None),
        (None, None),
    ]:
        want = trace.get_current_span(context_from_traceparent(value, state)).get_span_context()
        assert span_context_from_traceparent(value, state) == want, value


def test_only_the_no_op_meter_counts_as_keeping_nothing() -> None:
    # Without a metrics exporter the daemon's meter is the API's no-op one, and per-run
    # measurements (step durations, event-to-step latency) are skipped.
    noop = metrics.NoOpMeterProvider().get_meter("orchestrator")
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        sdk = provider.get_meter("orchestrator")
        assert not measures(noop)
        assert not Instruments(noop).measuring
        assert measures(sdk)
        assert Instruments(sdk).measuring
        assert measures(metrics.get_meter("orchestrator"))  # a proxy may become real later
    finally:
        provider.shutdown()


def test_trace_id_and_flags_are_read_from_the_common_traceparent_only() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_id_and_flags(tp) == (0x0AF7651916CD43DD8448EB211C80319C, 1)
    assert trace_id_and_flags(tp[:-2] + "00") == (0x0AF7651916CD43DD8448EB211C80319C, 0)
    assert trace_id_and_flags(None) is None
    assert trace_id_and_flags("01-" + tp[3:]) is None  # another version: the propagator's
    assert trace_id_and_flags("00-" + "0" * 32 + tp[35:]) is None  # an invalid trace id
