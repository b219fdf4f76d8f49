"""What each CLI command does. Parsing lives in ``orchestrator.cli``; output in ``render``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from orchestrator import config as config_mod
from orchestrator.cli import render
from orchestrator.cli.logs import setup_logging
from orchestrator.config import Settings
from orchestrator.errors import ConfigError, OrchestratorError

__all__ = ["dispatch", "run_async", "serve_until_signalled", "tune_gc"]


def run_async(fn: Callable[[], Awaitable[int]]) -> int:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, backend="asyncio", backend_options=options)


def _load(config: str | None) -> Settings:
    settings = config_mod.load(config)
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    return settings


def dispatch(args: argparse.Namespace, config: str | None) -> int:
    cmd = args.command
    if cmd == "dev":
        from orchestrator.cli.dev import run_dev

        setup_logging()
        return run_dev(args)
    if cmd == "rules":
        return _rules(args, config)
    settings = _load(config)
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "run": _run,
        "publish": _publish,
        "runs": _runs,
        "db": _db,
        "dead-letters": _dead_letters,
        "health": _health,
        "replay": _replay,
        "connectors": _connectors,
    }
    return handlers[cmd](args, settings)


# -- run ----------------------------------------------------------------------------------


async def serve_until_signalled(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; a second signal stops at once."""
    from orchestrator.daemon import Daemon
    from orchestrator.telemetry import Telemetry

    daemon = Daemon(settings, Telemetry.from_providers())
    async with anyio.create_task_group() as tg:

        async def _signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if daemon.health.stopping:
                        print("second signal: stopping now", file=sys.stderr)
                        tg.cancel_scope.cancel()
                        return
                    print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                    daemon.stop()

        tg.start_soon(_signals)
        await daemon.run()
        tg.cancel_scope.cancel()
    return 0


def tune_gc() -> None:
    """Garbage collection for a long-running daemon: what start-up loaded (modules,
    pipelines, rules) is frozen out of the collector's way, and young collections run every
    20,000 allocations instead of 700. Runs allocate many short-lived objects and few cycles,
    so the default thresholds spend CPU re-scanning the same long-lived objects."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.telemetry import install

    if args.migrate:
        settings = msgspec.structs.replace(
            settings, postgres=msgspec.structs.replace(settings.postgres, migrate_on_start=True)
        )
    shutdown = install(settings.telemetry.service_name, settings.telemetry.otlp_endpoint)
    tune_gc()
    try:
        return run_async(lambda: serve_until_signalled(settings))
    finally:
        shutdown()


# -- publish ------------------------------------------------------------------------------


def _attrs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--attr {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.events import ARRIVAL_TYPE, new_arrival
    from orchestrator.kafka import open_producer, publish_event
    from orchestrator.telemetry import Telemetry, install

    event = new_arrival(
        args.dataset,
        partition=args.partition,
        uri=args.uri,
        rows=args.rows,
        size=args.size,
        attributes=_attrs(args.attr),
        source=args.source,
        type=args.type or ARRIVAL_TYPE,
        id=args.id,
    )
    topic = args.topic or settings.kafka.publish_topic
    shutdown = install(
        settings.telemetry.service_name + "-cli",
        settings.telemetry.otlp_endpoint,
        record_without_exporter=True,  # a sampled context, whoever traces downstream
    )
    tracer = Telemetry.from_providers().tracer

    async def _go() -> int:
        async with open_producer(settings) as producer:
            partition, offset = await publish_event(producer, topic, event, tracer)
        print(f"published {event.id} ({event.key}) to {topic}[{partition}]@{offset}")
        return 0

    try:
        return run_async(_go)
    finally:
        shutdown()


# -- state queries ------------------------------------------------------------------------


def _with_store(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    from orchestrator.store import Store

    async def _go() -> int:
        async with Store.open(
            settings.postgres_dsn(),
            schema=settings.postgres.schema,
            min_size=1,
            max_size=2,
            sslmode=settings.postgres.sslmode,
            sslrootcert=settings.postgres.sslrootcert,
        ) as store:
            return await fn(store)

    return run_async(_go)


def _runs(args: argparse.Namespace, settings: Settings) -> int:
    action = args.runs_command or "list"

    async def _go(store: Any) -> int:
        if action == "list":
            rows = await store.list_runs(
                status=args.status, pipeline=args.pipeline, limit=args.limit
            )
            print(render.runs_json(rows) if args.json else render.runs_table(rows))
            return 0
        run_id = args.run_id
        if action == "show":
            run = await store.get_run(run_id)
            if run is None:
                print(f"no run {run_id}", file=sys.stderr)
                return 1
            steps = await store.step_attempts(run_id)
            print(render.run_json(run, steps) if args.json else render.run_detail(run, steps))
            return 0
        if action == "retry":
            status = await store.retry_run(run_id)
            if status is None:
                print(f"no run {run_id}", file=sys.stderr)
                return 1
            if status != "pending":
                print(
                    f"run {run_id} is {status}; only failed or cancelled runs can be retried",
                    file=sys.stderr,
                )
                return 1
            print(f"run {run_id} queued; it resumes from its first unfinished step")
            return 0
        status = await store.request_cancel(run_id)
        if status is None:
            print(f"no run {run_id}", file=sys.stderr)
            return 1
        if status == "running":
            print(f"run {run_id}: cancellation requested from the daemon running it")
        elif status == "pending":
            print(f"run {run_id} cancelled")
        else:
            print(f"run {run_id} is already {status}", file=sys.stderr)
            return 1
        return 0

    return _with_store(settings, _go)


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "dl_command", None) == "redrive":
        return _redrive(args, settings)

    async def _go(store: Any) -> int:
        rows = await store.list_dead_letters(limit=args.limit)
        print(render.dead_letters_json(rows) if args.json else render.dead_letters_table(rows))
        return 0

    return _with_store(settings, _go)


def _redrive(args: argparse.Namespace, settings: Settings) -> int:
    """Publish dead letters' records again (after a fix to the rules, contracts or producer)."""
    from orchestrator.kafka import open_producer

    if not args.ids and not args.all:
        raise ConfigError("dead-letters redrive: name dead-letter ids or pass --all")

    async def _go(store: Any) -> int:
        rows = await store.dead_letters_for_redrive(None if args.all else args.ids)
        if not args.all and len(rows) != len(set(args.ids)):
            missing = sorted(set(args.ids) - {r.id for r in rows})
            print(f"no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)
            return 1
        failed = 0
        async with open_producer(settings) as producer:
            for row in rows:
                if row.value is None or len(row.value) < row.value_size:
                    print(
                        f"dead letter {row.id}: only a prefix of the {row.value_size}-byte "
                        "record was kept; it cannot be redriven",
                        file=sys.stderr,
                    )
                    failed += 1
                    continue
                topic = args.topic or row.topic
                headers = [(k, v.encode()) for k, v in row.headers]
                await producer.send_and_wait(topic, row.value, key=row.key, headers=headers)
                await store.mark_redriven(row.id)
                print(f"dead letter {row.id} redriven to {topic}")
        return 1 if failed else 0

    return _with_store(settings, _go)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    async def _go(store: Any) -> int:
        applied = await store.migrate()
        print("applied: " + ", ".join(applied) if applied else "database is up to date")
        return 0

    return _with_store(settings, _go)


def _health(args: argparse.Namespace, settings: Settings) -> int:
    import http.client

    if not settings.health.port:
        raise ConfigError("health.port is 0: the daemon serves no health endpoint")
    host = settings.health.host
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind is probed on loopback
        host = "127.0.0.1"
    conn = http.client.HTTPConnection(host, settings.health.port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        print(resp.read().decode())
    except OSError as exc:
        print(
            f"daemon not reachable on {settings.health.host}:{settings.health.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        conn.close()
    return 0 if resp.status == 200 else 1


# -- connectors ---------------------------------------------------------------------------


def _connectors(args: argparse.Namespace, settings: Settings) -> int:
    """``orchestrator connectors [list]``: exit 0, or 2 when a configured section is invalid."""
    import connectors

    listing = connectors.describe(settings.connectors, base_dir=settings.base_dir)
    if args.json:
        print(msgspec.json.encode(listing).decode())
        return 0 if listing.ok else 2
    print(f"{'KIND':<15} {'ORIGIN':<25} DESCRIPTION")
    for k in listing.kinds:
        detail = f"cannot be loaded: {k.error}" if k.error else k.summary
        print(f"{k.kind:<15} {k.origin:<25} {detail}")
    print()
    if not listing.configured:
        print("no connectors configured ([connectors.<name>] tables)")
    for c in listing.configured:
        print(f"{c.name:<15} {c.kind or '?':<15} {c.error or 'ok'}")
    return 0 if listing.ok else 2


# -- replay -------------------------------------------------------------------------------


def _parse_offsets(text: str) -> tuple[str, int, tuple[int, int]]:
    try:
        topic, partition, span = text.rsplit(":", 2)
        first, _, last = span.partition("-")
        return topic, int(partition), (int(first), int(last) if last else 2**62)
    except ValueError:
        raise ConfigError(
            f"--offsets {text!r}: expected TOPIC:PARTITION:FIRST-LAST, e.g. arrivals:0:100-250"
        ) from None


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from orchestrator.replay import replay
    from orchestrator.triggers import load_rules

    if not args.since and not args.offsets:
        raise ConfigError("replay: pass --from TIME or --offsets TOPIC:PARTITION:FIRST-LAST")
    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--from {args.since!r}: expected an ISO 8601 time") from None
        if since.tzinfo is None:
            raise ConfigError(f"--from {args.since!r}: give a time zone, e.g. 2026-11-24T00:00Z")
    topic = partition = offsets = None
    if args.offsets:
        topic, partition, offsets = _parse_offsets(args.offsets)
    files = [Path(f) for f in (args.rules or [])] or [
        settings.resolve(f) for f in settings.rules.files
    ]
    if not files:
        raise ConfigError("replay: pass --rules FILE..., or a config with rules.files")
    rules = load_rules(files)

    async def _go(store: Any) -> int:
        flt = {"since": since, "topic": topic, "partition": partition, "offsets": offsets}
        total = await store.count_events(**flt)

        def progress(done: int, runs: int) -> None:
            if sys.stderr.isatty() or total > 0:
                width = 30
                filled = width * done // max(total, 1)
                print(
                    f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} events, "
                    f"{runs} new runs",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )

        report = await replay(
            store, rules, store.iter_events(**flt), dry_run=args.dry_run, progress=progress
        )
        if total:
            print(file=sys.stderr)
        if args.json:
            print(
                msgspec.json.encode(
                    {"events": report.events, "planned": report.planned, "created": report.created}
                ).decode()
            )
            return 0
        for p in report.planned:
            state = "exists " if p.exists else ("would create" if args.dry_run else "created")
            print(f"{state:12}  {p.rule} -> {p.pipeline}  {p.trigger_key}  events {p.event_ids}")
        verb = "would create" if args.dry_run else "created"
        print(
            f"{report.events} events replayed: {report.new} runs {verb}, "
            f"{len(report.planned) - report.new} already existed"
        )
        return 0

    return _with_store(settings, _go)


# -- rules --------------------------------------------------------------------------------


def _rules(args: argparse.Namespace, config: str | None) -> int:
    from orchestrator.triggers import check_rules, load_rules

    settings = config_mod.load(config) if config else None
    if args.rules_command == "check":
        files = [Path(f) for f in args.files] or (
            [settings.resolve(f) for f in settings.rules.files] if settings else []
        )
        if not files:
            raise ConfigError("rules check: name rule files, or a config with rules.files")
        pipelines = None
        if settings is not None and settings.pipelines.modules:
            from orchestrator.loading import load_pipelines

            pipelines = set(load_pipelines(settings))
        problems = check_rules(files, pipelines)
        for p in problems:
            print(str(p))
        if problems:
            print(f"{len(problems)} problem(s) in {len(files)} file(s)", file=sys.stderr)
            return 1
        total = len(load_rules(files))
        print(f"ok: {total} rule(s) in {len(files)} file(s)")
        return 0
    # explain
    from orchestrator.events import decode_record
    from orchestrator.triggers import event_to_dict

    files = [Path(f) for f in (args.rules or [])] or (
        [settings.resolve(f) for f in settings.rules.files] if settings else []
    )
    if not files:
        raise ConfigError("rules explain: pass --rules FILE..., or a config with rules.files")
    raw = sys.stdin.buffer.read() if args.event_file == "-" else Path(args.event_file).read_bytes()
    try:
        event = decode_record(raw, [], max_bytes=len(raw) + 1)
    except OrchestratorError as exc:
        raise ConfigError(f"{args.event_file}: {exc}") from None
    ruleset = load_rules(files)
    explanations = ruleset.explain(event_to_dict(event))
    for ex in explanations:
        mark = "MATCH   " if ex.matched else "no match"
        print(f"{mark}  {ex.rule}: {ex.reason}")
    return 0 if any(ex.matched for ex in explanations) else 1
