"""`orchestrator dev` as a newcomer runs it: the sales example chain, end to end."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from tests.support.helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


async def test_dev_runs_the_sales_chain_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = await anyio.open_process(
            [sys.executable, "-m", "orchestrator", "dev", "--state-dir", str(state)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    config = state / "dev.toml"
    try:

        async def ready() -> bool:
            return (
                config.exists()
                and "daemon" in log_path.read_text()
                and ("ready" in log_path.read_text())
            )

        await wait_for(ready, within=60, what="orchestrator dev to come up")
        for dataset, rows in (("sales.orders", "4"), ("sales.customers", "3")):
            published = await anyio.to_thread.run_sync(
                lambda d=dataset, r=rows: cli(
                    config, "publish", d, "--partition", "2026-11-24", "--rows", r
                )
            )
            assert published.returncode == 0, published.stderr

        async def chain_done() -> list[dict[str, object]] | None:
            out = await anyio.to_thread.run_sync(lambda: cli(config, "runs", "--json"))
            runs = msgspec.json.decode(out.stdout) if out.returncode == 0 else []
            done = [r for r in runs if r["status"] == "succeeded"]
            return runs if len(done) == 2 else None

        runs = await wait_for(chain_done, within=60, what="the rollup and the report")
        assert sorted(r["pipeline"] for r in runs) == ["daily_rollup", "rollup_report"]
        report = next(r for r in runs if r["pipeline"] == "rollup_report")
        shown = await anyio.to_thread.run_sync(
            lambda: cli(config, "runs", "show", str(report["id"]), "--json")
        )
        (step,) = msgspec.json.decode(shown.stdout)["steps"]
        assert step["output"] == {"day": "2026-11-24", "status": 200, "attempts": 1}
        text = log_path.read_text()
        assert "webhook received POST /sales/daily-rollup" in text
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            code = await proc.wait()
        assert code == 0
        text = log_path.read_text()
        assert "embedded Postgres" in text
        assert "stopped" in text.splitlines()[-1]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
