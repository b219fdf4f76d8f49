"""Shared machinery of the fault scenarios: config, load generator, daemons, and the audit."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
from aiokafka import AIOKafkaProducer

from orchestrator.events import encode_structured, new_arrival
from orchestrator.store import Store
from tests.support.helpers import wait_for
from tests.support.procs import DaemonProcess

HERE = Path(__file__).resolve().parent

POISON = [
    b"{definitely not json",
    b'{"specversion":"1.0","id":"p-2","source":"fault","type":"data.arrived","data":{}}',
    b'{"specversion":"9.9","id":"p-3","source":"fault","type":"t","data":{"dataset":"x"}}',
    b'{"specversion":"1.0","id":"p-4","source":"fault","type":"t","data":{"dataset":7}}',
    b"\xc3\x28\xa0\xa1 invalid utf-8",
]


def expected_runs(rows: list[int]) -> int:
    """Runs the fault rules create for events with these row counts (chain + side)."""
    return len(rows) + sum(1 for r in rows if r > 50)


def write_config(
    path: Path,
    *,
    bootstrap: str,
    topic: str,
    dsn: str,
    schema: str,
    lease: float = 3.0,
    grace: float = 3.0,
) -> Path:
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "g-{topic}"
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
max_batch = 200

[postgres]
dsn = "{dsn}"
schema = "{schema}"
pool_max = 6

[rules]
files = ["{HERE / "rules.toml"}"]

[pipelines]
paths = ["{HERE}"]
modules = ["fault_pipelines"]

[runner]
lease_seconds = {lease}
shutdown_grace_seconds = {grace}
max_concurrent_runs = 32
"""
    )
    return path


async def migrate(dsn: str, schema: str) -> None:
    async with Store.open(dsn, schema=schema, min_size=1, max_size=1) as store:
        await store.migrate()


@dataclass
class Load:
    """What a scenario published."""

    rows: list[int] = field(default_factory=list)
    poison: int = 0


async def publish_load(
    bootstrap: str,
    topic: str,
    events: int,
    *,
    poison: int = 0,
    burst: int = 100,
    pause: float = 0.02,
    load: Load | None = None,
    seed: int = 7,
) -> Load:
    """Publish ``events`` arrival events in bursts, with ``poison`` bad records among them."""
    rng = random.Random(seed)
    load = load or Load()
    poison_at = set(rng.sample(range(events), poison)) if poison else set()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for i in range(events):
            rows = rng.randrange(100)
            ev = new_arrival("fault.orders", partition=f"p{i % 40}", rows=rows, source="fault")
            await producer.send(topic, encode_structured(ev), key=ev.key.encode())
            load.rows.append(rows)
            if i in poison_at:
                bad = POISON[load.poison % len(POISON)]
                await producer.send(topic, bad, key=ev.key.encode())
                load.poison += 1
            if i % burst == burst - 1:
                await producer.flush()
                await anyio.sleep(pause)
        await producer.flush()
    finally:
        await producer.stop()
    return load


async def settled(dsn: str, schema: str, load: Load) -> bool:
    """All events stored, all expected runs created and ended, all poison dead-lettered."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM events) AS events,
                      (SELECT count(*) FROM runs) AS runs,
                      (SELECT count(*) FROM runs
                        WHERE status IN ('succeeded', 'failed', 'cancelled')) AS ended,
                      (SELECT count(*) FROM dead_letters) AS dead"""
        )
    except (asyncpg.PostgresError, OSError):
        return False
    finally:
        await conn.close()
    assert row is not None
    want = expected_runs(load.rows)
    return bool(
        row["events"] == len(load.rows)
        and row["runs"] == want
        and row["ended"] == want
        and row["dead"] == load.poison
    )


async def wait_settled(
    dsn: str, schema: str, load: Load, daemons: list[DaemonProcess], within: float = 150.0
) -> None:
    try:
        await wait_for(lambda: settled(dsn, schema, load), within=within, what="settled")
    except TimeoutError:
        pass
    else:
        return
    logs = "\n\n".join(f"== daemon {i}\n{d.log_tail()}" for i, d in enumerate(daemons))
    raise AssertionError(f"the system did not settle within {within}s\n{logs}")


@dataclass
class Audit:
    events: int
    runs: int
    succeeded: int
    not_succeeded: int
    duplicate_runs: int
    lost_runs: int
    dead_letters: int
    redone_after_success: int
    executions: int
    attempts: int
    interrupted_attempts: int

    def line(self, scenario: str, **extra: object) -> str:
        parts = [f"{k}={v}" for k, v in extra.items()]
        parts += [
            f"events={self.events}",
            f"runs={self.runs}",
            f"succeeded={self.succeeded}",
            f"executions={self.executions}",
            f"attempts={self.attempts}",
            f"interrupted={self.interrupted_attempts}",
            f"dead_letters={self.dead_letters}",
            f"duplicates={self.duplicate_runs}",
            f"lost={self.lost_runs}",
            f"redone={self.redone_after_success}",
        ]
        return f"[fault:{scenario}] " + " ".join(parts)


async def audit(dsn: str, schema: str, load: Load, effects: Path) -> Audit:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        events = await conn.fetchval("SELECT count(*) FROM events")
        runs = await conn.fetch("SELECT id, rule, trigger_key, status FROM runs")
        dup = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM runs GROUP BY rule, trigger_key "
            "HAVING count(*) > 1) d"
        )
        steps = await conn.fetch(
            """SELECT run_id, step,
                      count(*) FILTER (WHERE status = 'succeeded') AS ok,
                      max(attempt) FILTER (WHERE status = 'succeeded') AS ok_attempt,
                      max(attempt) AS last, count(*) AS attempts,
                      count(*) FILTER (WHERE status = 'interrupted') AS interrupted
               FROM step_attempts GROUP BY run_id, step"""
        )
        dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await conn.close()
    executed: Counter[tuple[int, str]] = Counter()
    after_success = 0
    ok_attempt = {(s["run_id"], s["step"]): s["ok_attempt"] for s in steps}
    path = anyio.Path(effects)
    text = await path.read_text() if await path.exists() else ""
    for line in text.splitlines():
        run_id, step, attempt, _pid = line.split()
        executed[(int(run_id), step)] += 1
        done_at = ok_attempt.get((int(run_id), step))
        if done_at is not None and int(attempt) > done_at:
            after_success += 1
    redone = sum(1 for s in steps if s["ok"] > 1 or (s["ok"] and s["ok_attempt"] < s["last"]))
    statuses = Counter(r["status"] for r in runs)
    return Audit(
        events=events,
        runs=len(runs),
        succeeded=statuses["succeeded"],
        not_succeeded=len(runs) - statuses["succeeded"],
        duplicate_runs=dup,
        lost_runs=max(0, expected_runs(load.rows) - len(runs)),
        dead_letters=dead,
        redone_after_success=redone + after_success,
        executions=sum(executed.values()),
        attempts=sum(s["attempts"] for s in steps),
        interrupted_attempts=sum(s["interrupted"] for s in steps),
    )
