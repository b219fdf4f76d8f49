"""HTTP webhook sink (``kind = "http"``): retries with backoff, idempotency keys, timeouts."""

from connectors.http._sink import (
    HttpFactory,
    HttpOptions,
    HttpRejected,
    HttpResponse,
    HttpSink,
    HttpTimeout,
    HttpUnavailable,
    idempotency_key,
)

__all__ = [
    "HttpFactory",
    "HttpOptions",
    "HttpRejected",
    "HttpResponse",
    "HttpSink",
    "HttpTimeout",
    "HttpUnavailable",
    "idempotency_key",
]
