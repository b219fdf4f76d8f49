"""Postgres sink (``kind = "postgres"``): own pool, execute/fetch, COPY, transactions."""

from connectors.postgres._sink import (
    PostgresFactory,
    PostgresOptions,
    PostgresSink,
    PostgresTransaction,
)

__all__ = ["PostgresFactory", "PostgresOptions", "PostgresSink", "PostgresTransaction"]
