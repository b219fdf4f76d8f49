"""Presenting a results document: the console table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import Target

__all__ = ["RESULTS", "plot", "render", "write_json", "write_stamped"]

RESULTS = Path(__file__).resolve().parent / "results"


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _status(w: Mapping[str, Any]) -> str:
    status = w.get("status", "?")
    return "" if status == "ok" else f"  [{status.upper()}: {w.get('error', '')}]".rstrip()


def _lat(s: Mapping[str, Any]) -> str:
    return " ".join(f"{k} {_n(s.get(k), 1)}" for k in ("p50", "p95", "p99", "max"))


def render(doc: Mapping[str, Any], targets: list[Target]) -> str:
    env = doc["environment"]
    pg = env.get("postgres", {})
    lines = [
        f"orchestrator bench  {doc['date']}  commit {doc['git_commit'][:10]}"
        f"{' (dirty)' if doc.get('git_dirty') else ''}  {env['cpu_count']} CPUs  "
        f"Python {env['python']}  aiokafka {env['aiokafka']}  asyncpg {env['asyncpg']}  "
        f"msgspec {env['msgspec']}",
        f"PostgreSQL {pg.get('server_version', '?')} fsync={pg.get('fsync', '?')} "
        f"synchronous_commit={pg.get('synchronous_commit', '?')}; "
        f"broker: {env.get('broker') or 'Tansu (embedded)'}; "
        f"daemon code: {doc.get('daemon_source', 'working tree')}",
    ]
    speed = doc.get("speed_index") or {}
    if speed:
        lines.append(
            "machine speed index (µs per round of bench/calibrate.py, lower is faster): "
            + ", ".join(f"{k} {v:.2f}" for k, v in speed.items())
        )
    lines.append("")
    w = doc["workloads"]
    if "W0" in w:
        x = w["W0"]
        lines.append(
            f"W0 limit     bare getmany({x.get('max_batch', '?')}) + 1 unnest insert/batch: "
            f"{_n(x.get('events_per_second'))} events/s first batch to last commit "
            f"({_n(x.get('events_per_second_incl_group_join'))} incl. group join){_status(x)}"
        )
        if isinstance(x.get("again"), dict):
            lines.append(
                f"W0 again     right after W1 1-step: {_n(x['again'].get('events_per_second'))}"
                f" events/s{_status(x['again'])}"
            )
    drains = (("chain3", "3-step"), ("single", "1-step"), ("traced", "traced"),
              ("unsampled", "unsampled"))  # fmt: skip
    for key, label in drains:
        x = w.get("W1", {}).get(key)
        if x:
            lines.append(_drain_line(f"W1 {label}", x))
            if x.get("ratio_to_w0") is not None and key in ("chain3", "single"):
                from_start = x.get("ratio_to_w0_from_start")
                lines.append(
                    f"             steady = {x['ratio_to_w0']:.1%} of W0 "
                    f"({_n(x.get('w0_events_per_second'))} events/s, the nearest W0 run)"
                    + ("" if from_start is None else f"; from start {from_start:.1%}")
                )
            otlp = x.get("otlp")
            if otlp:
                kind = "sampled" if key == "traced" else "unsampled"
                lines.append(
                    f"             3-step, exporter on ({kind} traceparents): received"
                    f" {_n(otlp.get('spans'))} spans ({otlp.get('spans_per_run', '-')} per run)"
                    f" in {_n(otlp.get('trace_requests'))} requests, and"
                    f" {_n(otlp.get('metric_requests'))} metric exports; receiver"
                    f" {_n(otlp.get('cpu_seconds'), 1)} CPU s, not counted above"
                )
    if "W2" in w:
        x = w["W2"]
        if x.get("status") != "ok":
            lines.append(f"W2 latency{_status(x)}")
        for r, fl in x.get("kafka_only", {}).items():
            lines.append(
                f"W2 {int(r):>5}/s  Kafka only (bare consumer, no daemon) publish->received ms: "
                f"{_lat(fl)}; broker {_n(fl.get('broker_cpu_ms_per_event'), 2)} ms CPU per event"
            )
            if fl.get("broker_cores_by_second"):
                lines.append(
                    "              broker cores by second: "
                    + " ".join(f"{c:.2f}" for c in fl["broker_cores_by_second"])
                )
        for r, ph in x.get("rates", {}).items():
            if ph.get("status") == "skipped":
                lines.append(f"W2 {int(r):>5}/s  skipped: {ph.get('error')}")
                continue
            lines.append(
                f"W2 {int(r):>5}/s  publish->first step ms: {_lat(ph['first_step_ms'])} | "
                f"->run succeeded ms: {_lat(ph['finished_ms'])}  "
                f"(n={ph['measured']:,} of {ph['published']:,}, sent "
                f"{_n(ph['achieved_per_second'])}/s, completed "
                f"{_n(ph.get('completed_runs_per_second'))} runs/s; other processes "
                f"{_n(ph.get('other_cpu_seconds'), 1)} CPU s){_status(ph)}"
            )
            st = ph.get("stages_ms", {})
            lines.append(
                "              p50 stages ms: "
                + ", ".join(f"{k} {_n(v.get('p50'), 1)}" for k, v in st.items())
            )
            series = ph.get("first_step_ms_per_second") or []
            if series:
                lines.append(
                    "              p99 ms by second: "
                    + " ".join(_n(row["p99"], 0) for row in series)
                )
            for name, by_second in (ph.get("cores_by_second") or {}).items():
                lines.append(
                    f"              {name} cores by second: "
                    + " ".join(f"{c:.2f}" for c in by_second)
                )
            if ph.get("cpu_seconds"):
                busy = ph.get("machine_cpu_busy")
                lines.append(
                    "              CPU s: "
                    + ", ".join(f"{k} {_n(v, 1)}" for k, v in ph["cpu_seconds"].items())
                    + (f"; machine {busy:.0%} busy" if busy is not None else "")
                )
    if "W3" in w:
        x = w["W3"]
        if x.get("status") != "ok":
            lines.append(f"W3 matching  n/a{_status(x)}")
        for row in x.get("figures", []):
            lines.append(
                f"W3 matching  {row['rules']:>6,} rules: {_n(row['events_per_second'])} events/s "
                f"({_n(row['events_per_second_with_view'])} with event_to_dict)"
            )
    if "W4" in w:
        x = w["W4"]
        for key, rep in x.get("during_w1", {}).items():
            lines.append(f"W4 memory    during W1 {key}: peak RSS {_n(rep, 1)} MB")
        b = x.get("backlog")
        if b:
            pub = b.get("publish", {})
            lines.append(
                f"W4 memory    backlog {b['events']:,} events (published in "
                f"{_n(pub.get('seconds'), 1)} s = {_n(pub.get('events_per_second'))}/s): peak RSS "
                f"{_n(b.get('peak_rss_mb'), 1)} MB over {_n(b.get('seconds'), 0)} s; ingested "
                f"{_n(b.get('events_ingested'))} ({_n(b.get('ingest_events_per_second'))}/s), "
                f"runs finished {_n(b.get('runs_finished'))}{_status(b)}"
            )
    if "W5" in w:
        for key, x in w["W5"].items():
            if isinstance(x, Mapping) and "daemons" in x:
                lines.append(_drain_line(f"W5 {key}", x))
        if w["W5"].get("speedup") is not None:
            lines.append(f"W5 speed-up  2 daemons / 1 daemon: {w['W5']['speedup']:.2f}x")
    lines += ["", f"Targets ({env['cpu_count']} CPUs)"]
    lines.append(f"  {'target':<40} {'value':>14} {'limit':>18}  status")
    for t in targets:
        value = (
            "-" if t.value is None else (f"{t.value:,.3g}" if t.value < 10 else f"{t.value:,.0f}")
        )
        limit = t.as_dict()["target"]
        note = f"  ({t.note})" if t.note else ""
        lines.append(f"  {t.name:<40} {value:>14} {limit:>18}  {t.status}{note}")
    return "\n".join(lines)


def _drain_line(label: str, x: Mapping[str, Any]) -> str:
    per = x.get("per_run", {})
    return (
        f"{label:<12} {_n(x.get('events'))} runs, {x.get('daemons', '?')} daemon(s): "
        f"{_n(x.get('runs_per_second'))} runs/s from daemon start "
        f"(to 99% of runs {_n(x.get('runs_per_second_to_99pct'))}, "
        f"steady {_n(x.get('steady_runs_per_second'))}, start-up "
        f"{_n(x.get('startup_seconds'), 1)} s, ingest {_n(x.get('ingest_events_per_second'))} "
        f"ev/s); per run: {_n(per.get('statements'), 1)} statements, "
        f"{_n(per.get('commits'), 1)} commits, {_n(per.get('wal_syncs'), 2)} WAL fsyncs; "
        f"peak RSS {_n(x.get('peak_rss_mb'), 1)} MB; CPU s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in x.get("cpu_seconds", {}).items())
        + f", other processes {_n(x.get('other_cpu_seconds'), 1)}; "
        f"re-claimed runs {_n(x.get('runs_claimed_more_than_once'))}, 'lease lost' "
        f"warnings {_n(x.get('lease_lost_warnings'))}{_status(x)}"
    )


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")


def git_commit() -> str:
    """The repository's HEAD commit, for the results files of the tools; ``unknown``
    outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def write_stamped(kind: str, doc: Mapping[str, Any], at: datetime | None = None) -> Path:
    """Write a tool's results to ``results/<kind>-<UTC timestamp>.json``; return the path."""
    stamp = (at or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{kind}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def plot(doc: Mapping[str, Any], path: Path) -> str:
    """Draw the PNG; return a message saying where, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (.venv/bin/pip install matplotlib)"
    try:
        _draw(plt, doc, path)
    except Exception as exc:  # a plot must never lose the figures already printed and written
        return f"no plot: {type(exc).__name__}: {exc}"
    return f"wrote {path}"


def _draw(plt: Any, doc: Mapping[str, Any], path: Path) -> None:
    w = doc["workloads"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(
        f"orchestrator bench {doc['date']} ({doc['git_commit'][:8]}, "
        f"{doc['environment']['cpu_count']} CPUs)"
    )
    _plot_latency(axes[0][0], w.get("W2", {}))
    _plot_throughput(axes[0][1], w)
    _plot_progress(axes[1][0], w)
    _plot_memory(axes[1][1], w)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_latency(ax: Any, w2: Mapping[str, Any]) -> None:
    ax.set_title("W2 latency per publish rate")
    rates = sorted(
        (r for r, ph in w2.get("rates", {}).items() if ph.get("first_step_ms", {}).get("count")),
        key=int,
    )
    if not rates:
        ax.text(0.5, 0.5, "not run", ha="center")
        return
    for metric, style in (("first_step_ms", "-"), ("finished_ms", "--")):
        for q, color in (("p50", "C0"), ("p95", "C1"), ("p99", "C2"), ("max", "C3")):
            ys = [w2["rates"][r][metric].get(q) for r in rates]
            label = f"{'first step' if metric == 'first_step_ms' else 'succeeded'} {q}"
            ax.plot([int(r) for r in rates], ys, style, color=color, marker="o", label=label)
    ax.axhline(5, color="grey", lw=0.5, ls=":")
    ax.axhline(50, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events/s published")
    ax.set_ylabel("ms after publish")
    ax.legend(fontsize=7, ncol=2)


def _plot_throughput(ax: Any, w: Mapping[str, Any]) -> None:
    ax.set_title("Throughput")
    bars: list[tuple[str, float]] = []
    if w.get("W0", {}).get("events_per_second"):
        bars.append(("W0 limit\nevents/s", w["W0"]["events_per_second"]))
    for key, label in (("chain3", "W1 3-step"), ("single", "W1 1-step")):
        v = w.get("W1", {}).get(key, {}).get("runs_per_second")
        if v:
            bars.append((f"{label}\nruns/s", v))
    for key in ("1 daemon", "2 daemons"):
        v = w.get("W5", {}).get(key, {}).get("runs_per_second")
        if v:
            bars.append((f"W5 {key}\nruns/s", v))
    if not bars:
        ax.text(0.5, 0.5, "not run", ha="center")
        return
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="C0")
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(5000, color="C3", lw=1, ls="--", label="W1 3-step target 5,000 runs/s")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def _plot_progress(ax: Any, w: Mapping[str, Any]) -> None:
    ax.set_title("Backlog drain: runs succeeded since daemon start")
    series = [(f"W1 {k}", v) for k, v in w.get("W1", {}).items() if isinstance(v, Mapping)]
    series += [
        (f"W5 {k}", v)
        for k, v in w.get("W5", {}).items()
        if isinstance(v, Mapping) and not (k == "1 daemon" and "chain3" in w.get("W1", {}))
    ]
    drawn = False
    for label, x in series:
        prog = x.get("progress") or []
        if prog:
            ax.plot([p[0] for p in prog], [p[2] for p in prog], label=f"{label} succeeded")
            ax.plot([p[0] for p in prog], [p[1] for p in prog], ls=":", label=f"{label} created")
            drawn = True
    if drawn:
        ax.set_xlabel("s")
        ax.set_ylabel("runs")
        ax.legend(fontsize=7)


def _plot_memory(ax: Any, w: Mapping[str, Any]) -> None:
    ax.set_title("Daemon RSS")
    drawn = False
    for key, x in w.get("W1", {}).items():
        for mem in x.get("memory", []) if isinstance(x, Mapping) else []:
            s = mem.get("rss_mb_series") or []
            ax.plot([p[0] for p in s], [p[1] for p in s], label=f"W1 {key}")
            drawn = True
    b = w.get("W4", {}).get("backlog", {})
    s = b.get("rss_mb_series") or []
    if s:
        ax.plot([p[0] for p in s], [p[1] for p in s], label=f"W4 backlog {b.get('events', 0):,}")
        drawn = True
    if drawn:
        ax.axhline(200, color="C3", lw=1, ls="--", label="target 200 MB")
        ax.set_xlabel("s since daemon start")
        ax.set_ylabel("MB")
        ax.legend(fontsize=7)
