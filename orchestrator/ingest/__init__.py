"""Kafka intake: consume arrival events, dead-letter bad records, write batches to Postgres."""

from orchestrator.ingest.consumer import Ingestor, backoff_delay

__all__ = ["Ingestor", "backoff_delay"]
