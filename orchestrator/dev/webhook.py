"""A local webhook receiver for ``orchestrator dev``: logs each request and answers 200.

It stands in for the HTTP endpoint a pipeline notifies, so the example chain runs end to
end on one machine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from anyio.abc import SocketAttribute, SocketStream

__all__ = ["webhook_receiver"]

log = logging.getLogger(__name__)


async def _handle(stream: SocketStream) -> None:
    async with stream:
        data = b""
        with anyio.move_on_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive(65536)
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            while len(body) < length:
                body += await stream.receive(65536)
            log.info(
                "webhook received %s (Idempotency-Key %s): %s",
                lines[0],
                headers.get("idempotency-key", "-"),
                body[:500].decode("utf-8", "replace"),
            )
            reply = b'{"ok": true}'
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(reply)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + reply
            )


@contextlib.asynccontextmanager
async def webhook_receiver(port: int = 0) -> AsyncIterator[str]:
    """Serve on 127.0.0.1 for the block; yields the base URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    async with listener, anyio.create_task_group() as tg:
        bound = listener.extra(SocketAttribute.local_port)

        async def _serve() -> None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await listener.serve(_handle)

        tg.start_soon(_serve)
        try:
            yield f"http://127.0.0.1:{bound}"
        finally:
            tg.cancel_scope.cancel()
