"""The HTTP sink against a real local HTTP server (scripted answers, recorded requests)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from connectors import ConnectorTimeout, ConnectorUnavailable, create, open_all
from connectors.http import (
    HttpRejected,
    HttpResponse,
    HttpSink,
    HttpTimeout,
    HttpUnavailable,
    idempotency_key,
)
from orchestrator import StepContext

pytestmark = pytest.mark.anyio

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05}


@dataclass
class Answer:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (cut short when the test ends)."""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Server:
    """A threaded HTTP server on 127.0.0.1 that answers from a script and records requests."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.seen: list[Seen] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                answer = server.script.pop(0) if server.script else Answer()
                if answer.delay:
                    server.release.wait(answer.delay)
                try:
                    self.send_response(answer.status)
                    for k, v in answer.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except OSError:
                    pass  # the client gave up (timeout test)

            do_POST = do_PUT = do_GET = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
async def hooks(server: Server, tmp_path: Path) -> AsyncIterator[HttpSink]:
    (tmp_path / "token").write_text("t0ken-from-file\n")
    config = {
        "hooks": {
            "kind": "http",
            "base_url": server.url + "/v1",
            "headers": {"X-Source": "orchestrator"},
            "bearer_token_file": "token",
            "max_attempts": 4,
            **FAST,
        }
    }
    async with open_all(config, base_dir=tmp_path) as opened:
        sink = opened["hooks"]
        assert isinstance(sink, HttpSink)
        yield sink


def step_context(sink: HttpSink, *, attempt: int = 1, step: str = "notify") -> StepContext:
    return StepContext.create(
        run_id=42, pipeline="daily", step=step, attempt=attempt, connectors={"hooks": sink}
    )


class Delivered(msgspec.Struct, frozen=True):
    partition: str
    rows: int


async def test_retries_on_503_then_succeeds_with_one_idempotency_key(
    hooks: HttpSink, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = [
        Answer(503, b"busy"),
        Answer(503, b"busy"),
        Answer(201, b'{"id": 9}'),
    ]

    async def notify(ctx: StepContext) -> HttpResponse:
        response: HttpResponse = await ctx.connectors["hooks"].post(
            path="/deliveries",
            json=Delivered("2026-11-24", 3),
            idempotency_key=idempotency_key(ctx),
        )
        return response

    response = await notify(step_context(hooks))
    assert response.status == 201
    assert response.attempts == 3
    assert response.json() == {"id": 9}
    assert len(server.seen) == 3
    keys = {s.headers["Idempotency-Key"] for s in server.seen}
    assert keys == {idempotency_key(step_context(hooks))}
    for seen in server.seen:
        assert seen.method == "POST"
        assert seen.path == "/v1/deliveries"
        assert json.loads(seen.body) == {"partition": "2026-11-24", "rows": 3}
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.headers["Authorization"] == "Bearer t0ken-from-file"
        assert seen.headers["X-Source"] == "orchestrator"
    assert all("t0ken" not in r.getMessage() for r in caplog.records)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
    # The response is a step output the store can keep.
    assert msgspec.json.decode(msgspec.json.encode(response), type=HttpResponse) == response


async def test_no_retry_on_400(hooks: HttpSink, server: Server) -> None:
    server.script = [Answer(400, b'{"error": "rows must be positive"}')]
    with pytest.raises(HttpRejected) as info:
        await hooks.post("/deliveries", json={"rows": -1}, idempotency_key="k-1")
    err = info.value
    assert err.retryable is False
    assert err.status == 400
    assert err.connector == "hooks"
    assert "HTTP 400" in str(err)
    assert "rows must be positive" in str(err)
    assert len(server.seen) == 1


async def test_429_is_retried_after_the_servers_delay(hooks: HttpSink, server: Server) -> None:
    server.script = [Answer(429, b"", {"Retry-After": "0"}), Answer(200)]
    response = await hooks.post("/x", json={}, idempotency_key=None)
    assert response.status == 200
    assert response.attempts == 2


async def test_without_a_key_a_post_that_may_have_been_processed_is_not_retried(
    hooks: HttpSink, server: Server
) -> None:
    server.script = [Answer(503), Answer(200)]
    with pytest.raises(HttpUnavailable) as info:
        await hooks.post("/x", json={}, idempotency_key=None)
    assert info.value.retryable is True
    assert info.value.status == 503
    assert "attempt 1 of 4" in str(info.value)
    assert len(server.seen) == 1
    assert "Idempotency-Key" not in server.seen[0].headers
    # PUT is idempotent by definition: retried without a key.
    server.script = [Answer(503), Answer(204, b"")]
    assert (await hooks.put("/x", content=b"v")).status == 204


async def test_exhausted_retries_raise_a_retryable_error(hooks: HttpSink, server: Server) -> None:
    server.script = [Answer(502)] * 4
    with pytest.raises(HttpUnavailable, match="attempt 4 of 4") as info:
        await hooks.post("/x", json={}, idempotency_key="k")
    assert isinstance(info.value, ConnectorUnavailable)
    assert info.value.retryable
    assert len(server.seen) == 4


async def test_timeout(server: Server) -> None:
    server.script = [Answer(delay=10), Answer(delay=10)]
    sink = create(
        "slow",
        {"kind": "http", "base_url": server.url, "timeout": 0.3, "max_attempts": 2, **FAST},
    )
    assert isinstance(sink, HttpSink)
    started = time.monotonic()
    async with sink:
        with pytest.raises(HttpTimeout, match=r"no answer within 0\.3s") as info:
            await sink.post("/x", json={}, idempotency_key="k")
    assert isinstance(info.value, ConnectorTimeout)
    assert info.value.retryable
    assert len(server.seen) == 2
    assert time.monotonic() - started < 5
    # A per-call limit overrides the option.
    server.script = [Answer(delay=10)]
    async with create("slow", {"kind": "http", "base_url": server.url, "max_attempts": 1}) as s:
        assert isinstance(s, HttpSink)
        with pytest.raises(HttpTimeout, match=r"within 0\.2s"):
            await s.post("/x", json={}, idempotency_key="k", attempt_timeout=0.2)


async def test_connection_refused_is_retried_and_unavailable() -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}"
        sink = create("down", {"kind": "http", "base_url": url, "max_attempts": 3, **FAST})
        await _post_refused(sink)


async def _post_refused(sink: Any) -> None:
    async with sink:
        assert isinstance(sink, HttpSink)
        with anyio.fail_after(10), pytest.raises(HttpUnavailable, match="ConnectError") as info:
            await sink.post("/x", json={}, idempotency_key=None)
    assert "attempt 3 of 3" in str(info.value)
    assert info.value.retryable
    assert info.value.status is None


def test_idempotency_key_is_per_run_and_step_not_per_attempt() -> None:
    def ctx(run_id: int = 1, step: str = "s", attempt: int = 1) -> StepContext:
        return StepContext.create(run_id=run_id, pipeline="p", step=step, attempt=attempt)

    key = idempotency_key(ctx())
    assert key == idempotency_key(ctx(attempt=3))
    assert key != idempotency_key(ctx(run_id=2))
    assert key != idempotency_key(ctx(step="t"))
    assert key != idempotency_key(ctx(step="s[0]"))  # items of a mapped step
    assert idempotency_key(ctx(), "item-7") == idempotency_key(ctx(attempt=2), "item-7")
    assert idempotency_key(ctx(), "item-7") != key
    assert key.isascii()
    assert len(key) == 36
