"""Webhook sink: HTTP requests with timeouts, retries with backoff, and idempotency keys."""

from __future__ import annotations

import email.utils
import logging
import ssl
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, NamedTuple

import anyio
import httpx
import msgspec

from connectors.base import (
    Connector,
    ConnectorRejected,
    ConnectorTimeout,
    ConnectorUnavailable,
    Options,
    parse_options,
    read_secret,
)
from orchestrator import RetryPolicy, StepContext

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

log = logging.getLogger("connectors.http")

_NAMESPACE = uuid.UUID("6f1d3c2e-8a4b-5d7e-9f10-2b3c4d5e6f70")
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_RETRY_STATUSES = frozenset({408, 429})
_NOT_PROCESSED_STATUSES = frozenset({429})  # the server says it did not act on the request
_UNSET: Any = object()
_json = msgspec.json.Encoder()


def idempotency_key(ctx: StepContext, *parts: str | int) -> str:
    """A key that is the same for every attempt of this step in this run, and only for it.

    Derived from the pipeline, run id and step (plus ``parts``, e.g. an item id when a step
    posts several times), never from the attempt, so a retried or resumed step sends the
    same key and the receiver can drop the duplicate. A UUID string, safe as a header.
    """
    name = "/".join(str(p) for p in (ctx.pipeline, ctx.run_id, ctx.step, *parts))
    return str(uuid.uuid5(_NAMESPACE, name))


class HttpOptions(Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of ``kind = "http"``."""

    secret_fields: ClassVar[frozenset[str]] = frozenset({"bearer_token", "headers"})

    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    """Requests go to ``base_url`` + ``path``, e.g. ``https://hooks.example.com/v1``."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Headers sent with every request (e.g. an API key; prefer ``bearer_token_file``)."""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Seconds one attempt may take to connect, send and read the answer."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 4
    """Attempts per call, the first one included; 1 never retries."""
    backoff_initial: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    """Seconds before the first retry; doubled each retry, ±20 % jitter."""
    backoff_max: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Upper bound of one wait, also of a server's ``Retry-After``."""
    bearer_token: str = ""
    """Sent as ``Authorization: Bearer ...``. Prefer ``bearer_token_file``; never logged."""
    bearer_token_file: str = ""
    """File holding the bearer token (read when the connector opens); wins over ``bearer_token``."""
    ca_file: str = ""
    """CA bundle to verify the server's certificate (default: the system's)."""


class HttpResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The final answer of a call; msgspec-serializable, so a step may return it."""

    status: int
    headers: dict[str, str]
    body: bytes
    attempts: int
    """How many attempts the call took."""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class HttpRejected(ConnectorRejected):
    """The server answered 4xx (other than 408/429): the request itself is wrong."""

    def __init__(self, message: str, *, connector: str, response: HttpResponse) -> None:
        super().__init__(message, connector=connector)
        self.response = response
        self.status = response.status


class HttpUnavailable(ConnectorUnavailable):
    """5xx, 408 or 429 on the last attempt. ``response`` is ``None`` when nothing came back."""

    def __init__(
        self, message: str, *, connector: str, response: HttpResponse | None = None
    ) -> None:
        super().__init__(message, connector=connector)
        self.response = response
        self.status = response.status if response is not None else None


class HttpTimeout(HttpUnavailable, ConnectorTimeout):
    """No answer within ``timeout`` seconds on the last attempt."""


class HttpSink(Connector):
    """Sends requests to one HTTP service (a webhook receiver, an API).

    POST retries on 5xx, 408, 429 and transport errors only when the call carries an
    ``idempotency_key`` (without one, only failures where the request surely did not reach
    the server are retried: connection refused, 429). PUT, DELETE and GET are idempotent by
    definition and always retried. 4xx raises :class:`HttpRejected` at once.
    """

    kind = "http"

    def __init__(self, name: str, options: HttpOptions) -> None:
        super().__init__(name)
        self.options = options
        self._policy = RetryPolicy(
            max_attempts=options.max_attempts,
            initial_backoff=options.backoff_initial,
            max_backoff=options.backoff_max,
        )
        self._client: httpx.AsyncClient | None = None

    async def _open(self) -> None:
        o = self.options
        headers = dict(o.headers)
        token = o.bearer_token
        if o.bearer_token_file:
            token = read_secret(o.bearer_token_file, connector=self.name, key="bearer_token_file")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            base_url=o.base_url,
            headers=headers,
            timeout=httpx.Timeout(o.timeout),
            verify=ssl.create_default_context(cafile=o.ca_file) if o.ca_file else True,
            follow_redirects=False,
        )

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post(
        self,
        path: str = "",
        *,
        idempotency_key: str | None,
        json: Any = _UNSET,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        attempt_timeout: float | None = None,
    ) -> HttpResponse:
        """POST ``json`` (encoded with msgspec: Structs, datetimes, ...) or raw ``content``.

        ``idempotency_key`` is required as a keyword: pass ``idempotency_key(ctx)`` so the
        receiver can drop duplicates of a retried step, or ``None`` to opt out (then only
        requests that surely did not reach the server are retried).
        """
        return await self.request(
            "POST",
            path,
            json=json,
            content=content,
            params=params,
            headers=headers,
            idempotency_key=idempotency_key,
            attempt_timeout=attempt_timeout,
        )

    async def put(
        self,
        path: str = "",
        *,
        json: Any = _UNSET,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        attempt_timeout: float | None = None,
    ) -> HttpResponse:
        """PUT ``json`` or ``content`` (idempotent, so always retried)."""
        return await self.request(
            "PUT",
            path,
            json=json,
            content=content,
            params=params,
            headers=headers,
            idempotency_key=idempotency_key,
            attempt_timeout=attempt_timeout,
        )

    async def request(
        self,
        method: str,
        path: str = "",
        *,
        json: Any = _UNSET,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        attempt_timeout: float | None = None,
    ) -> HttpResponse:
        """Send one request with retries; return the first answer below 400.

        Raises :class:`HttpRejected` (4xx), :class:`HttpUnavailable` (5xx/408/429 or a
        transport error once the attempts are used up) or :class:`HttpTimeout`.
        """
        self._check_open()
        method = method.upper()
        send_headers = dict(headers or {})
        body = content
        if json is not _UNSET:
            if content is not None:
                raise TypeError("pass json= or content=, not both")
            body = _json.encode(json)
            send_headers.setdefault("Content-Type", "application/json")
        if idempotency_key is not None:
            send_headers["Idempotency-Key"] = idempotency_key
        safe = method in _IDEMPOTENT_METHODS or idempotency_key is not None
        call = _Call(
            method=method,
            path=path,
            body=body,
            params=params,
            headers=send_headers,
            timeout=attempt_timeout if attempt_timeout is not None else self.options.timeout,
            where=f"{method} {self.options.base_url.rstrip('/')}/{path.lstrip('/')}".split("?")[0],
        )
        attempts = self.options.max_attempts
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._attempt(call, attempt)
            if isinstance(outcome, HttpResponse):
                return outcome
            if attempt >= attempts or not (safe or not outcome.reached_server):
                raise outcome.error
            delay = self._policy.delay(attempt)
            if outcome.retry_after is not None:
                delay = min(max(delay, outcome.retry_after), self.options.backoff_max)
            log.warning("%s; retrying in %.2fs", outcome.error, delay)
            await anyio.sleep(delay)

    async def _attempt(self, call: _Call, attempt: int) -> HttpResponse | _Failure:
        """One attempt: the answer below 400, a retryable failure, or HttpRejected raised."""
        assert self._client is not None
        of = f"attempt {attempt} of {self.options.max_attempts}"
        prefix = f"connector {self.name!r}: {call.where}"
        try:
            resp = await self._client.request(
                call.method,
                call.path,
                content=call.body,
                params=call.params,
                headers=call.headers,
                timeout=httpx.Timeout(call.timeout),
            )
        except httpx.TimeoutException as exc:
            return _Failure(
                HttpTimeout(
                    f"{prefix}: no answer within {call.timeout:g}s ({type(exc).__name__}, {of})",
                    connector=self.name,
                ),
                reached_server=not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout),
            )
        except httpx.TransportError as exc:
            return _Failure(
                HttpUnavailable(
                    f"{prefix}: {type(exc).__name__}: {exc} ({of})", connector=self.name
                ),
                reached_server=not isinstance(exc, httpx.ConnectError),
            )
        response = HttpResponse(
            status=resp.status_code,
            headers=dict(resp.headers),
            body=resp.content,
            attempts=attempt,
        )
        if resp.status_code < 400:
            return response
        reason = f"HTTP {resp.status_code} {resp.reason_phrase}".rstrip()
        if resp.status_code >= 500 or resp.status_code in _RETRY_STATUSES:
            return _Failure(
                HttpUnavailable(
                    f"{prefix}: {reason}{_snippet(response)} ({of})",
                    connector=self.name,
                    response=response,
                ),
                reached_server=resp.status_code not in _NOT_PROCESSED_STATUSES,
                retry_after=_retry_after(resp.headers.get("Retry-After")),
            )
        raise HttpRejected(
            f"{prefix}: {reason}{_snippet(response)}; the server refused the request,"
            " sending it again unchanged cannot succeed",
            connector=self.name,
            response=response,
        )

    def __repr__(self) -> str:
        return f"<HttpSink {self.name!r} base_url={self.options.base_url!r} {self.state}>"


class _Call(NamedTuple):
    method: str
    path: str
    body: bytes | None
    params: Mapping[str, str] | None
    headers: dict[str, str]
    timeout: float
    where: str
    """``METHOD url`` without the query string, for messages and logs."""


class _Failure(NamedTuple):
    error: HttpUnavailable
    reached_server: bool
    """False when the request surely never reached the server (connect failed, 429)."""
    retry_after: float | None = None


def _snippet(response: HttpResponse, limit: int = 200) -> str:
    text = response.text.strip()
    if not text:
        return ""
    return f": {text[:limit]}{'...' if len(text) > limit else ''}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class HttpFactory:
    """HTTP webhook sink: POST/PUT with timeouts, retries and idempotency keys."""

    options_type = HttpOptions
    path_options = frozenset({"ca_file"})

    def create(self, name: str, options: Mapping[str, Any]) -> HttpSink:
        return HttpSink(name, parse_options(name, options, HttpOptions))
