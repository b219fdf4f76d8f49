"""Absence deadlines: fire rules whose expected data did not arrive in time.

Correlation rows carry the moment their rule must be re-examined (``deadline``). This
service sleeps until the earliest one (or until the intake writes an earlier one), then,
in one transaction, locks the due rows (``FOR UPDATE SKIP LOCKED``, so several daemons
share the work), asks each rule's correlator what to do, and creates the runs. A run's
trigger key is the window instance, so a deadline processed twice creates one run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from orchestrator.backoff import backoff_delay
from orchestrator.errors import StoreError
from orchestrator.health import Health
from orchestrator.ingest.writer import FlowPlan, create_firing_run
from orchestrator.store import Store
from orchestrator.triggers import CorrelationState

__all__ = ["DeadlineWatcher"]

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(CorrelationState)
_encoder = msgspec.json.Encoder()
_view_decoder = msgspec.json.Decoder(dict[str, Any])


class DeadlineWatcher:
    def __init__(
        self,
        store: Store,
        plan: FlowPlan,
        health: Health,
        *,
        on_runs_created: Callable[[], None] | None = None,
        longest_sleep: float = 5.0,
    ) -> None:
        self._store = store
        self._plan = plan
        self._health = health
        self._on_runs_created = on_runs_created
        self._longest = longest_sleep
        self._wake = anyio.Event()
        self.fired = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        attempt = 0
        while True:
            self._wake = anyio.Event()
            try:
                created = await self.fire_due()
                due = await self._store.next_due()
            except StoreError as exc:
                self._health.set("postgres", False, str(exc))
                await anyio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            attempt = 0
            if created and self._on_runs_created is not None:
                self._on_runs_created()
            wait = self._longest
            if due is not None:
                wait = min(wait, max(0.0, (due - datetime.now(UTC)).total_seconds() + 0.005))
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def fire_due(self, limit: int = 200) -> int:
        """Handle every correlation whose deadline passed; returns runs created."""
        async with self._store.ingest_tx() as tx:
            due = await tx.due_correlations(limit)
            if not due:
                return 0
            now = await tx.now()
            for rule, key, raw in due:
                corr = self._plan.correlators.get(rule)
                if corr is None:  # the rule was removed: keep the state, stop waking for it
                    await tx.save_correlation(rule, key, raw, None)
                    continue
                state = _decoder.decode(raw)
                firing = corr.on_deadline(state, now)
                if firing is not None:
                    state.fired = True
                    # Params are templated from the event that opened the watch.
                    opener: dict[str, Any] = {}
                    if firing.event_ids:
                        raw_event = await tx.envelope(firing.event_ids[0])
                        if raw_event is not None:
                            opener = _view_decoder.decode(raw_event)
                    await create_firing_run(tx, self._plan, corr, firing, opener, None)
                    self.fired += 1
                    log.info(
                        "rule %r key %r: deadline passed, missing %s",
                        rule,
                        key,
                        ", ".join(firing.missing) or "nothing",
                    )
                deadline = corr.next_deadline(state)
                if deadline is not None and deadline <= now:
                    deadline = None
                await tx.save_correlation(rule, key, _encoder.encode(state), deadline)
            return len(tx.created)
