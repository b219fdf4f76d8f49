"""Retry policy of a step: how many attempts, how long to wait between them, what not to retry.

The delay before retry ``n`` (``n = 1`` is the first retry) is::

    base  = min(initial_backoff * multiplier ** (n - 1), max_backoff)
    delay = base * (1 + jitter * u),  u uniform in [-1, 1)

clamped to ``[0, max_backoff]``. An error is not retried when the attempts are used up, when
it is an instance of one of ``non_retryable``, or when it carries ``retryable = False``
(:class:`~orchestrator.errors.NonRetryableError`, ``StepError(..., retryable=False)``).
Timeouts are ordinary, retryable failures unless ``TimeoutError`` is listed in
``non_retryable``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import msgspec

from orchestrator.errors import PipelineError

__all__ = ["RetryPolicy"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When and how often a failed step is attempted again."""

    max_attempts: int = 1
    """Attempts in total, the first one included; the default 1 never retries."""
    initial_backoff: float = 1.0
    """Seconds to wait before the first retry."""
    max_backoff: float = 60.0
    """Upper bound in seconds of any wait, jitter included."""
    multiplier: float = 2.0
    """Growth of the wait from one retry to the next; 1 keeps it constant."""
    jitter: float = 0.2
    """Random spread as a fraction of the wait: 0.2 draws it from ±20 % around the base."""
    non_retryable: tuple[type[BaseException], ...] = ()
    """Exception types (subclasses included) that fail the step at once."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            problems.append(f"max_attempts must be an integer, got {self.max_attempts!r}")
        elif self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1 (1 = no retry), got {self.max_attempts}")
        for field in ("initial_backoff", "max_backoff"):
            value = getattr(self, field)
            if not _is_number(value) or not 0 <= value < math.inf:
                problems.append(f"{field} must be a finite number of seconds >= 0, got {value!r}")
        if not _is_number(self.multiplier) or not self.multiplier >= 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not _is_number(self.jitter) or not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be a fraction between 0 and 1, got {self.jitter!r}")
        if not isinstance(self.non_retryable, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.non_retryable
        ):
            problems.append(
                f"non_retryable must be a tuple of exception classes, got {self.non_retryable!r}"
            )
        if problems:
            raise PipelineError("invalid RetryPolicy: " + "; ".join(problems))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry).

        ``rand`` returns a float in ``[0, 1)``; 0.5 gives the base delay without jitter.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts retries from 1, got {attempt}")
        if self.initial_backoff == 0 or self.max_backoff == 0:
            return 0.0
        try:
            base = self.initial_backoff * self.multiplier ** (attempt - 1)
        except OverflowError:
            base = math.inf
        base = min(base, self.max_backoff)
        jittered = base * (1 + self.jitter * (2 * rand() - 1))
        return min(self.max_backoff, max(0.0, jittered))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether to attempt again after attempt number ``attempt`` (from 1) raised ``exc``."""
        if attempt >= self.max_attempts:
            return False
        if self.non_retryable and isinstance(exc, self.non_retryable):
            return False
        return getattr(exc, "retryable", True) is not False


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
