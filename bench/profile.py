"""Percentages from a py-spy profile in collapsed-stack form (``py-spy record --format raw``).

``python -m bench.profile bench/results/profile-w1-chain3.txt`` prints where the daemon's
on-CPU samples go: by area (a stack counts toward every area it passes through, so areas
overlap) and by the function on top of the stack (self time).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["AREAS", "parse_collapsed", "summarize_profile"]

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (label, substrings of a frame "function (file)"; first match wins per frame)
    ("step bodies (bench pipelines)", ("bench/pipelines.py",)),
    ("intake: orchestrator/ingest", ("orchestrator/ingest/",)),
    ("runner: orchestrator/pipeline/runner.py", ("orchestrator/pipeline/runner.py",)),
    ("scheduler: orchestrator/pipeline/scheduler.py", ("orchestrator/pipeline/scheduler.py",)),
    ("store: orchestrator/store", ("orchestrator/store/",)),
    ("matching: orchestrator/triggers", ("orchestrator/triggers/",)),
    ("asyncpg (driver + pool)", ("asyncpg/",)),
    ("asyncpg pool acquire/release", ("asyncpg/pool.py",)),
    ("aiokafka", ("aiokafka/",)),
    ("opentelemetry (spans, metrics, propagation)", ("opentelemetry/",)),
    ("logging", ("logging/__init__.py", "orchestrator/cli/logs.py")),
    ("anyio (task groups, cancel scopes)", ("anyio/",)),
    ("asyncio internals", ("asyncio/",)),
    ("datetime/uuid/traceback", ("datetime.py", "uuid.py", "traceback.py")),
)


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """``[(frames root-first, samples)]`` from py-spy's raw format (``a;b;c 12`` lines)."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['fn']} ({path})"


def summarize_profile(stacks: Iterable[tuple[list[str], int]], top: int = 25) -> dict[str, Any]:
    """Total samples, the share of each area (inclusive), the top functions by self time and
    by inclusive time. Shares are fractions of all samples."""
    stacks = list(stacks)
    total = sum(n for _, n in stacks) or 1
    areas: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        seen_areas: set[str] = set()
        for frame in frames:
            for label, needles in AREAS:
                if any(needle in frame for needle in needles):
                    seen_areas.add(label)
        for label in seen_areas:
            areas[label] += n
        for fn in {_short(f) for f in frames}:
            inclusive[fn] += n
        if frames:
            self_time[_short(frames[-1])] += n
    return {
        "samples": total,
        "areas": {k: round(v / total, 4) for k, v in areas.most_common()},
        "self": [(fn, round(v / total, 4)) for fn, v in self_time.most_common(top)],
        "inclusive": [(fn, round(v / total, 4)) for fn, v in inclusive.most_common(top * 2)],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    summary = summarize_profile(parse_collapsed(Path(args[0]).read_text()))
    print(f"{summary['samples']:,} samples (on-CPU stacks of the daemon's threads)\n")
    print("By area (inclusive; areas overlap):")
    for label, share in summary["areas"].items():
        print(f"  {share:6.1%}  {label}")
    print("\nTop functions by self time:")
    for fn, share in summary["self"]:
        print(f"  {share:6.1%}  {fn}")
    print("\nTop functions by inclusive time:")
    for fn, share in summary["inclusive"]:
        print(f"  {share:6.1%}  {fn}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
