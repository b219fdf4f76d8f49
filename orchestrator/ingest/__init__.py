"""Kafka intake: consume arrival events, dead-letter bad records, write batches to Postgres;
and the absence-deadline watcher that fires rules when data did not arrive."""

from orchestrator.ingest.consumer import Ingestor
from orchestrator.ingest.deadlines import DeadlineWatcher
from orchestrator.ingest.writer import FlowPlan, write_batch

__all__ = ["DeadlineWatcher", "FlowPlan", "Ingestor", "write_batch"]
