"""``orchestrator dev``: a local broker and Postgres, the example pipelines, the daemon.

The config it runs with is written to ``<state-dir>/dev.toml`` so other terminals can use
``orchestrator --config .orchestrator/dev.toml runs``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import msgspec

from orchestrator import config as config_mod
from orchestrator.config import Settings
from orchestrator.errors import ConfigError

__all__ = ["run_dev", "to_toml"]

log = logging.getLogger(__name__)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_table(prefix: str, table: dict[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if scalars or not tables:
        lines.append(f"[{prefix}]")
        lines += [f"{_toml_key(k)} = {json.dumps(v)}" for k, v in scalars.items()]
        lines.append("")
    for key, sub in tables.items():
        _toml_table(f"{prefix}.{_toml_key(key)}", sub, lines)


def to_toml(settings: Settings) -> str:
    """Render settings as TOML (tables, scalars and lists of scalars)."""
    doc = msgspec.to_builtins(settings)
    lines: list[str] = []
    for section, values in doc.items():
        if isinstance(values, dict) and values:
            _toml_table(_toml_key(section), values, lines)
    return "\n".join(lines)


_PATH_OPTIONS = ("root", "dir")


def _absolute(settings: Settings) -> Settings:
    """Resolve the example config's relative paths, so dev.toml works from anywhere."""
    connectors = {
        name: {
            key: str(settings.resolve(value))
            if isinstance(value, str) and (key in _PATH_OPTIONS or key.endswith("_file")) and value
            else value
            for key, value in options.items()
        }
        for name, options in settings.connectors.items()
    }
    return msgspec.structs.replace(
        settings,
        rules=msgspec.structs.replace(
            settings.rules, files=tuple(str(settings.resolve(f)) for f in settings.rules.files)
        ),
        pipelines=msgspec.structs.replace(
            settings.pipelines,
            paths=tuple(str(settings.resolve(p)) for p in settings.pipelines.paths),
        ),
        connectors=connectors,
    )


def run_dev(args: argparse.Namespace) -> int:
    from orchestrator.cli.commands import run_async, tune_gc

    example_config = Path(args.examples) / "orchestrator.toml"
    if not example_config.exists():
        raise ConfigError(
            f"{example_config}: not found; run `orchestrator dev` from the repository root "
            "or pass --examples DIR"
        )
    base = _absolute(config_mod.load(example_config, env={}))
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    tune_gc()
    return run_async(lambda: _serve(args, base, state))


async def _serve(args: argparse.Namespace, base: Settings, state: Path) -> int:
    from orchestrator.cli.commands import serve_until_signalled
    from orchestrator.dev import EmbeddedBroker, EmbeddedPostgres
    from orchestrator.dev.webhook import webhook_receiver
    from orchestrator.store import Store

    async with (
        EmbeddedBroker(port=args.kafka_port, log_path=state / "broker.log") as broker,
        EmbeddedPostgres(port=args.pg_port, fsync=True) as pg,
        webhook_receiver() as hooks_url,
    ):
        connectors = {name: dict(options) for name, options in base.connectors.items()}
        for options in connectors.values():
            if options.get("kind") == "postgres":
                options["dsn"] = pg.dsn
            if options.get("kind") == "http":
                options["base_url"] = hooks_url
        settings = msgspec.structs.replace(
            base,
            health=msgspec.structs.replace(base.health, port=_port_or_free(base.health.port)),
            kafka=msgspec.structs.replace(base.kafka, bootstrap_servers=broker.bootstrap),
            postgres=msgspec.structs.replace(base.postgres, dsn=pg.dsn, migrate_on_start=True),
            connectors=connectors,
            base_dir=str(Path.cwd()),
        )
        async with Store.open(pg.dsn, schema=settings.postgres.schema, min_size=1) as store:
            await store.migrate()
            for options in connectors.values():
                if options.get("kind") == "postgres" and options.get("schema"):
                    await store.pool.execute(f'CREATE SCHEMA IF NOT EXISTS "{options["schema"]}"')
        dev_toml = state / "dev.toml"
        await anyio.Path(dev_toml).write_text(
            "# Written by `orchestrator dev` for this session; use it from another terminal.\n"
            + to_toml(settings)
        )
        cfg = f"--config {dev_toml}"
        dataset = _first_dataset(settings)
        print(
            f"""
  orchestrator dev is up
    Kafka     {broker.bootstrap}   topic: {", ".join(settings.kafka.topics)}
    Postgres  {pg.dsn}
    config    {dev_toml}

  Publish an arrival event:
    orchestrator {cfg} publish {dataset} --partition 2026-11-24 --rows 100
  The sales chain (rollup when both days have landed, then a webhook):
    orchestrator {cfg} publish sales.orders --partition 2026-11-24 --rows 4
    orchestrator {cfg} publish sales.customers --partition 2026-11-24 --rows 3
  or with kcat:
    echo '{{"specversion":"1.0","id":"e1","source":"kcat","type":"data.arrived",'\\
'"data":{{"dataset":"{dataset}"}}}}' | kcat -P -b {broker.bootstrap} -t {settings.kafka.topics[0]}
  Then:
    orchestrator {cfg} runs
    orchestrator {cfg} runs show <ID>

  Ctrl-C stops the daemon, the broker and Postgres.
""",
            flush=True,
        )
        return await serve_until_signalled(settings)


def _port_or_free(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1 (another dev daemon may hold it), else a
    free one."""
    import socket

    from orchestrator.dev._proc import free_port

    if port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return free_port()
            return port
    return free_port()


def _first_dataset(settings: Settings) -> str:
    try:
        import tomllib

        for f in settings.rules.files:
            doc: dict[str, Any] = tomllib.loads(Path(f).read_text())
            for rule in doc.get("rule", []):
                ds = rule.get("match", {}).get("data", {}).get("dataset")
                if isinstance(ds, list) and ds and isinstance(ds[0], str):
                    return ds[0]
                if isinstance(ds, str):
                    return ds
    except (OSError, ValueError):
        pass
    return "demo.orders"
