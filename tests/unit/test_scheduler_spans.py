"""The run span of a daemon that records nothing: built directly, as the SDK would."""

from __future__ import annotations

from opentelemetry import trace

from orchestrator.pipeline.scheduler import _unrecorded_run_span
from orchestrator.store import ClaimedRun


def claimed(traceparent: str | None, tracestate: str | None = None) -> ClaimedRun:
    return ClaimedRun(
        id=1,
        rule="r",
        pipeline="p",
        params={},
        event_ids=[1],
        first_event_at=None,
        traceparent=traceparent,
        tracestate=tracestate,
        links=[],
        claims=1,
        cancel_requested=False,
    )


def test_continues_the_events_trace_unsampled_with_a_span_id_of_its_own() -> None:
    producer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"
    span = _unrecorded_run_span(claimed(producer, "vendor=1"))
    ctx = span.get_span_context()
    assert not span.is_recording()
    assert ctx.is_valid
    assert ctx.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert ctx.span_id != 0xB7AD6B7169203331
    assert int(ctx.trace_flags) == 0x02  # sampled cleared, the random-id flag kept
    assert dict(ctx.trace_state) == {"vendor": "1"}
    other = _unrecorded_run_span(claimed(producer)).get_span_context()  # no trace state
    assert other.span_id != ctx.span_id
    assert other.trace_id == ctx.trace_id
    assert int(other.trace_flags) == 0x02
    assert dict(other.trace_state) == {}
    assert not other.is_remote


def test_a_run_without_a_trace_gets_a_new_unsampled_one() -> None:
    for parent in (None, "garbage"):
        ctx = _unrecorded_run_span(claimed(parent)).get_span_context()
        assert ctx.is_valid
        assert ctx.trace_flags == trace.TraceFlags.DEFAULT
