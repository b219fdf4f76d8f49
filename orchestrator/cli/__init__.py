"""The ``orchestrator`` command line. The only place that reads the environment, sets up
logging and installs OpenTelemetry providers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import OrchestratorError

__all__ = ["main"]

DEFAULT_CONFIG = "orchestrator.toml"


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("ORCH_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Event-driven data orchestrator: Kafka arrival events trigger pipelines.",
    )
    parser.add_argument(
        "-c", "--config", help=f"TOML config file (default: $ORCH_CONFIG or ./{DEFAULT_CONFIG})"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--migrate", action="store_true", help="apply pending migrations first")

    dev = sub.add_parser(
        "dev", help="local broker + Postgres + example pipelines, in the foreground"
    )
    dev.add_argument("--kafka-port", type=int, default=0, help="broker port (default: a free one)")
    dev.add_argument("--pg-port", type=int, default=0, help="Postgres port (default: a free one)")
    dev.add_argument("--examples", default="examples", help="directory with the example config")
    dev.add_argument("--state-dir", default=".orchestrator", help="where dev.toml is written")

    pub = sub.add_parser("publish", help="publish an arrival event")
    pub.add_argument("dataset")
    pub.add_argument("--partition", help="partition of the dataset, e.g. 2026-11-24")
    pub.add_argument("--uri")
    pub.add_argument("--rows", type=int)
    pub.add_argument("--bytes", type=int, dest="size")
    pub.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE")
    pub.add_argument("--topic", help="default: kafka.publish_topic")
    pub.add_argument("--source", default="orchestrator://publish")
    pub.add_argument("--type", default=None, help="CloudEvents type (default: data.arrived)")
    pub.add_argument("--id", help="CloudEvents id (default: a new UUID)")

    runs = sub.add_parser("runs", help="list, show, retry or cancel runs")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="ACTION")
    runs.add_argument(
        "--status", choices=["pending", "running", "succeeded", "failed", "cancelled"]
    )
    runs.add_argument("--pipeline")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    lst = runs_sub.add_parser("list", help="recent runs (the default)")
    lst.add_argument("--status", choices=["pending", "running", "succeeded", "failed", "cancelled"])
    lst.add_argument("--pipeline")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    show = runs_sub.add_parser("show", help="one run with its step attempts")
    show.add_argument("run_id", type=int)
    show.add_argument("--json", action="store_true")
    retry = runs_sub.add_parser("retry", help="queue a failed run again from its failed step")
    retry.add_argument("run_id", type=int)
    cancel = runs_sub.add_parser("cancel", help="cancel a pending or running run")
    cancel.add_argument("run_id", type=int)

    rules = sub.add_parser("rules", help="check rule files or explain matching")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    check = rules_sub.add_parser("check", help="validate rule files")
    check.add_argument("files", nargs="*", help="default: the config's rules.files")
    explain = rules_sub.add_parser("explain", help="which rules match an event, and why not")
    explain.add_argument("event_file", help="a CloudEvents JSON file ('-' for stdin)")
    explain.add_argument("--rules", nargs="*", help="rule files (default: the config's)")

    rp = sub.add_parser(
        "replay", help="re-evaluate stored events against rules; create the missing runs"
    )
    rp.add_argument(
        "--from",
        dest="since",
        metavar="TIME",
        help="events received at or after TIME (ISO 8601, e.g. 2026-11-24T00:00Z)",
    )
    rp.add_argument(
        "--offsets",
        metavar="TOPIC:PARTITION:FIRST-LAST",
        help="events from this Kafka offset range",
    )
    rp.add_argument("--rules", nargs="*", help="rule files (default: the config's)")
    rp.add_argument("--dry-run", action="store_true", help="print the runs, create nothing")
    rp.add_argument("--json", action="store_true")

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("migrate", help="apply pending migrations")

    dl = sub.add_parser("dead-letters", help="list or redrive records that could not be accepted")
    dl.add_argument("--limit", type=int, default=50)
    dl.add_argument("--json", action="store_true")
    dl_sub = dl.add_subparsers(dest="dl_command", metavar="ACTION")
    dl_list = dl_sub.add_parser("list", help="recent dead letters (the default)")
    dl_list.add_argument("--limit", type=int, default=50)
    dl_list.add_argument("--json", action="store_true")
    redrive = dl_sub.add_parser("redrive", help="publish dead letters again after a fix")
    redrive.add_argument("ids", nargs="*", type=int, help="dead-letter ids")
    redrive.add_argument("--all", action="store_true", help="every dead letter not yet redriven")
    redrive.add_argument("--topic", help="publish to this topic instead of the original one")

    conns = sub.add_parser("connectors", help="installed connector kinds and configured connectors")
    conns.add_argument("--json", action="store_true", help="machine-readable output")
    conns_sub = conns.add_subparsers(dest="connectors_command", metavar="ACTION")
    conns_list = conns_sub.add_parser(
        "list", help="kinds (built-in and plugins) and [connectors.*], checked without I/O"
    )
    conns_list.add_argument("--json", action="store_true")

    sub.add_parser("health", help="probe the running daemon's health endpoint (exit 0 if ready)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = _config_path(args.config)
    try:
        from orchestrator.cli import commands

        return commands.dispatch(args, config)
    except OrchestratorError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # A configuration problem found by a service the daemon started (a connector that
        # refuses its options, ...): report it like any other, without a task-group trace.
        errors = _leaves(group.subgroup(OrchestratorError))
        if not errors:
            raise
        for error in errors:
            print(f"orchestrator: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _leaves(group: BaseExceptionGroup[BaseException] | None) -> list[BaseException]:
    if group is None:
        return []
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
