"""Tracing and metrics: Kafka-header propagation, span names, and the daemon's instruments.

Components receive a ``Tracer`` and an ``Instruments`` object; nothing here installs global
providers except :func:`install`, which only the CLI calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "Instruments",
    "Telemetry",
    "context_from_traceparent",
    "extract_headers",
    "inject_headers",
    "install",
    "measures",
    "records",
    "skips_unsampled",
    "span_context_from_traceparent",
    "trace_id_and_flags",
    "traceparent_from_headers",
    "traceparent_of",
    "unsampled",
]

_propagator = TraceContextTextMapPropagator()
KafkaHeaders = Sequence[tuple[str, bytes]]


class _HeaderGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k == key and v is not None]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [k for k, _ in carrier]


class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier.append((key, value.encode("latin-1")))


class _DictSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


_getter = _HeaderGetter()
_setter = _HeaderSetter()
_dict_setter = _DictSetter()


def inject_headers(context: Context | None = None) -> list[tuple[str, bytes]]:
    """W3C ``traceparent``/``tracestate`` Kafka headers for ``context`` (default: current)."""
    headers: list[tuple[str, bytes]] = []
    _propagator.inject(headers, context=context, setter=_setter)
    return headers


def extract_headers(headers: KafkaHeaders) -> Context:
    """The producer's context carried in a record's headers (empty context when absent)."""
    return _propagator.extract(headers, getter=_getter)


def traceparent_of(span: trace.Span) -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` for storing a span's context in Postgres."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span), setter=_dict_setter)
    return carrier.get("traceparent"), carrier.get("tracestate")


_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def traceparent_from_headers(headers: KafkaHeaders) -> tuple[str | None, str | None]:
    """The producer's ``(traceparent, tracestate)`` from a record's headers, for a daemon
    that records no spans: its runs then continue the producer's span directly, and the
    sampled flag travels on unchanged. A header the W3C propagator rejects gives
    ``(None, None)``; the common version-00 header is taken as is, without a round trip."""
    parent = state = None
    for key, value in headers:
        if key == "traceparent" and value is not None:
            parent = value.decode("latin-1").strip()
        elif key == "tracestate" and value is not None:
            state = value.decode("latin-1").strip() or None
    if parent is None:
        return None, None
    if _TRACEPARENT.match(parent):
        return parent, state
    # Anything else (a future version, odd spacing): as the propagator reads it.
    ctx = trace.get_current_span(extract_headers(headers)).get_span_context()
    if not ctx.is_valid:
        return None, None
    carrier: dict[str, str] = {}
    _propagator.inject(
        carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(ctx)), setter=_dict_setter
    )
    return carrier.get("traceparent"), carrier.get("tracestate")


def context_from_traceparent(traceparent: str | None, tracestate: str | None = None) -> Context:
    """The context a stored ``traceparent``/``tracestate`` pair describes (empty if invalid)."""
    if traceparent is not None and not tracestate and _TRACEPARENT.match(traceparent):
        # The common case, parsed directly: the propagator's regex and checks cost more.
        span = trace.NonRecordingSpan(_parse(traceparent))
        return trace.set_span_in_context(span, Context())
    carrier = {"traceparent": traceparent or ""}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)


def span_context_from_traceparent(
    traceparent: str | None, tracestate: str | None = None
) -> trace.SpanContext:
    """The span context of :func:`context_from_traceparent` (invalid if there is none)."""
    if traceparent is not None and not tracestate and _TRACEPARENT.match(traceparent):
        return _parse(traceparent)
    return trace.get_current_span(
        context_from_traceparent(traceparent, tracestate)
    ).get_span_context()


def trace_id_and_flags(traceparent: str | None) -> tuple[int, int] | None:
    """The trace id and flags of a version-00 ``traceparent``, read directly; ``None`` for
    no header or any other form (read those with :func:`span_context_from_traceparent`)."""
    if traceparent is None or not _TRACEPARENT.match(traceparent):
        return None
    return int(traceparent[3:35], 16), int(traceparent[53:55], 16)


def _parse(traceparent: str) -> trace.SpanContext:
    """A version-00 ``traceparent`` that matched ``_TRACEPARENT``."""
    return trace.SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)),
    )


class Instruments:
    """The daemon's OTel metrics. Create once per meter."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.measuring = measures(meter)
        """Whether anything recorded is kept; per-run measurements are skipped if not."""
        self.events_consumed = meter.create_counter(
            "orchestrator.events.consumed", unit="{event}", description="Arrival events accepted"
        )
        self.events_duplicate = meter.create_counter(
            "orchestrator.events.duplicate", unit="{event}", description="Redelivered events"
        )
        self.dead_letters = meter.create_counter(
            "orchestrator.events.dead_lettered", unit="{record}", description="Rejected records"
        )
        self.runs = meter.create_counter(
            "orchestrator.runs", unit="{run}", description="Runs by final or new status"
        )
        self._in_flight_sources: list[Callable[[], Iterable[tuple[str, int]]]] = []
        meter.create_observable_up_down_counter(
            "orchestrator.runs.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{run}",
            description="Runs held by this daemon and not finished, by pipeline",
        )
        self.event_to_step_latency = meter.create_histogram(
            "orchestrator.event_to_step.latency",
            unit="s",
            description="Kafka publish time of the triggering event to first step start",
        )
        self._lag: dict[tuple[str, int], int] = {}
        self._lag_sources: list[Callable[[], Iterable[tuple[str, int, int]]]] = []
        meter.create_observable_gauge(
            "orchestrator.consumer.lag",
            callbacks=[self._observe_lag],
            unit="{record}",
            description="Records behind the partition's highwater mark",
        )

    def observe_in_flight(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Report ``orchestrator.runs.in_flight`` from ``source``: (pipeline, runs) pairs."""
        self._in_flight_sources.append(source)

    def _observe_in_flight(
        self, _options: metrics.CallbackOptions
    ) -> Iterable[metrics.Observation]:
        for source in list(self._in_flight_sources):
            for pipeline, n in source():
                yield metrics.Observation(n, {"pipeline": pipeline})

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag[(topic, partition)] = lag

    def forget_lag(self, topic: str, partition: int) -> None:
        self._lag.pop((topic, partition), None)

    def total_lag(self) -> int:
        return sum(self._lag.values())

    def _observe_lag(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for (topic, partition), lag in list(self._lag.items()):
            yield metrics.Observation(
                lag,
                {
                    "messaging.destination.name": topic,
                    "messaging.destination.partition.id": str(partition),
                },
            )


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What components receive: a tracer, a meter and the instruments built on it."""

    tracer: trace.Tracer
    meter: metrics.Meter
    instruments: Instruments
    recording: bool = True
    """Whether the tracer records spans; when it does not (no exporter), components skip
    building spans and only carry the trace context along."""
    skips_unsampled: bool = False
    """Whether the tracer never records a span whose parent is unsampled (see
    :func:`skips_unsampled`): components then skip building spans under such a parent."""

    @classmethod
    def from_providers(
        cls,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> Telemetry:
        tracer = trace.get_tracer("orchestrator", tracer_provider=tracer_provider)
        meter = metrics.get_meter("orchestrator", meter_provider=meter_provider)
        return cls(
            tracer=tracer,
            meter=meter,
            instruments=Instruments(meter),
            recording=records(tracer),
            skips_unsampled=skips_unsampled(tracer),
        )


def records(tracer: trace.Tracer) -> bool:
    """False when spans of ``tracer`` are certainly never recorded: the API's no-op tracer,
    or an SDK tracer whose sampler is ``ALWAYS_OFF`` (see :func:`install`)."""
    if isinstance(tracer, trace.NoOpTracer):
        return False
    sampler = getattr(tracer, "sampler", None)
    describe = getattr(sampler, "get_description", None)
    return not (callable(describe) and describe() == "AlwaysOffSampler")


def measures(meter: metrics.Meter) -> bool:
    """False when what ``meter``'s instruments record is certainly dropped: the API's no-op
    meter, what :func:`install` sets up without a metrics exporter."""
    return not isinstance(meter, metrics.NoOpMeter)


def skips_unsampled(tracer: trace.Tracer) -> bool:
    """True when ``tracer`` never records a span whose parent span is unsampled: a tracer
    that never records, or an SDK tracer whose sampler is parent-based with ``ALWAYS_OFF``
    for unsampled parents, remote and local (the SDK's default, ``parentbased_*``).

    Under an unsampled parent, such a tracer's spans are non-recording and unsampled, in
    the parent's trace: carrying the parent's context along instead changes nothing a
    backend receives, and saves the SDK's work for each span.
    """
    if not records(tracer):
        return True
    describe = getattr(getattr(tracer, "sampler", None), "get_description", None)
    if not callable(describe):
        return False
    text = str(describe())
    # The root sampler's description comes first: read the parent-based part from the end.
    remote = text.rfind(",remoteParentNotSampled:")
    return (
        text.startswith("ParentBased{")
        and remote > 0
        and text.startswith(",remoteParentNotSampled:AlwaysOffSampler,", remote)
        and text.endswith(",localParentNotSampled:AlwaysOffSampler}")
    )


def unsampled(traceparent: str | None) -> bool:
    """Whether ``traceparent`` is a valid version-00 header of an unsampled span."""
    read = trace_id_and_flags(traceparent)
    return read is not None and not read[1] & trace.TraceFlags.SAMPLED


def _otlp_configured(endpoint: str) -> bool:
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def install(
    service_name: str, otlp_endpoint: str = "", *, record_without_exporter: bool = False
) -> Callable[[], None]:
    """Install global tracer and meter providers; export by OTLP/HTTP when configured.

    Without an exporter the daemon records no spans (they would cost CPU for nothing) but
    still propagates trace context. ``record_without_exporter`` keeps the default sampler,
    for short-lived commands whose sampled flag should not switch tracing off downstream
    (``orchestrator publish``). Returns a function that flushes and shuts the providers down.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name})
    exporting = _otlp_configured(otlp_endpoint)
    # Without an exporter, spans are not recorded (a fifth of the daemon's CPU otherwise);
    # trace context still flows from the producer through runs and announced events.
    off = not exporting and not record_without_exporter
    tracer_provider = TracerProvider(
        resource=resource, sampler=sampling.ALWAYS_OFF if off else None
    )
    readers = []
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        base = otlp_endpoint.rstrip("/")
        span_exporter = (
            OTLPSpanExporter(endpoint=f"{base}/v1/traces") if base else OTLPSpanExporter()
        )
        metric_exporter = (
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics") if base else OTLPMetricExporter()
        )
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    # Without a reader nothing would ever collect the instruments: the API's no-op provider
    # makes every measurement free instead of aggregated for nobody.
    meter_provider: metrics.MeterProvider = (
        MeterProvider(resource=resource, metric_readers=readers)
        if readers
        else metrics.NoOpMeterProvider()
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)

    def shutdown() -> None:
        tracer_provider.shutdown()
        if isinstance(meter_provider, MeterProvider):
            meter_provider.shutdown()

    return shutdown
