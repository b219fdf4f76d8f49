"""Postgres CPU per run of the daemon's two hot statements while the tables grow from empty.

Run ``python -m bench.plans`` from the repository root. It starts a Postgres (fsync on),
and for each planner setting creates a fresh schema and writes ``--runs`` runs in batches of
``--batch``, as the daemon does: one intake statement (events and their runs, leased to the
daemon) and one group-commit statement (three step attempts per run and the runs' outcomes).
It prints the Postgres backend's CPU per run for each sixth of the runs, and the client's
CPU per run in the two statements (asyncpg binding, protocol, results), and writes
``bench/results/plans-<UTC timestamp>.json``.

Settings: ``server`` (the server's planner settings) and ``daemon`` (what the daemon's
sessions set, :data:`orchestrator.store.KEY_LOOKUP_PLANNER`). Statements stay prepared, so
Postgres reuses a plan made while the tables were nearly empty; with the server's settings
that plan reads the runs table end to end, and its cost grows with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench.infra import cpu_seconds
from bench.report import write_stamped
from orchestrator.dev import EmbeddedPostgres
from orchestrator.events import Arrival, CloudEvent
from orchestrator.store import (
    KEY_LOOKUP_PLANNER,
    AttemptWrite,
    IncomingEvent,
    RunFinish,
    RunRequest,
    Store,
)

SETTINGS: dict[str, dict[str, str] | None] = {"server": None, "daemon": KEY_LOOKUP_PLANNER}
_ENVELOPE = b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":{"dataset":"d"}}'
_OWNER = "bench-plans"


def _cpu_seconds(pid: int) -> float:
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"the Postgres backend {pid} is gone")
    return seconds


def _ingest_args(
    first: int, n: int, now: datetime
) -> tuple[list[IncomingEvent], list[tuple[IncomingEvent, RunRequest, bool]]]:
    """``n`` new events, and one run per event owned by the writer, as the daemon's intake
    passes them to :meth:`Store.ingest_simple`."""
    events = [
        IncomingEvent(
            event=CloudEvent(
                specversion="1.0",
                id=f"e{first + i}",
                source="src",
                type="t",
                time=now,
                data=Arrival(dataset="d"),
            ),
            envelope=_ENVELOPE,
            topic="topic",
            partition=0,
            offset=first + i,
            published_at=now,
        )
        for i in range(n)
    ]
    runs = [
        (e, RunRequest(rule="rule", pipeline="p", trigger_key=f"event:src#{e.event.id}"), True)
        for e in events
    ]
    return events, runs


async def _measure(
    pg: EmbeddedPostgres, name: str, runs: int, batch: int
) -> tuple[list[float], float]:
    """µs of backend CPU per run, for each sixth of ``runs``; and µs of this process's CPU
    per run in the two statements (binding, protocol, results), over all runs."""
    schema = f"bench_plans_{name}"
    async with (
        Store.open(pg.dsn, schema="public", min_size=1, max_size=1) as admin,
        admin.pool.acquire() as conn,
    ):
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
    async with Store.open(
        pg.dsn, schema=schema, min_size=1, max_size=1, planner=SETTINGS[name]
    ) as store:
        await store.migrate()
        async with store.pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        batches = runs // batch
        sixth = max(1, batches // 6)
        figures: list[float] = []
        cpu0 = _cpu_seconds(pid)
        client = 0.0
        for b in range(batches):
            now = datetime.now(UTC)
            events, requests = _ingest_args(b * batch, batch, now)
            c0 = time.process_time()
            _, created = await store.ingest_simple(events, requests, _OWNER, 30.0)
            client += time.process_time() - c0
            ids = [run_id for run_id, *_ in created]
            attempts = [
                AttemptWrite(
                    run_id=i,
                    step=s,
                    attempt=1,
                    status="succeeded",
                    output=b"1",
                    started_at=now,
                    finished_at=now,
                )
                for i in ids
                for s in ("a", "b", "c")
            ]
            finishes = [RunFinish(run_id=i, status="succeeded") for i in ids]
            c0 = time.process_time()
            await store.record_outcomes(_OWNER, attempts, finishes, notify_finished=False)
            client += time.process_time() - c0
            if (b + 1) % sixth == 0 and len(figures) < 6:
                cpu1 = _cpu_seconds(pid)
                figures.append(round((cpu1 - cpu0) / (sixth * batch) * 1e6, 1))
                cpu0 = cpu1
        return figures, round(client / (batches * batch) * 1e6, 1)


async def _main(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "batch": args.batch,
        "us_per_run_by_sixth": {},
        "client_us_per_run": {},
    }
    async with EmbeddedPostgres() as pg:
        for name in args.settings.split(","):
            figures, client = await _measure(pg, name, args.runs, args.batch)
            out["us_per_run_by_sixth"][name] = figures
            out["client_us_per_run"][name] = client
            print(
                f"{name:>7} planner: Postgres µs CPU per run, by sixth of {args.runs:,} runs "
                f"in batches of {args.batch}: "
                + " ".join(f"{f:.0f}" for f in figures)
                + f"; client µs per run in the two statements: {client:.1f}",
                flush=True,
            )
    print(f"wrote {write_stamped('plans', out)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=28_800)
    p.add_argument("--batch", type=int, default=16, help="runs per statement (W2 at 1,000/s)")
    p.add_argument("--settings", default="server,daemon", help="comma-separated: server, daemon")
    args = p.parse_args()
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings: {', '.join(sorted(unknown))}")
    anyio.run(_main, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
