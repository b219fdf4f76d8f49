"""The view of an event that patterns match against."""

from __future__ import annotations

from typing import Any

import msgspec

from orchestrator.events import CloudEvent

__all__ = ["event_to_dict"]


def event_to_dict(event: CloudEvent) -> dict[str, Any]:
    """The CloudEvent envelope as JSON-like builtins, ``data`` nested.

    ``time`` becomes an RFC 3339 string; fields left unset (``None``, empty
    ``attributes``) are absent, so ``exists = false`` matches them::

        {"specversion": "1.0", "id": "...", "source": "...", "type": "data.arrived",
         "time": "2026-11-24T10:00:00Z", "subject": "demo.orders/2026-11-24",
         "data": {"dataset": "demo.orders", "partition": "2026-11-24", "rows": 10}}
    """
    view: dict[str, Any] = msgspec.to_builtins(event)
    return view
