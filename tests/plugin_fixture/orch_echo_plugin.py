"""An example connector plugin: ``kind = "echo"``, a sink that keeps what steps send it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors import Connector, ConnectorRejected, Options, parse_options

__all__ = ["EchoFactory", "EchoOptions", "EchoSink"]


class EchoOptions(Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prefix: str = ""
    """Prepended to every message."""
    max_messages: int = 100
    """More messages than this are refused."""


class EchoSink(Connector):
    kind = "echo"

    def __init__(self, name: str, options: EchoOptions) -> None:
        super().__init__(name)
        self.options = options
        self.sent: list[str] = []

    async def _open(self) -> None:
        self.sent = []

    async def send(self, message: str) -> str:
        self._check_open()
        if len(self.sent) >= self.options.max_messages:
            raise ConnectorRejected(
                f"connector {self.name!r}: more than {self.options.max_messages} messages",
                connector=self.name,
            )
        text = self.options.prefix + message
        self.sent.append(text)
        return text


class EchoFactory:
    """Echo sink: keeps what it is sent (an example plugin)."""

    options_type = EchoOptions

    def create(self, name: str, options: Mapping[str, Any]) -> EchoSink:
        return EchoSink(name, parse_options(name, options, EchoOptions))
