"""What the files sink and the watcher share: describing a file as an arrival event."""

from __future__ import annotations

import csv
import errno
import os
import re
import uuid
from pathlib import Path
from typing import Any

from connectors.base import ConnectorError, ConnectorRejected, ConnectorUnavailable
from orchestrator import CloudEvent, new_arrival

__all__ = [
    "FileFacts",
    "arrival_event",
    "count_rows",
    "file_facts",
    "partition_of",
    "translate_os_error",
]

_NAMESPACE = uuid.UUID("0b5e7a52-3c1d-5f4e-8a9b-1c2d3e4f5a6b")
_ROW_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})
_REFUSED_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST,
     errno.ENAMETOOLONG, errno.EROFS, errno.ELOOP}
)  # fmt: skip


def translate_os_error(exc: OSError, what: str, connector: str) -> ConnectorError:
    """Missing files, permissions and the like are refusals; anything else (disk full, I/O
    errors, stale network mounts) may pass, so it is retryable."""
    text = f"connector {connector!r}: {what}: {exc.strerror or exc}"
    if exc.errno in _REFUSED_ERRNOS:
        return ConnectorRejected(text, connector=connector)
    return ConnectorUnavailable(text, connector=connector)


def count_rows(path: Path, *, csv_header: bool = True) -> int | None:
    """Records in a ``.csv`` (quoted newlines respected, header excluded when ``csv_header``)
    or non-blank lines in a ``.jsonl``/``.ndjson``; ``None`` for other files."""
    suffix = path.suffix.lower()
    if suffix not in _ROW_SUFFIXES:
        return None
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            records = sum(1 for row in csv.reader(f) if row)
        return max(0, records - 1) if csv_header else records
    with path.open("rb") as fb:
        return sum(1 for line in fb if line.strip())


class FileFacts:
    """Size, modification time and (for small tabular files) row count of one file."""

    __slots__ = ("mtime_ns", "path", "rows", "size")

    def __init__(self, path: Path, size: int, mtime_ns: int, rows: int | None) -> None:
        self.path = path
        self.size = size
        self.mtime_ns = mtime_ns
        self.rows = rows

    @property
    def signature(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


def file_facts(
    path: Path, *, count_rows_max_bytes: int, csv_header: bool = True
) -> FileFacts | None:
    """Facts of a regular file, or ``None`` when it is gone or not a regular file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not os.path.isfile(path):
        return None
    rows = None
    if st.st_size < count_rows_max_bytes:
        try:
            rows = count_rows(path, csv_header=csv_header)
        except FileNotFoundError:
            return None
    return FileFacts(path, st.st_size, st.st_mtime_ns, rows)


def partition_of(relative: str, pattern: re.Pattern[str] | None) -> str | None:
    """The partition a path belongs to: the regex's ``partition`` group, else its first
    group, else the whole match; ``None`` without a pattern or a match."""
    if pattern is None:
        return None
    match = pattern.search(relative)
    if match is None:
        return None
    if "partition" in pattern.groupindex:
        return match["partition"]
    return match.group(1) if pattern.groups else match.group(0)


def arrival_event(
    facts: FileFacts,
    *,
    dataset: str,
    partition: str | None,
    source: str,
    attributes: dict[str, Any] | None = None,
) -> CloudEvent:
    """An arrival event for one version of a file.

    The id is derived from the file's URI, size and modification time, so announcing the
    same version twice (a restarted watcher) yields the same id, which the orchestrator
    de-duplicates.
    """
    uri = facts.path.absolute().as_uri()
    event_id = uuid.uuid5(_NAMESPACE, f"{uri}\0{facts.size}\0{facts.mtime_ns}")
    return new_arrival(
        dataset,
        partition=partition,
        uri=uri,
        rows=facts.rows,
        size=facts.size,
        attributes=attributes,
        source=source,
        id=str(event_id),
    )
