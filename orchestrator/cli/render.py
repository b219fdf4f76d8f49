"""Text tables and JSON for the CLI's read commands."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from orchestrator.store import DeadLetterRow, RunRow, StepAttemptRow

__all__ = [
    "dead_letters_json",
    "dead_letters_table",
    "run_detail",
    "run_json",
    "runs_json",
    "runs_table",
]

_json = msgspec.json.Encoder()


def _ts(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def runs_table(runs: Sequence[RunRow]) -> str:
    if not runs:
        return "no runs"
    return _table(
        ["ID", "STATUS", "PIPELINE", "RULE", "CREATED", "DURATION", "ERROR"],
        [
            [
                str(r.id),
                r.status,
                r.pipeline,
                r.rule,
                _ts(r.created_at),
                _duration(r.started_at, r.finished_at),
                _short(f"{r.failed_step}: {r.error}" if r.failed_step else r.error, 50),
            ]
            for r in runs
        ],
    )


def runs_json(runs: Sequence[RunRow]) -> str:
    return _json.encode(list(runs)).decode()


def run_json(run: RunRow, steps: Sequence[StepAttemptRow]) -> str:
    return _json.encode({"run": run, "steps": list(steps)}).decode()


def run_detail(run: RunRow, steps: Sequence[StepAttemptRow]) -> str:
    lines = [
        f"run {run.id}  {run.status}",
        f"  pipeline   {run.pipeline}",
        f"  rule       {run.rule}",
        f"  trigger    {run.trigger_key}",
        f"  events     {', '.join(map(str, run.event_ids))}",
        f"  created    {_ts(run.created_at)}",
        f"  started    {_ts(run.started_at)}",
        f"  finished   {_ts(run.finished_at)}  ({_duration(run.started_at, run.finished_at)})",
        f"  claims     {run.claims}",
    ]
    if run.params:
        lines.append(f"  params     {_json.encode(run.params).decode()}")
    if run.traceparent:
        lines.append(f"  trace      {run.traceparent.split('-')[1]}")
    if run.error:
        lines.append(f"  error      {run.failed_step}: {run.error.strip()}")
    lines.append("")
    if not steps:
        lines.append("  no step attempts recorded")
        return "\n".join(lines)
    rows = []
    for s in steps:
        detail = (
            _short(bytes(s.output).decode(), 60) if s.output is not None else _short(s.error, 60)
        )
        rows.append(
            [
                s.step,
                str(s.attempt),
                s.status,
                _ts(s.started_at),
                _duration(s.started_at, s.finished_at),
                detail,
            ]
        )
    table = _table(["STEP", "ATTEMPT", "STATUS", "STARTED", "DURATION", "OUTPUT / ERROR"], rows)
    lines += ["  " + line for line in table.splitlines()]
    failed = [s for s in steps if s.status == "failed" and s.error]
    if failed:
        last = failed[-1]
        lines += ["", f"  last error ({last.step}, attempt {last.attempt}):"]
        lines += ["    " + line for line in (last.error or "").strip().splitlines()]
    return "\n".join(lines)


def dead_letters_table(rows: Sequence[DeadLetterRow]) -> str:
    if not rows:
        return "no dead letters"
    return _table(
        ["ID", "TOPIC", "PARTITION", "OFFSET", "BYTES", "AT", "REASON"],
        [
            [
                str(d.id),
                d.topic,
                str(d.kafka_partition),
                str(d.kafka_offset),
                str(d.value_size),
                _ts(d.created_at),
                _short(d.reason, 80),
            ]
            for d in rows
        ],
    )


def dead_letters_json(rows: Sequence[DeadLetterRow]) -> str:
    return _json.encode(list(rows)).decode()
