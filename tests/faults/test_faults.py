"""Fault scenarios: daemons killed and restarted, Postgres restarted, SIGTERM mid-load.

Each scenario runs real daemon processes against the session's broker and Postgres, then
audits Postgres and the step-effects log: every event stored once, exactly one run per
matching rule, every run ended, no step re-executed after its success was recorded, and
dead letters only for the poison records. Each prints a ``[fault:...]`` line of counts.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from orchestrator.dev import EmbeddedBroker, EmbeddedPostgres
from tests.conftest import PgSchema
from tests.faults.harness import (
    Load,
    audit,
    migrate,
    publish_load,
    wait_settled,
    write_config,
)
from tests.support.helpers import wait_for
from tests.support.procs import DaemonProcess

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Show a scenario's counts in the test output, even when output is captured."""
    with capsys.disabled():
        print(f"\n{line}")


def daemons_for(config: Path, tmp_path: Path, effects: Path, count: int) -> list[DaemonProcess]:
    env = {"ORCH_FAULT_EFFECTS": str(effects)}
    return [DaemonProcess(config, tmp_path / f"daemon-{i}.log", env) for i in range(count)]


async def test_two_daemons_killed_and_restarted_lose_and_duplicate_nothing(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path / "orchestrator.toml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=pg_dsn,
        schema=pg_schema.name,
    )
    effects = tmp_path / "effects.log"
    await migrate(pg_dsn, pg_schema.name)
    daemons = daemons_for(config, tmp_path, effects, 2)
    rng = random.Random(11)
    kills = 0
    load = Load()
    try:
        for d in daemons:
            await d.start()
        await daemons[0].ready()

        async def killer() -> None:
            nonlocal kills
            for _ in range(4):
                await anyio.sleep(rng.uniform(0.8, 2.0))
                victim = rng.choice(daemons)
                await victim.kill()
                kills += 1
                await anyio.sleep(rng.uniform(0.1, 0.5))
                await victim.start()

        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            await publish_load(kafka_bootstrap, topic, 3000, poison=5, pause=0.03, load=load)
        await wait_settled(pg_dsn, pg_schema.name, load, daemons)
        # The last restarted daemon may still be starting (no signal handler yet): SIGTERM
        # must reach daemons that are up, or it kills them with the default action.
        for d in daemons:
            await d.ready()
        codes = [await d.stop() for d in daemons]
    finally:
        for d in daemons:
            await d.aclose()

    result = await audit(pg_dsn, pg_schema.name, load, effects)
    report(capsys, result.line("kill-restart", daemons=2, kills=kills))
    assert codes == [0, 0], "\n\n".join(d.log_tail() for d in daemons)
    assert result.events == len(load.rows)
    assert result.lost_runs == 0
    assert result.duplicate_runs == 0
    assert result.not_succeeded == 0
    assert result.redone_after_success == 0
    assert result.dead_letters == load.poison == 5
    assert kills == 4


async def test_postgres_restart_mid_load_loses_nothing(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    tmp_path: Path,
    postgres: EmbeddedPostgres,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path / "orchestrator.toml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=pg_dsn,
        schema=pg_schema.name,
    )
    effects = tmp_path / "effects.log"
    await migrate(pg_dsn, pg_schema.name)
    daemons = daemons_for(config, tmp_path, effects, 1)
    load = Load()
    try:
        await daemons[0].start()
        await daemons[0].ready()

        async def outage() -> None:
            await anyio.sleep(1.0)
            await postgres.stop(mode="immediate")
            await anyio.sleep(3.0)
            await postgres.start()

        async with anyio.create_task_group() as tg:
            tg.start_soon(outage)
            await publish_load(kafka_bootstrap, topic, 1500, poison=2, pause=0.05, load=load)
        await wait_settled(pg_dsn, pg_schema.name, load, daemons)
        assert daemons[0].running, "the daemon must survive a Postgres outage"
        code = await daemons[0].stop()
    finally:
        for d in daemons:
            await d.aclose()
        if not postgres.running:
            await postgres.start()

    result = await audit(pg_dsn, pg_schema.name, load, effects)
    report(capsys, result.line("postgres-restart", outage_seconds=3))
    assert code == 0
    assert result.lost_runs == 0
    assert result.duplicate_runs == 0
    assert result.not_succeeded == 0
    assert result.redone_after_success == 0
    assert result.dead_letters == load.poison


async def test_sigterm_mid_load_drains_then_restart_finishes(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path / "orchestrator.toml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=pg_dsn,
        schema=pg_schema.name,
        grace=0.5,
    )
    effects = tmp_path / "effects.log"
    await migrate(pg_dsn, pg_schema.name)
    # Slow steps, so the stop lands while steps are in flight and some are interrupted.
    daemon = DaemonProcess(
        config,
        tmp_path / "daemon.log",
        {"ORCH_FAULT_EFFECTS": str(effects), "ORCH_FAULT_STEP_SECONDS": "0.4"},
    )
    load = Load()
    try:
        await daemon.start()
        await daemon.ready()
        await publish_load(kafka_bootstrap, topic, 300, pause=0.0, load=load)
        await anyio.sleep(1.0)
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait(within=30)
        assert code == 0, daemon.log_tail()
        log = daemon.log_path.read_text()
        assert "lease lost" not in log, "a lone daemon must keep the leases it renews"
        assert "shutdown 1/4: stopping intake" in log
        assert "shutdown 4/4" in log
        daemon.env["ORCH_FAULT_STEP_SECONDS"] = "0.002"
        await daemon.start()
        await wait_settled(pg_dsn, pg_schema.name, load, [daemon])
        await daemon.ready()
        assert await daemon.stop() == 0
    finally:
        await daemon.aclose()

    result = await audit(pg_dsn, pg_schema.name, load, effects)
    report(capsys, result.line("sigterm-restart"))
    assert result.interrupted_attempts > 0, "the stop should have interrupted steps in flight"
    assert result.lost_runs == 0
    assert result.duplicate_runs == 0
    assert result.not_succeeded == 0
    assert result.redone_after_success == 0


async def test_broker_unreachable_for_ten_seconds_loses_nothing(
    kafka_bootstrap: str,
    topic: str,
    pg_dsn: str,
    pg_schema: PgSchema,
    tmp_path: Path,
    broker: EmbeddedBroker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The broker is frozen (SIGSTOP): connections stay open but nothing answers, as in a
    network partition. The daemon reports not-ready, keeps running, and catches up."""
    config = write_config(
        tmp_path / "orchestrator.toml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=pg_dsn,
        schema=pg_schema.name,
    )
    effects = tmp_path / "effects.log"
    await migrate(pg_dsn, pg_schema.name)
    daemon = DaemonProcess(config, tmp_path / "daemon.log", {"ORCH_FAULT_EFFECTS": str(effects)})
    load = Load()
    not_ready_seen = False
    assert broker.pid is not None
    try:
        await daemon.start()
        await daemon.ready()
        await publish_load(kafka_bootstrap, topic, 600, poison=1, load=load, seed=1)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                with anyio.move_on_after(10):
                    while True:
                        r = await client.get(f"http://127.0.0.1:{daemon.health_port}/readyz")
                        if r.status_code == 503 and r.json()["components"]["kafka"] != "ok":
                            not_ready_seen = True
                        await anyio.sleep(0.5)
            assert daemon.running, "the daemon must survive a broker outage"
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await publish_load(kafka_bootstrap, topic, 600, load=load, seed=2)
        await wait_settled(pg_dsn, pg_schema.name, load, [daemon])
        await daemon.ready(within=30)
        assert await daemon.stop() == 0
    finally:
        await daemon.aclose()

    result = await audit(pg_dsn, pg_schema.name, load, effects)
    report(
        capsys, result.line("broker-unreachable", outage_seconds=10, not_ready_seen=not_ready_seen)
    )
    assert not_ready_seen, "readiness must report the broker outage"
    assert result.lost_runs == 0
    assert result.duplicate_runs == 0
    assert result.not_succeeded == 0
    assert result.redone_after_success == 0
    assert result.dead_letters == load.poison == 1


async def test_second_signal_stops_at_once(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "orchestrator.toml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=pg_dsn,
        schema=pg_schema.name,
        grace=60,
    )
    await migrate(pg_dsn, pg_schema.name)
    daemon = DaemonProcess(
        config,
        tmp_path / "daemon.log",
        {"ORCH_FAULT_EFFECTS": str(tmp_path / "effects.log"), "ORCH_FAULT_STEP_SECONDS": "30"},
    )
    try:
        await daemon.start()
        await daemon.ready()
        await publish_load(kafka_bootstrap, topic, 5)

        async def in_flight() -> bool:
            return (tmp_path / "effects.log").exists()

        await wait_for(in_flight, within=20, what="a step to start")
        daemon.signal(signal.SIGTERM)
        await anyio.sleep(0.5)
        assert daemon.running, "the first signal drains (grace 60 s) rather than exiting"
        daemon.signal(signal.SIGINT)
        code = await daemon.wait(within=10)
    finally:
        await daemon.aclose()
    assert code == 0
    assert "second signal: stopping now" in daemon.log_path.read_text()
