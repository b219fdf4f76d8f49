"""Backoff for reconnecting to Kafka or Postgres: exponential, capped, full jitter."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, base: float = 0.2, cap: float = 10.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): uniform in
    ``[0, min(cap, base * 2**attempt)]``, so many daemons do not retry in step."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))
