"""Connectors: how steps deliver data to other systems and how data arrivals are noticed.

Configure them in ``[connectors.<name>]`` tables (``kind`` plus that kind's options); the
daemon opens them at start-up and hands them to steps as ``ctx.connectors["<name>"]``.
Built-in kinds: ``http``, ``postgres``, ``files``, ``file_watcher``; plugins add more
through the ``orchestrator.connectors`` entry-point group. See docs/connectors.md.

Importing this package does no I/O and does not import the built-in connectors' drivers;
each kind's module is imported when it is first used.
"""

from connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorFactory,
    ConnectorRejected,
    ConnectorTimeout,
    ConnectorUnavailable,
    Options,
    Sink,
    Source,
    parse_options,
    read_secret,
    redact_dsn,
)
from connectors.registry import (
    ENTRY_POINT_GROUP,
    Configured,
    KindInfo,
    Listing,
    available,
    create,
    create_all,
    describe,
    kinds,
    open_all,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Configured",
    "Connector",
    "ConnectorConfigError",
    "ConnectorError",
    "ConnectorFactory",
    "ConnectorRejected",
    "ConnectorTimeout",
    "ConnectorUnavailable",
    "KindInfo",
    "Listing",
    "Options",
    "Sink",
    "Source",
    "available",
    "create",
    "create_all",
    "describe",
    "kinds",
    "open_all",
    "parse_options",
    "read_secret",
    "redact_dsn",
]
