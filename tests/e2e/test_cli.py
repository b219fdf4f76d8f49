"""The product as a user drives it: `orchestrator` commands in separate processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from orchestrator.cli.dev import _absolute, to_toml
from orchestrator.config import load
from tests.conftest import PgSchema
from tests.support.helpers import wait_for
from tests.support.procs import DaemonProcess

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def cli(
    config: Path | None, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
        input=stdin,
    )


async def run_cli(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: cli(config, *args))


def example_config(tmp_path: Path, bootstrap: str, topic: str, dsn: str, schema: str) -> Path:
    """The example config pointed at the test's broker, topic and schema."""
    base = load(EXAMPLES / "orchestrator.toml", env={})
    settings = msgspec.structs.replace(
        base,
        kafka=msgspec.structs.replace(
            base.kafka,
            bootstrap_servers=bootstrap,
            topics=(topic,),
            publish_topic=topic,
            group_id=f"g-{topic}",
        ),
        postgres=msgspec.structs.replace(base.postgres, dsn=dsn, schema=schema),
        rules=msgspec.structs.replace(base.rules, files=(str(EXAMPLES / "rules.toml"),)),
        pipelines=msgspec.structs.replace(base.pipelines, paths=(str(EXAMPLES),)),
        health=msgspec.structs.replace(base.health, port=0),
    )
    connectors = {name: dict(opts) for name, opts in _absolute(base).connectors.items()}
    connectors["warehouse"]["dsn"] = dsn
    connectors["hooks"]["base_url"] = "http://127.0.0.1:9"
    settings = msgspec.structs.replace(settings, connectors=connectors)
    path = tmp_path / "orchestrator.toml"
    path.write_text(to_toml(settings))
    return path


async def test_migrate_run_publish_inspect_and_stop(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    config = example_config(tmp_path, kafka_bootstrap, topic, pg_dsn, pg_schema.name)
    migrated = await run_cli(config, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "0001_init" in migrated.stdout
    assert (await run_cli(config, "db", "migrate")).stdout.strip() == "database is up to date"

    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        await daemon.start()
        await daemon.ready()
        published = await run_cli(
            config,
            "publish",
            "demo.orders",
            "--partition",
            "2026-11-24",
            "--rows",
            "40",
            "--attr",
            "region=eu-west",
        )
        assert published.returncode == 0, published.stderr
        assert "demo.orders/2026-11-24" in published.stdout

        async def succeeded() -> list[dict[str, object]] | None:
            out = await run_cli(config, "runs", "--status", "succeeded", "--json")
            runs = msgspec.json.decode(out.stdout) if out.returncode == 0 else []
            return runs or None

        (run,) = await wait_for(succeeded, within=30, what="the example run to succeed")
        assert run["pipeline"] == "orders"
        shown = await run_cli(config, "runs", "show", str(run["id"]))
        assert shown.returncode == 0
        for step in ("validate", "profile", "price", "summarize"):
            assert step in shown.stdout
        assert '"40 orders worth 500.00"' in shown.stdout
        table = await run_cli(config, "runs")
        assert "succeeded" in table.stdout
        assert "orders-arrived" in table.stdout

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(within=30) == 0
        log = daemon.log_path.read_text()
        assert "shutdown 4/4" in log
    finally:
        await daemon.aclose()


def test_rules_check_names_file_rule_and_field(tmp_path: Path) -> None:
    ok = cli(None, "rules", "check", str(EXAMPLES / "rules.toml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: 5 rule(s)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rule]]\nname = "daily"\npipeline = "orders"\n'
        '[rule.match]\ndata.rows = [{ numeric = ["about", 5] }]\n'
    )
    result = cli(None, "rules", "check", str(bad))
    assert result.returncode == 1
    assert "bad.toml" in result.stdout
    assert "daily" in result.stdout
    assert "data.rows" in result.stdout


def test_rules_check_reports_unknown_pipeline_with_config(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "x"\npipeline = "nope"\n[rule.match]\ndata.dataset = ["d"]\n'
    )
    config = tmp_path / "orchestrator.toml"
    config.write_text(
        f'[rules]\nfiles = ["{rules}"]\n[pipelines]\npaths = ["{EXAMPLES}"]\n'
        'modules = ["demo_pipelines"]\n'
    )
    result = cli(config, "rules", "check")
    assert result.returncode == 1
    assert "nope" in result.stdout


def test_rules_explain_says_which_rule_matches(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(
        '{"specversion":"1.0","id":"1","source":"s","type":"data.arrived",'
        '"data":{"dataset":"demo.orders","rows":3}}'
    )
    result = cli(None, "rules", "explain", str(event), "--rules", str(EXAMPLES / "rules.toml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("MATCH") and "orders-arrived" in line for line in lines)
    assert any(line.startswith("no match") and "big-customer-drop" in line for line in lines)


async def test_bad_connector_option_stops_the_daemon_with_a_clear_error(
    kafka_bootstrap: str, topic: str, pg_dsn: str, pg_schema: PgSchema, tmp_path: Path
) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ntopics = ["{topic}"]\n'
        f'[postgres]\ndsn = "{pg_dsn}"\nschema = "{pg_schema.name}"\n'
        '[connectors.out]\nkind = "files"\nroot = "absent-dir"\n'
    )
    result = await run_cli(config, "run", "--migrate")
    assert result.returncode == 2
    assert "connectors.out.root" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key_is_rejected_by_name(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text('[kafka]\nbootstrap_server = "x:9092"\n')
    result = cli(config, "runs")
    assert result.returncode == 2
    assert "kafka.bootstrap_server" in result.stderr
