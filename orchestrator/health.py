"""Liveness and readiness: component status, loop responsiveness, and a tiny HTTP probe.

``/livez`` answers 200 while the event loop is responsive (a ticker task runs late by less
than ``stall_seconds``). ``/readyz`` answers 200 when every component (kafka, postgres, ...)
last reported healthy, 503 otherwise, with a JSON body saying which one is not.
"""

from __future__ import annotations

import contextlib
import logging
import time

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus

__all__ = ["Health", "HealthReport", "serve_health"]

log = logging.getLogger(__name__)


class HealthReport(msgspec.Struct, frozen=True):
    live: bool
    ready: bool
    components: dict[str, str]
    loop_lag_seconds: float


class Health:
    """Shared health state; components report, probes read."""

    def __init__(self, *, stall_seconds: float = 10.0) -> None:
        self._components: dict[str, tuple[bool, str]] = {}
        self._stall = stall_seconds
        self._last_tick = time.monotonic()
        self._lag = 0.0
        self.stopping = False

    def expect(self, *names: str) -> None:
        """Declare components that are not ready until they first report healthy."""
        for name in names:
            self._components.setdefault(name, (False, "starting"))

    def set(self, component: str, ok: bool, detail: str = "") -> None:
        previous = self._components.get(component)
        self._components[component] = (ok, "ok" if ok else detail)
        if previous is not None and previous[0] != ok:
            if ok:
                again = "" if previous[1] == "starting" else " again"
                log.info("%s is healthy%s", component, again)
            else:
                log.warning("%s is unhealthy: %s", component, detail)

    def report(self) -> HealthReport:
        lag = max(self._lag, time.monotonic() - self._last_tick - 1.0)
        live = lag < self._stall
        ready = live and not self.stopping and all(ok for ok, _ in self._components.values())
        comps = {name: detail for name, (_, detail) in self._components.items()}
        if self.stopping:
            comps["daemon"] = "stopping"
        return HealthReport(
            live=live, ready=ready, components=comps, loop_lag_seconds=round(lag, 3)
        )

    async def tick(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Measure event-loop responsiveness once a second."""
        task_status.started()
        while True:
            before = time.monotonic()
            await anyio.sleep(1.0)
            now = time.monotonic()
            self._lag = max(0.0, now - before - 1.0)
            self._last_tick = now


_encoder = msgspec.json.Encoder()


async def _handle(stream: SocketStream, health: Health) -> None:
    async with stream:
        try:
            with anyio.fail_after(5):
                request = await stream.receive(4096)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
            return
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        path = parts[1] if len(parts) > 1 else "/"
        report = health.report()
        if path.startswith("/livez"):
            ok = report.live
        elif path.startswith("/readyz"):
            ok = report.ready
        else:
            await _respond(stream, 404, b'{"error": "try /livez or /readyz"}')
            return
        await _respond(stream, 200 if ok else 503, _encoder.encode(report))


async def _respond(stream: SocketStream, status: int, body: bytes) -> None:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(head + body)


async def serve_health(
    health: Health,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/livez`` and ``/readyz`` until cancelled; reports the bound port when started."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("health endpoint on http://%s:%d/readyz", host, bound)
        task_status.started(bound)
        await listener.serve(lambda s: _handle(s, health))
