"""File watcher source: a directory's new and changed files as arrival events (watchfiles)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from collections.abc import AsyncGenerator, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import anyio
import msgspec

from connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    Options,
    parse_options,
)
from connectors.files._common import (
    FileFacts,
    arrival_event,
    file_facts,
    partition_of,
    translate_os_error,
)
from orchestrator import CloudEvent

__all__ = ["FileWatcherFactory", "FileWatcherOptions", "FileWatcherSource"]

log = logging.getLogger("connectors.files")

_64_MIB = 64 * 1024 * 1024


class FileWatcherOptions(Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of ``kind = "file_watcher"``."""

    dir: str
    """Directory to watch."""
    dataset: str
    """``dataset`` of the arrival events."""
    glob: str = "*"
    """Files to announce: matched against the file name, or against the path relative to
    ``dir`` when the pattern contains ``/``."""
    recursive: bool = False
    """Watch subdirectories too."""
    partition_regex: str = ""
    """Regex searched in the path relative to ``dir``; its ``partition`` group (else its
    first group, else the whole match) is the event's ``partition``. Empty: no partition."""
    existing: Literal["ignore", "emit"] = "ignore"
    """Files already present when watching starts: ``emit`` announces them too (their event
    ids are stable, so the orchestrator drops ones it has already seen)."""
    include_hidden: bool = False
    """Announce files whose path has a component starting with ``.`` (temporary files of
    atomic writers usually do)."""
    count_rows_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = _64_MIB
    """Rows of ``.csv``/``.jsonl``/``.ndjson`` files smaller than this are counted."""
    csv_header: bool = True
    """A CSV's first record is a header, not counted as a row."""
    source: str = ""
    """CloudEvents ``source``; default ``orchestrator://connectors/<name>``."""
    debounce_ms: Annotated[int, msgspec.Meta(ge=1)] = 1600
    """Longest time changes are gathered into one batch (a file changes once per batch)."""
    step_ms: Annotated[int, msgspec.Meta(ge=1)] = 50
    """A batch ends after this much quiet."""
    force_polling: bool = False
    """Poll instead of kernel notifications (network filesystems, some container mounts)."""
    poll_delay_ms: Annotated[int, msgspec.Meta(ge=1)] = 300
    """Polling interval with ``force_polling``."""
    tick_ms: Annotated[int, msgspec.Meta(ge=10)] = 1000
    """How often the watch thread wakes without changes (to notice a stop); the first tick
    also re-scans once, to announce files created while the watch was being set up."""


class FileWatcherSource(Connector):
    """Announces new or changed files of a directory as arrival events.

    ``events()`` yields one event per new file version (a size or modification time not
    announced before) whose path matches ``glob``. Deleted files are forgotten. Producers
    should write files atomically (temporary name, then rename), as the ``files`` sink does,
    so a half-written file is never announced.

    ``ready`` is set once the files present at start have been recorded: every file created
    after that is announced.
    """

    kind = "file_watcher"

    def __init__(self, name: str, options: FileWatcherOptions) -> None:
        super().__init__(name)
        self.options = options
        self._dir = Path(options.dir)
        self._pattern = re.compile(options.partition_regex) if options.partition_regex else None
        self._source = options.source or f"orchestrator://connectors/{name}"
        self._stop: anyio.Event | None = None
        self.ready = anyio.Event()

    @property
    def directory(self) -> Path:
        return self._dir

    async def _open(self) -> None:
        directory = self._dir
        try:
            resolved = await anyio.to_thread.run_sync(
                lambda: directory.expanduser().resolve(strict=True)
            )
        except OSError as exc:
            raise ConnectorConfigError(
                f"connectors.{self.name}.dir: {directory}: {exc.strerror}", connector=self.name
            ) from None
        if not resolved.is_dir():
            raise ConnectorConfigError(
                f"connectors.{self.name}.dir: {directory} is not a directory", connector=self.name
            )
        self._dir = resolved

    async def _close(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def matches(self, path: Path) -> bool:
        """Whether a path below the directory is one this source announces."""
        try:
            rel = PurePosixPath(path.relative_to(self._dir).as_posix())
        except ValueError:
            return False
        if not rel.parts or (not self.options.recursive and len(rel.parts) > 1):
            return False
        if not self.options.include_hidden and any(p.startswith(".") for p in rel.parts):
            return False
        pattern = self.options.glob
        return fnmatchcase(rel.as_posix() if "/" in pattern else rel.name, pattern)

    def _scan(self) -> dict[Path, FileFacts]:
        walk: Iterable[Path] = (
            self._dir.rglob("*") if self.options.recursive else self._dir.iterdir()
        )
        found = {}
        for path in walk:
            if self.matches(path):
                facts = self._facts(path)
                if facts is not None:
                    found[path] = facts
        return found

    def _facts(self, path: Path) -> FileFacts | None:
        return file_facts(
            path,
            count_rows_max_bytes=self.options.count_rows_max_bytes,
            csv_header=self.options.csv_header,
        )

    def _event(self, facts: FileFacts, change: str) -> CloudEvent:
        rel = facts.path.relative_to(self._dir).as_posix()
        return arrival_event(
            facts,
            dataset=self.options.dataset,
            partition=partition_of(rel, self._pattern),
            source=self._source,
            attributes={"path": rel, "change": change},
        )

    def _diff(self, known: dict[Path, tuple[int, int]], paths: Iterable[Path]) -> list[CloudEvent]:
        """Events for the paths whose current version was not announced; updates ``known``."""
        events = []
        for path in sorted(set(paths)):
            facts = self._facts(path) if self.matches(path) else None
            if facts is None:
                known.pop(path, None)
                continue
            previous = known.get(path)
            if previous == facts.signature:
                continue
            known[path] = facts.signature
            events.append(self._event(facts, "added" if previous is None else "modified"))
        return events

    async def _io(self, what: str, fn: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(fn)
        except OSError as exc:
            raise translate_os_error(exc, what, self.name) from exc

    async def events(self) -> AsyncGenerator[CloudEvent, None]:
        """Arrival events until the source is closed. One iteration at a time."""
        self._check_open()
        if self._stop is not None:
            raise ConnectorError(
                f"connector {self.name!r}: events() is already being iterated", connector=self.name
            )
        import watchfiles

        o = self.options
        stop = self._stop = anyio.Event()
        try:
            present = await self._io(f"scan {self._dir}", self._scan)
            known: dict[Path, tuple[int, int]] = {}
            if o.existing == "emit":
                ordered = sorted(present.values(), key=lambda f: (f.mtime_ns, str(f.path)))
                startup = [self._event(f, "existing") for f in ordered]
                known.update((f.path, f.signature) for f in ordered)
            else:
                startup = []
                known.update((p, f.signature) for p, f in present.items())
            self.ready.set()
            log.info("connector %r: watching %s for %r", self.name, self._dir, o.glob)
            for event in startup:
                yield event
            rescanned = False
            changes_seen = watchfiles.awatch(
                self._dir,
                watch_filter=lambda _change, path: self.matches(Path(path)),
                debounce=o.debounce_ms,
                step=o.step_ms,
                stop_event=stop,
                rust_timeout=o.tick_ms,
                yield_on_timeout=True,
                recursive=o.recursive,
                force_polling=o.force_polling,
                poll_delay_ms=o.poll_delay_ms,
            )
            async with contextlib.aclosing(changes_seen):
                async for changes in changes_seen:
                    paths = [Path(path) for _change, path in changes]
                    if not rescanned:
                        # The watch is established now: catch files created while it was not.
                        rescanned = True
                        paths += list(await self._io(f"scan {self._dir}", self._scan))
                    if not paths:
                        continue
                    batch = await self._io(
                        f"stat in {self._dir}", lambda p=paths: self._diff(known, p)
                    )
                    for event in batch:
                        yield event
        finally:
            self._stop = None

    def __repr__(self) -> str:
        return f"<FileWatcherSource {self.name!r} dir={str(self._dir)!r} {self.state}>"


class FileWatcherFactory:
    """Watches a directory and announces new or changed files as arrival events."""

    options_type = FileWatcherOptions
    path_options = frozenset({"dir"})

    def create(self, name: str, options: Mapping[str, Any]) -> FileWatcherSource:
        parsed = parse_options(name, options, FileWatcherOptions)
        if parsed.partition_regex:
            try:
                re.compile(parsed.partition_regex)
            except re.error as exc:
                raise ConnectorConfigError(
                    f"connectors.{name}.partition_regex: not a valid regex: {exc}",
                    connector=name,
                ) from None
        if importlib.util.find_spec("watchfiles") is None:
            raise ConnectorConfigError(
                f"connectors.{name}.kind: 'file_watcher' needs the watchfiles package"
                " (pip install watchfiles)",
                connector=name,
            )
        return FileWatcherSource(name, parsed)
