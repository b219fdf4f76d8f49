"""RetryPolicy: validation, backoff math and the retry decision."""

from __future__ import annotations

import random

import pytest

from orchestrator.errors import NonRetryableError, PipelineError, StepError, StoreError
from orchestrator.pipeline import RetryPolicy


def test_defaults_never_retry() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 1
    assert (policy.initial_backoff, policy.max_backoff) == (1.0, 60.0)
    assert (policy.multiplier, policy.jitter, policy.non_retryable) == (2.0, 0.2, ())
    assert not policy.should_retry(RuntimeError("x"), 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"initial_backoff": -1.0}, "initial_backoff"),
        ({"max_backoff": float("nan")}, "max_backoff"),
        ({"max_backoff": float("inf")}, "max_backoff"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"non_retryable": (ValueError, "KeyError")}, "non_retryable"),
        ({"non_retryable": [ValueError]}, "non_retryable"),
    ],
)
def test_invalid_fields_are_rejected_by_name(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(PipelineError, match=f"invalid RetryPolicy: {field}"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_delay_grows_by_the_multiplier_up_to_max_backoff() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=5.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_constant_backoff_with_multiplier_one() -> None:
    policy = RetryPolicy(initial_backoff=3.0, multiplier=1.0, jitter=0.0)
    assert {policy.delay(n) for n in range(1, 20)} == {3.0}


def test_jitter_spreads_full_range_around_the_base() -> None:
    policy = RetryPolicy(initial_backoff=10.0, max_backoff=100.0, jitter=0.2)
    assert policy.delay(1, rand=lambda: 0.0) == pytest.approx(8.0)
    assert policy.delay(1, rand=lambda: 0.5) == pytest.approx(10.0)
    assert policy.delay(1, rand=lambda: 0.999999) == pytest.approx(12.0, abs=1e-4)
    rng = random.Random(42)
    draws = [policy.delay(2, rand=rng.random) for _ in range(2000)]
    assert all(16.0 <= d < 24.0 for d in draws)
    assert min(draws) < 16.5
    assert max(draws) > 23.5


def test_jitter_never_exceeds_max_backoff() -> None:
    policy = RetryPolicy(initial_backoff=50.0, max_backoff=60.0, jitter=0.5)
    assert policy.delay(1, rand=lambda: 0.999) == 60.0
    assert policy.delay(5, rand=lambda: 0.0) == 30.0
    assert policy.delay(5, rand=lambda: 0.999) == 60.0


def test_huge_attempt_numbers_cap_instead_of_overflowing() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=60.0, multiplier=10.0, jitter=0.0)
    assert policy.delay(100_000) == 60.0


def test_zero_backoff_means_no_wait() -> None:
    assert RetryPolicy(initial_backoff=0.0).delay(50) == 0.0


def test_delay_counts_retries_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().delay(0)


def test_should_retry_until_attempts_are_used_up() -> None:
    policy = RetryPolicy(max_attempts=3)
    exc = RuntimeError("flaky")
    assert [policy.should_retry(exc, n) for n in (1, 2, 3, 4)] == [True, True, False, False]


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (RuntimeError("x"), True),
        (TimeoutError(), True),
        (StepError("try again"), True),
        (StoreError("db down"), True),
        (StepError("bad input", retryable=False), False),
        (NonRetryableError("bad input"), False),
        (KeyError("listed"), False),
        (LookupError("listed"), True),
    ],
)
def test_should_retry_honours_the_error(exc: BaseException, retry: bool) -> None:
    policy = RetryPolicy(max_attempts=5, non_retryable=(KeyError,))
    assert policy.should_retry(exc, 1) is retry


def test_timeouts_can_be_made_non_retryable() -> None:
    policy = RetryPolicy(max_attempts=5, non_retryable=(TimeoutError,))
    assert not policy.should_retry(TimeoutError("slow"), 1)


def test_policies_are_frozen_and_comparable() -> None:
    policy = RetryPolicy(max_attempts=2)
    assert policy == RetryPolicy(max_attempts=2)
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]
