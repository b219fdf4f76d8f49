"""Group commit of step attempts and run outcomes.

Steps of many concurrent runs finish within milliseconds of each other; writing each
attempt in its own transaction would make Postgres' commit rate the ceiling. The writer
gathers attempts, outcomes and releases while a write is in flight and writes them in
one transaction. Attempt records are not awaited (a step in flight at a crash runs again
anyway); a run's outcome or release is awaited, so a run is reported finished only once
its outcome and every attempt before it are durable.

Writes are fenced by the lease: rows of runs this daemon no longer holds are refused,
and ``on_lost`` is told, so a daemon that lost a run stops executing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from orchestrator.backoff import backoff_delay
from orchestrator.errors import StoreError
from orchestrator.health import Health
from orchestrator.store import AttemptWrite, OutboxWrite, RunFinish, Store

__all__ = ["OutcomeWriter"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    held: bool = False


class OutcomeWriter:
    def __init__(
        self,
        store: Store,
        owner: str,
        health: Health,
        *,
        on_lost: Callable[[int], None] = lambda _run_id: None,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._health = health
        self._on_lost = on_lost
        self._on_outbox = on_outbox
        self._outbox: list[OutboxWrite] = []
        self._attempts: dict[tuple[int, str, int], AttemptWrite] = {}
        self._finishes: dict[int, tuple[RunFinish, _Waiter]] = {}
        self._releases: dict[int, _Waiter] = {}
        self._pending = anyio.Event()
        self.flushes = 0

    def add_attempt(self, attempt: AttemptWrite) -> None:
        """Queue an attempt's row; a later row for the same attempt replaces it."""
        self._attempts[(attempt.run_id, attempt.step, attempt.attempt)] = attempt
        self._pending.set()

    def add_outbox(self, event: OutboxWrite) -> None:
        """Queue an event for the outbox, written with the attempt queued before it."""
        self._outbox.append(event)
        self._pending.set()

    async def finish(self, outcome: RunFinish) -> bool:
        """Record a run's outcome durably; False if the lease had been lost."""
        waiter = _Waiter()
        self._finishes[outcome.run_id] = (outcome, waiter)
        self._pending.set()
        await waiter.done.wait()
        return waiter.held

    async def release(self, run_id: int) -> bool:
        """Give a run back to the queue durably (after its attempts are written)."""
        waiter = _Waiter()
        self._releases[run_id] = waiter
        self._pending.set()
        await waiter.done.wait()
        return waiter.held

    @property
    def idle(self) -> bool:
        return not (self._attempts or self._finishes or self._releases or self._outbox)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._pending.wait()
            await anyio.lowlevel.checkpoint()  # let steps finishing now join this batch
            await self.flush()

    async def flush(self) -> None:
        """Write everything queued (retrying through outages), then wake the waiters."""
        self._pending = anyio.Event()
        attempts, self._attempts = self._attempts, {}
        finishes, self._finishes = self._finishes, {}
        releases, self._releases = self._releases, {}
        outbox, self._outbox = self._outbox, []
        if not (attempts or finishes or releases or outbox):
            return
        retry = 0
        while True:
            try:
                lost, recorded = await self._store.record_outcomes(
                    self._owner,
                    list(attempts.values()),
                    [f for f, _ in finishes.values()],
                    list(releases),
                    outbox,
                )
                break
            except StoreError as exc:
                self._health.set("postgres", False, str(exc))
                await anyio.sleep(backoff_delay(retry))
                retry += 1
        self.flushes += 1
        if outbox:
            self._on_outbox()
        for run_id in lost:
            self._on_lost(run_id)
        for run_id, (_, waiter) in finishes.items():
            waiter.held = run_id in recorded
            waiter.done.set()
        for run_id, waiter in releases.items():
            waiter.held = run_id in recorded
            waiter.done.set()
