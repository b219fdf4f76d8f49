"""The benchmark's pure helpers: percentile math, summaries, targets and profile parsing."""

from __future__ import annotations

import pytest

from bench.profile import parse_collapsed, summarize_profile
from bench.stats import Target, evaluate_targets, per_second, percentile, rate, summarize


def test_percentile_interpolates_linearly_like_numpy() -> None:
    data = [1.0, 2.0, 3.0, 4.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 50) == 2.5
    assert percentile(data, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_101_values_hits_the_exact_rank() -> None:
    data = [float(i) for i in range(101)]
    assert percentile(data, 99) == 99.0
    assert percentile(data, 95) == 95.0


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_rejects_q_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match="0-100"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_summarize_sorts_and_scales() -> None:
    s = summarize([0.003, 0.001, 0.002], scale=1000)
    assert s["count"] == 3
    assert s["p50"] == pytest.approx(2.0)
    assert s["max"] == pytest.approx(3.0)
    assert s["mean"] == pytest.approx(2.0)


def test_summarize_of_nothing_has_no_statistics() -> None:
    assert summarize([]) == {
        "count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None,
    }  # fmt: skip


def test_per_second_buckets_by_whole_seconds_from_the_first_sample() -> None:
    rows = per_second([(10.9, 0.004), (10.0, 0.002), (12.5, 0.1), (10.5, 0.003)], scale=1000)
    assert [r["second"] for r in rows] == [0, 2]  # second 1 had no samples
    assert rows[0]["count"] == 3
    assert rows[0]["p50"] == pytest.approx(3.0)
    assert rows[0]["max"] == pytest.approx(4.0)
    assert rows[1] == {"second": 2, "count": 1, "p50": 100.0, "p99": 100.0, "max": 100.0}
    assert per_second([]) == []


def test_rate_needs_a_positive_interval() -> None:
    assert rate(10, 2) == 5
    assert rate(10, 0) is None
    assert rate(10, None) is None


def test_target_status() -> None:
    assert Target("t", 6000, 5000, ">=").status == "PASS"
    assert Target("t", 4000, 5000, ">=").status == "FAIL"
    assert Target("t", 4, 5, "<=").status == "PASS"
    assert Target("t", None, 5, "<=").status == "n/a"
    assert Target("t", 4, 5, "<=", failed=True).status == "FAIL"


def test_evaluate_targets_reads_a_results_document() -> None:
    workloads = {
        "W0": {"status": "ok", "events_per_second": 10_000.0},
        "W1": {
            "chain3": {"status": "ok", "runs_per_second": 6_000.0},
            "single": {"status": "ok", "runs_per_second": 4_000.0, "steady_runs_per_second": 4_500},
        },
        "W2": {"rates": {"1000": {"status": "ok", "first_step_ms": {"p50": 4.0, "p99": 60.0}}}},
        "W3": {"status": "ok", "figures": [{"rules": 10_000, "events_per_second": 250_000}]},
        "W4": {"backlog": {"status": "ok", "peak_rss_mb": 150.0, "events": 1_000_000}},
    }
    got = {t.name: t.status for t in evaluate_targets(workloads)}
    assert got == {
        "W1 3-step runs/s": "PASS",
        "W1 1-step / W0": "FAIL",
        "W2 @1000/s p50 publish->first step": "PASS",
        "W2 @1000/s p99 publish->first step": "FAIL",
        "W3 matching @10,000 rules": "PASS",
        "W4 peak RSS with backlog": "PASS",
    }


def test_the_one_step_ratio_uses_the_w0_run_next_to_it() -> None:
    single = {
        "single": {"status": "ok", "runs_per_second": 3_000.0, "steady_runs_per_second": 4_000}
    }
    w0 = {"status": "ok", "events_per_second": 10_000.0}

    def ratio(again: dict[str, object]) -> float | None:
        targets = evaluate_targets({"W0": {**w0, "again": again}, "W1": single})
        return next(t.value for t in targets if t.name == "W1 1-step / W0")

    assert ratio({"status": "ok", "events_per_second": 8_000.0}) == 0.5
    assert ratio({"status": "timeout", "events_per_second": 1.0}) == 0.4  # the first W0 then


def test_the_one_step_ratio_compares_the_same_windows() -> None:
    """Drain window against drain window; the note has process start against process start
    (the daemon's launch, W0's group join), never one window against the other."""
    w0 = {"status": "ok", "events_per_second": 10_000.0, "events_per_second_incl_group_join": 5_000}
    single = {"status": "ok", "runs_per_second": 2_000.0, "steady_runs_per_second": 3_000.0}
    target = next(
        t
        for t in evaluate_targets({"W0": w0, "W1": {"single": single}})
        if t.name == "W1 1-step / W0"
    )
    assert target.value == 0.3
    assert "40.0% from process start" in target.note
    assert target.status == "FAIL"


def test_targets_of_unfinished_or_missing_workloads() -> None:
    workloads = {
        "W1": {"chain3": {"status": "timeout", "runs_per_second": 9_999.0}},
        "W2": {"rates": {"1000": {"status": "saturated", "first_step_ms": {"p50": 1, "p99": 2}}}},
    }
    got = {t.name: t.status for t in evaluate_targets(workloads)}
    assert got["W1 3-step runs/s"] == "n/a"  # a timed-out drain has no honest rate
    assert got["W2 @1000/s p50 publish->first step"] == "FAIL"  # the backlog kept growing
    assert got["W3 matching @10,000 rules"] == "n/a"


def test_profile_areas_and_self_time() -> None:
    text = "\n".join(
        [
            "main (app.py:1);execute (asyncpg/connection.py:10) 3",
            "main (app.py:1);start_span (opentelemetry/trace/__init__.py:5) 1",
            "garbage line",
        ]
    )
    stacks = parse_collapsed(text)
    assert stacks[0] == (["main (app.py:1)", "execute (asyncpg/connection.py:10)"], 3)
    summary = summarize_profile(stacks)
    assert summary["samples"] == 4
    assert summary["areas"]["asyncpg (driver + pool)"] == 0.75
    assert summary["self"][0] == ("execute (asyncpg/connection.py)", 0.75)
    assert ("main (app.py)", 1.0) in summary["inclusive"]
