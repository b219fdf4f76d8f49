"""Group commit of step attempts and run outcomes.

Steps of many concurrent runs finish within milliseconds of each other; writing each
attempt in its own transaction would make Postgres' commit rate the ceiling. The writer
gathers attempts, outcomes and releases while a write is in flight and writes them in
one transaction. Nothing a step does waits for it: a step in flight at a crash runs again
anyway, and a run counts as finished (``on_finished``) only once its outcome and every
attempt before it are durable; until then its lease is held and renewed like any other.
:meth:`OutcomeWriter.room` bounds what may be queued: steps keep running while a write is
in flight (they fill the next one), and wait only when the next one is full too.

Writes are fenced by the lease: rows of runs this daemon no longer holds are refused,
and ``on_lost`` is told, so a daemon that lost a run stops executing it.

A write is retried while Postgres is unavailable. A write Postgres refuses (a value it
cannot store, a constraint) is written again run by run, so that it holds up no other run:
a run whose rows are refused loses them (logged with the reason) and, if its outcome was
queued, is recorded failed with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from orchestrator.backoff import backoff_delay
from orchestrator.errors import StoreError, StoreRejected
from orchestrator.health import Health
from orchestrator.store import AttemptRow, OutboxWrite, RunFinish, Store

__all__ = ["OutcomeWriter"]

log = logging.getLogger(__name__)


class _Flush:
    """Completion of one write, awaited by the callers whose rows it carries."""

    __slots__ = ("done", "held")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.held: set[int] = set()
        """Runs whose outcome or release the write recorded (the lease was still held)."""


class OutcomeWriter:
    def __init__(
        self,
        store: Store,
        owner: str,
        health: Health,
        *,
        on_lost: Callable[[int], None] = lambda _run_id: None,
        on_outbox: Callable[[], None] = lambda: None,
        on_finished: Callable[[list[tuple[RunFinish, bool]]], None] = lambda _results: None,
        max_pending: int = 2048,
        notify_finished: bool = True,
    ) -> None:
        """``on_finished`` receives, after each write, the outcomes it carried and whether
        each was recorded (False: the lease had been lost). ``max_pending`` queued rows make
        :meth:`room` wait until a write takes them. ``notify_finished``: tell other daemons
        when runs finish (they may be waiting to start runs under a concurrency limit)."""
        self._store = store
        self._owner = owner
        self._health = health
        self._on_lost = on_lost
        self._on_outbox = on_outbox
        self._on_finished = on_finished
        self._max_pending = max_pending
        self._notify_finished = notify_finished
        self._outbox: list[OutboxWrite] = []
        self._attempts: dict[tuple[int, str, int], AttemptRow] = {}
        self._finishes: dict[int, RunFinish] = {}
        self._releases: set[int] = set()
        self._pending = anyio.Event()
        self._signalled = False
        """``_pending`` is set: rows queued since the last write need not set it again."""
        self._next = _Flush()
        """The write that will carry what is queued now."""
        self._taken = anyio.Event()
        """Set when a write takes what is queued (see :meth:`room`)."""
        self.flushes = 0

    def add_attempt(self, attempt: AttemptRow) -> None:
        """Queue an attempt's row; a later row for the same attempt replaces it."""
        self._attempts[(attempt.run_id, attempt.step, attempt.attempt)] = attempt
        if not self._signalled:
            self._signal()

    def add_outbox(self, event: OutboxWrite) -> None:
        """Queue an event for the outbox, written with the attempt queued before it."""
        self._outbox.append(event)
        if not self._signalled:
            self._signal()

    def finish(self, outcome: RunFinish) -> None:
        """Queue a run's outcome, written with (after) every attempt queued before it;
        ``on_finished`` reports it once durable."""
        self._finishes[outcome.run_id] = outcome
        if not self._signalled:
            self._signal()

    async def release(self, run_ids: Iterable[int]) -> set[int]:
        """Give runs back to the queue durably (after their attempts are written); returns
        the ones still held."""
        ids = set(run_ids)
        if not ids:
            return set()
        self._releases |= ids
        flush = self._next
        self._signal()
        await flush.done.wait()
        return ids & flush.held

    def _signal(self) -> None:
        self._signalled = True
        self._pending.set()

    async def room(self) -> None:
        """Wait while more than ``max_pending`` rows are queued, until a write takes them
        (backpressure on steps: one write in flight, at most one more queued)."""
        while len(self._attempts) + len(self._finishes) > self._max_pending:
            await self._taken.wait()

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
        """Write everything queued (retrying through outages), then report and wake."""
        self._pending = anyio.Event()
        self._signalled = False
        flush, self._next = self._next, _Flush()
        attempts, self._attempts = self._attempts, {}
        finishes, self._finishes = self._finishes, {}
        releases, self._releases = self._releases, set()
        outbox, self._outbox = self._outbox, []
        taken, self._taken = self._taken, anyio.Event()
        taken.set()
        if not (attempts or finishes or releases or outbox):
            flush.done.set()
            return
        rows = list(attempts.values()), finishes, releases, outbox
        try:
            lost, recorded = await self._write(*rows)
        except StoreRejected as exc:
            log.warning("Postgres rejected a write (%s); writing its runs one by one", exc)
            lost, recorded = await self._write_apart(*rows)
        self.flushes += 1
        if outbox:
            self._on_outbox()
        for run_id in lost:
            self._on_lost(run_id)
        flush.held = recorded
        flush.done.set()
        if finishes:
            self._on_finished([(f, f.run_id in recorded) for f in finishes.values()])

    async def _write(
        self,
        attempts: list[AttemptRow],
        finishes: dict[int, RunFinish],
        releases: set[int],
        outbox: list[OutboxWrite],
    ) -> tuple[set[int], set[int]]:
        """One write, retried while Postgres is unavailable; a rejection is raised."""
        retry = 0
        while True:
            try:
                return await self._store.record_outcomes(
                    self._owner,
                    attempts,
                    list(finishes.values()),
                    list(releases),
                    outbox,
                    notify_finished=self._notify_finished,
                )
            except StoreRejected:
                raise
            except StoreError as exc:
                self._health.set("postgres", False, str(exc))
                await anyio.sleep(backoff_delay(retry))
                retry += 1

    async def _write_apart(
        self,
        attempts: list[AttemptRow],
        finishes: dict[int, RunFinish],
        releases: set[int],
        outbox: list[OutboxWrite],
    ) -> tuple[set[int], set[int]]:
        """Write each run's rows in a write of its own, so that rows Postgres refuses hold
        up no other run. A refused run's rows are dropped (logged with the reason), and its
        outcome, if one was queued, is recorded as failed with that reason."""
        by_run: dict[int, tuple[list[AttemptRow], list[OutboxWrite]]] = {
            run_id: ([], []) for run_id in [*finishes, *releases]
        }
        for a in attempts:
            by_run.setdefault(a.run_id, ([], []))[0].append(a)
        for o in outbox:
            by_run.setdefault(o.run_id, ([], []))[1].append(o)
        lost: set[int] = set()
        recorded: set[int] = set()
        for run_id, (mine, events) in sorted(by_run.items()):
            finish = {run_id: finishes[run_id]} if run_id in finishes else {}
            try:
                one_lost, one_recorded = await self._write(
                    mine, finish, {run_id} & releases, events
                )
            except StoreRejected as exc:
                one_lost, one_recorded = await self._record_refused(run_id, finishes, str(exc))
            lost |= one_lost
            recorded |= one_recorded
        return lost, recorded

    async def _record_refused(
        self, run_id: int, finishes: dict[int, RunFinish], reason: str
    ) -> tuple[set[int], set[int]]:
        """Log that a run's rows were refused, dropped; record the run as failed if its
        outcome was queued (``finishes`` then holds the failed outcome instead)."""
        log.error("run %d: Postgres rejected its rows, dropped: %s", run_id, reason)
        if run_id not in finishes:
            return set(), set()
        error = f"Postgres rejected the run's step attempts: {reason}"
        failed = finishes[run_id] = RunFinish(run_id=run_id, status="failed", error=error[:4000])
        try:
            return await self._write([], {run_id: failed}, set(), [])
        except StoreRejected as again:  # its lease expires; another claim retries
            log.warning("run %d: its failure could not be recorded: %s", run_id, again)
            return set(), set()
