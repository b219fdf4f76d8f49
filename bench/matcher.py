"""Matcher throughput: events/s through ``RuleSet.match`` for 10, 1,000 and 10,000 rules.

Run ``python -m bench.matcher`` (or ``python bench/matcher.py``) from the repository root.
Prints a table and writes ``bench/results/matcher-<UTC timestamp>.json``.

The rule mix (by rule number modulo 10) is meant to look like a real rules file:

* 0-5  exact ``data.dataset`` + ``type`` + one more clause (numeric range, prefix,
       exists, anything-but, nested attribute, equals-ignore-case);
* 6    two exact datasets + a ``wildcard`` on ``subject``;
* 7    exact dataset + a ``$or`` of two sub-patterns;
* 8    a ``prefix`` on ``data.dataset`` (the index's prefix buckets);
* 9    an exact, rule-specific ``type``; the first five of these are instead unindexed
       (``source`` prefix + ``data.rows`` range), the short list every event visits.

Events: 80% name the dataset of a random rule, 10% a dataset under a prefix rule, 10% an
unknown dataset. ``events/s`` is the best 500-event slice of a 3-second run over pre-built
event dicts (robust to other processes on a shared machine); ``sustained`` is the whole
run; ``with view`` adds ``event_to_dict`` of a CloudEvent per event (best slice).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from bench.report import git_commit, write_stamped
from orchestrator.events import CloudEvent, new_arrival
from orchestrator.triggers import Rule, RuleSet, event_to_dict

SIZES = (10, 1_000, 10_000)
POOL = 20_000  # distinct pre-built events per size
CHUNK = 500  # events per timed slice
SECONDS = 3.0  # timed per size and mode
REPEATS = 5


def make_rules(n: int) -> list[Rule]:
    rules = []
    for i in range(n):
        ds = f"ds.{i:05d}"
        kind = i % 10
        data: dict[str, Any] = {"dataset": [ds]}
        match: dict[str, Any] = {"type": ["data.arrived"], "data": data}
        if kind <= 5:
            extra: list[dict[str, Any]] = [
                {"rows": [{"numeric": [">", 0, "<=", 1_000_000]}]},
                {"partition": [{"prefix": "2026-"}]},
                {"partition": [{"exists": True}]},
                {"attributes": {"region": [{"prefix": "eu"}, "us"]}},
                {"attributes": {"tier": [{"anything-but": ["bronze", "trial"]}]}},
                {"schema": [{"equals-ignore-case": "ORDERS-V2"}, {"exists": False}]},
            ]
            data.update(extra[kind])
        elif kind == 6:
            data["dataset"] = [ds, f"{ds}.bis"]
            match["subject"] = [{"wildcard": f"{ds}*/2026-*"}]
        elif kind == 7:
            data["$or"] = [
                {"rows": [{"numeric": [">=", 100]}]},
                {"attributes": {"late": [True]}},
            ]
        elif kind == 8:
            data["dataset"] = [{"prefix": f"pfx.{i:05d}."}]
        elif i < 50:
            match = {
                "source": [{"prefix": "orchestrator://"}],
                "data": {"rows": [{"numeric": [">", 900_000]}]},
            }
        else:
            match = {"type": [f"audit.{i}"]}
        rules.append(Rule(name=f"rule-{i}", pipeline=f"p{i % 37}", match=match))
    return rules


def make_events(n_rules: int, count: int, seed: int = 7) -> list[CloudEvent]:
    rng = random.Random(seed)
    prefix_rules = [i for i in range(n_rules) if i % 10 == 8]
    events = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.8:
            dataset = f"ds.{rng.randrange(n_rules):05d}"
        elif roll < 0.9 and prefix_rules:
            dataset = f"pfx.{rng.choice(prefix_rules):05d}.{rng.randrange(100)}"
        else:
            dataset = f"unknown.{rng.randrange(1_000_000)}"
        events.append(
            new_arrival(
                dataset,
                partition=f"2026-11-{rng.randrange(1, 31):02d}",
                rows=rng.randrange(0, 1_000_000),
                attributes={"region": rng.choice(["eu-west", "us", "ap"]), "tier": "gold"},
                id=f"e{rng.getrandbits(64):x}",
            )
        )
    return events


def _rates(fn: Any, items: list[Any]) -> tuple[float, float]:
    """(best, sustained) events/s: ``fn`` over CHUNK-item slices of ``items`` for SECONDS.

    The best chunk filters out other processes on a shared machine; sustained is all
    events over all time, for comparison.
    """
    best, done, spent, i = 0.0, 0, 0.0, 0
    clock = time.perf_counter
    while spent < SECONDS:
        chunk = items[i : i + CHUNK]
        i = (i + CHUNK) % (len(items) - CHUNK)
        start = clock()
        for item in chunk:
            fn(item)
        elapsed = clock() - start
        best = max(best, len(chunk) / elapsed)
        done, spent = done + len(chunk), spent + elapsed
    return best, done / spent


def _call_overhead_ns() -> float:
    """Nanoseconds per call of an empty function: a yardstick for this machine's speed."""

    def nothing(_: object) -> None:
        return None

    loops = 200_000
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(loops):
            nothing(None)
        best = min(best, time.perf_counter() - start)
    return best / loops * 1e9


def measure(n_rules: int) -> dict[str, Any]:
    rules = make_rules(n_rules)
    start = time.perf_counter()
    ruleset = RuleSet.build(rules)
    build_s = time.perf_counter() - start
    events = make_events(n_rules, POOL)
    views = [event_to_dict(e) for e in events]
    matches = sum(len(ruleset.match(v)) for v in views) / len(views)
    best, sustained = _rates(ruleset.match, views)

    def with_view(event: CloudEvent) -> None:
        ruleset.match(event_to_dict(event))

    view_best, _ = _rates(with_view, events)
    return {
        "rules": n_rules,
        "build_seconds": round(build_s, 3),
        "index": repr(ruleset),
        "mean_matches_per_event": round(matches, 3),
        "events_per_second": round(best),
        "events_per_second_sustained": round(sustained),
        "microseconds_per_event": round(1e6 / best, 3),
        "events_per_second_with_view": round(view_best),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    figures = []
    overhead = _call_overhead_ns()
    print(f"empty function call: {overhead:.1f} ns (a yardstick for this machine)")
    print(
        f"{'rules':>7} {'build s':>8} {'matches/ev':>10} {'events/s':>10} {'sustained':>10} "
        f"{'us/ev':>6} {'with view':>10}"
    )
    for n in args.sizes:
        row = measure(n)
        figures.append(row)
        print(
            f"{row['rules']:>7} {row['build_seconds']:>8.3f} "
            f"{row['mean_matches_per_event']:>10.3f} {row['events_per_second']:>10,} "
            f"{row['events_per_second_sustained']:>10,} {row['microseconds_per_event']:>6.2f} "
            f"{row['events_per_second_with_view']:>10,}"
        )
    now = datetime.now(UTC)
    report = {
        "benchmark": "matcher",
        "date": now.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "msgspec": msgspec.__version__,
        "empty_call_ns": round(overhead, 1),
        "method": f"best {CHUNK}-event slice over {SECONDS}s per figure; sustained = all/all",
        "pool_events": POOL,
        "figures": figures,
    }
    if not args.no_write:
        print(f"wrote {write_stamped('matcher', report, now)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
