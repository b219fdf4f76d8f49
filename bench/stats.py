"""Pure helpers for the benchmark: percentiles, summaries, rates and the targets table.

Nothing here does I/O, so it is unit-tested (``tests/unit/test_bench_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Target",
    "evaluate_targets",
    "per_second",
    "percentile",
    "rate",
    "summarize",
]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, interpolated linearly.

    Same definition as ``numpy.percentile(..., method="linear")``: rank ``q/100 * (n-1)``.
    Raises ``ValueError`` for an empty sequence or ``q`` outside 0-100.
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0-100, got {q}")
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(sorted_values[low])
    frac = rank - low
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac)


def summarize(values: Iterable[float], *, scale: float = 1.0) -> dict[str, Any]:
    """Count, mean, p50, p95, p99 and max of ``values`` multiplied by ``scale``.

    ``scale=1000`` turns seconds into milliseconds. An empty input gives ``count: 0`` and
    ``None`` for every statistic.
    """
    data = sorted(v * scale for v in values)
    if not data:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "p50": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": data[-1],
    }


def per_second(
    samples: Iterable[tuple[float, float]], *, scale: float = 1.0
) -> list[dict[str, Any]]:
    """Latency over time: ``samples`` are (when, value) pairs; one row per whole second
    since the earliest ``when``, with the count, p50, p99 and max of its values times
    ``scale``. Seconds without samples are left out."""
    pairs = sorted(samples)
    if not pairs:
        return []
    start = pairs[0][0]
    buckets: dict[int, list[float]] = {}
    for when, value in pairs:
        buckets.setdefault(int(when - start), []).append(value * scale)
    rows = []
    for second in sorted(buckets):
        data = sorted(buckets[second])
        rows.append(
            {
                "second": second,
                "count": len(data),
                "p50": percentile(data, 50),
                "p99": percentile(data, 99),
                "max": data[-1],
            }
        )
    return rows


def rate(count: float, seconds: float | None) -> float | None:
    """``count / seconds``, or ``None`` when the interval is unknown or not positive."""
    if seconds is None or seconds <= 0:
        return None
    return count / seconds


@dataclass(frozen=True, slots=True)
class Target:
    """One line of the targets table: ``value`` compared with ``limit`` by ``op``."""

    name: str
    value: float | None
    limit: float
    op: str  # ">=" or "<="
    unit: str = ""
    note: str = ""
    failed: bool = False
    """Failed whatever the value (e.g. a latency measured while the backlog kept growing)."""

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL`` or ``n/a`` (value not measured)."""
        if self.value is None:
            return "n/a"
        if self.failed:
            return "FAIL"
        ok = self.value >= self.limit if self.op == ">=" else self.value <= self.limit
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": f"{self.op} {self.limit:g}{(' ' + self.unit) if self.unit else ''}",
            "status": self.status,
            "note": self.note,
        }


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _ok_value(doc: Mapping[str, Any], *path: str) -> float | None:
    """A figure, or ``None`` when its workload did not finish (timeout, error, skipped)."""
    section = _get(doc, *path[:-1])
    if not isinstance(section, Mapping) or section.get("status") != "ok":
        return None
    value = section.get(path[-1])
    return float(value) if isinstance(value, int | float) else None


def evaluate_targets(workloads: Mapping[str, Any]) -> list[Target]:
    """The targets of the brief, evaluated on a results document's ``workloads`` section."""
    # The 1-step drain against the W0 run right after it when there is one (this VM's speed
    # drifts within minutes), over the same window: W0 from its first batch to its last
    # commit, W1 from its first run created to its last run recorded. The note gives the
    # ratio from process start too (W1 from the daemon's launch, W0 with its group join).
    w0_run = next(
        (
            run
            for run in (_get(workloads, "W0", "again"), _get(workloads, "W0"))
            if isinstance(run, Mapping) and run.get("status") == "ok"
        ),
        {},
    )
    w0 = _ok_value(w0_run, "events_per_second")
    w0_start = _ok_value(w0_run, "events_per_second_incl_group_join")
    single = _ok_value(workloads, "W1", "single", "steady_runs_per_second")
    single_start = _ok_value(workloads, "W1", "single", "runs_per_second")
    ratio = None if w0 is None or single is None or w0 == 0 else single / w0
    ratio_note = "1-step runs/s over W0 events/s, drain windows"
    if w0_start and single_start:
        ratio_note += f"; {single_start / w0_start:.1%} from process start"
    w2 = _get(workloads, "W2", "rates", "1000")
    p50 = p99 = None
    w2_note = ""
    if isinstance(w2, Mapping) and w2.get("status") in ("ok", "saturated"):
        p50 = _get(w2, "first_step_ms", "p50")
        p99 = _get(w2, "first_step_ms", "p99")
        if w2["status"] == "saturated":
            # Runs left unfinished are not in the percentiles: the figure is a lower bound.
            w2_note = "saturated: backlog grew; lower bound over finished runs"
    w3 = None
    for row in _get(workloads, "W3", "figures") or []:
        if row.get("rules") == 10_000:
            w3 = float(row["events_per_second"])
    rss = _ok_value(workloads, "W4", "backlog", "peak_rss_mb")
    backlog = _get(workloads, "W4", "backlog", "events")
    return [
        Target(
            "W1 3-step runs/s",
            _ok_value(workloads, "W1", "chain3", "runs_per_second"),
            5_000,
            ">=",
            "runs/s",
        ),
        Target("W1 1-step / W0", ratio, 0.5, ">=", "", ratio_note),
        Target("W2 @1000/s p50 publish->first step", p50, 5, "<=", "ms", w2_note, bool(w2_note)),
        Target("W2 @1000/s p99 publish->first step", p99, 50, "<=", "ms", w2_note, bool(w2_note)),
        Target("W3 matching @10,000 rules", w3, 200_000, ">=", "events/s"),
        Target(
            "W4 peak RSS with backlog",
            rss,
            200,
            "<=",
            "MB",
            f"backlog of {backlog:,} events" if isinstance(backlog, int) else "",
        ),
    ]
