"""Helpers shared by the embedded servers: free ports, bounded polling, reaping, log tails."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anyio
from anyio.abc import Process

__all__ = ["backoff", "free_port", "log_tail", "open_log", "reap"]


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``.

    The port is released before the caller binds it, so another process may take it in
    between; callers retry with a fresh port when their server fails to bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def backoff(initial: float = 0.005, maximum: float = 0.2) -> Iterator[float]:
    """Delays for polling a condition: ``initial``, doubled each time, capped at ``maximum``."""
    delay = initial
    while True:
        yield delay
        delay = min(delay * 2, maximum)


def open_log(path: Path) -> IO[bytes]:
    """Open ``path`` for appending child output (a file, never a pipe that can fill)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab", buffering=0)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, indented for an error message."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode(errors="replace")
    except OSError:
        return f"    (no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) or "    (log is empty)"


async def reap(process: Process, *, grace: float, kill_first: bool = False) -> None:
    """SIGTERM ``process``, wait up to ``grace`` seconds, then SIGKILL; always waits for it.

    Shielded from cancellation so a cancelled caller never leaves a child behind, and
    bounded: at most ``grace`` seconds plus the (short) wait after SIGKILL.
    """
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if kill_first:
                    process.kill()
                else:
                    process.terminate()
            with anyio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with anyio.move_on_after(5):
                await process.wait()
        with anyio.move_on_after(1):
            await process.aclose()
