"""Daemon processes for end-to-end and fault tests: started like a user would, killed at will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import anyio
import httpx
from anyio.abc import Process

from orchestrator.dev._proc import free_port

ROOT = Path(__file__).resolve().parents[2]


class DaemonProcess:
    """``python -m orchestrator --config CONFIG run`` with its own health port and log file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.health_port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "ORCH_HEALTH__PORT": str(self.health_port),
            **(env or {}),
        }
        self.process: Process | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self._log = self.log_path.open("ab", buffering=0)
        self._log.write(f"--- start {self.starts}\n".encode())
        self.process = await anyio.open_process(
            [sys.executable, "-m", "orchestrator", "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(ROOT),
        )
        self.starts += 1

    async def ready(self, within: float = 30.0) -> None:
        """Wait until ``/readyz`` answers 200."""
        async with httpx.AsyncClient(timeout=1.0) as client:
            with anyio.fail_after(within):
                while True:
                    if not self.running:
                        raise AssertionError(f"daemon exited early; log: {self.log_tail()}")
                    try:
                        r = await client.get(f"http://127.0.0.1:{self.health_port}/readyz")
                        if r.status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.05)

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, within: float = 30.0) -> int:
        assert self.process is not None
        with anyio.fail_after(within):
            code = await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait()

    async def stop(self, within: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return await self.wait(within)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def aclose(self) -> None:
        if self.running:
            self.signal(signal.SIGKILL)
            with anyio.move_on_after(10, shield=True):
                await self.wait()
