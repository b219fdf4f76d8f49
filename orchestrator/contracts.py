"""Data contracts: what an arrival event of a dataset must say, checked at the door.

A contract is declared per dataset in the config (``[contracts."sales.orders"]``). An
event that breaks its dataset's contract is *quarantined*: it is stored with the reason
and recorded as a dead letter, rules start nothing for it unless they opt in with
``contract = "flag"`` (their runs then receive ``contract_error`` in their params).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from orchestrator.config import ContractSettings
from orchestrator.errors import ConfigError
from orchestrator.events import CloudEvent

__all__ = ["Contracts"]

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}
_FIELDS = ("partition", "uri", "rows", "bytes", "schema")


class _Compiled:
    def __init__(self, dataset: str, c: ContractSettings) -> None:
        where = f"contracts.{dataset}"
        for name in c.required:
            if name not in _FIELDS:
                raise ConfigError(
                    f"{where}.required: unknown field {name!r} (fields: {', '.join(_FIELDS)})"
                )
        for name, kind in c.attributes.items():
            if kind not in _TYPES:
                raise ConfigError(
                    f"{where}.attributes.{name}: unknown type {kind!r}"
                    " (types: str, int, float, bool)"
                )
        try:
            self.partition = re.compile(c.partition_pattern) if c.partition_pattern else None
        except re.error as exc:
            raise ConfigError(f"{where}.partition_pattern: not a valid regex: {exc}") from None
        self.c = c

    def check(self, event: CloudEvent) -> str | None:
        d = event.data
        c = self.c
        for name in c.required:
            if getattr(d, name) is None:
                return f"required field {name!r} is missing"
        if self.partition is not None and (
            d.partition is None or not self.partition.fullmatch(d.partition)
        ):
            return f"partition {d.partition!r} does not match {c.partition_pattern!r}"
        if c.min_rows is not None and (d.rows is None or d.rows < c.min_rows):
            return f"rows {d.rows!r} is below the minimum of {c.min_rows}"
        if c.max_bytes is not None and d.bytes is not None and d.bytes > c.max_bytes:
            return f"bytes {d.bytes} exceeds the maximum of {c.max_bytes}"
        for name, kind in c.attributes.items():
            if name not in d.attributes:
                return f"attribute {name!r} is missing"
            value = d.attributes[name]
            if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
                return f"attribute {name!r} should be {kind}, got {type(value).__name__}"
        if not c.allow_extra_attributes:
            extra = sorted(set(d.attributes) - set(c.attributes))
            if extra:
                return f"unexpected attributes {extra}"
        return None


class Contracts:
    """The configured contracts, compiled once; ``check`` is pure and cheap."""

    def __init__(self, contracts: Mapping[str, ContractSettings]) -> None:
        self._by_dataset = {ds: _Compiled(ds, c) for ds, c in contracts.items()}

    def __bool__(self) -> bool:
        return bool(self._by_dataset)

    def check(self, event: CloudEvent) -> str | None:
        """None when the event keeps its dataset's contract (or it has none), else why not."""
        compiled = self._by_dataset.get(event.data.dataset)
        return None if compiled is None else compiled.check(event)
