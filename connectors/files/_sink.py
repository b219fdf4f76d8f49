"""Files sink: reads and atomic writes below one root directory."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from pathlib import Path, PurePath
from typing import IO, Annotated, Any, TypeVar

import anyio
import msgspec

from connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorRejected,
    Options,
    parse_options,
)
from connectors.files._common import arrival_event, file_facts, translate_os_error
from orchestrator import CloudEvent

__all__ = ["FilesFactory", "FilesOptions", "FilesSink"]

log = logging.getLogger("connectors.files")

T = TypeVar("T")
Data = bytes | Iterable[bytes] | AsyncIterable[bytes]
Text = str | Iterable[str] | AsyncIterable[str]

_64_MIB = 64 * 1024 * 1024


class FilesOptions(Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of ``kind = "files"``."""

    root: str
    """Directory every path is relative to; paths that resolve outside it are refused."""
    create_root: bool = False
    """Create ``root`` when the connector opens if it is missing (off: a missing mount fails)."""
    fsync: bool = True
    """fsync each written file and its directory before the write returns."""
    file_mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)] = 0o644
    """Permission bits of written files (TOML: ``0o640``)."""
    count_rows_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = _64_MIB
    """``arrival()`` counts rows of ``.csv``/``.jsonl`` files smaller than this."""


class _AtomicFile:
    """A temporary file beside ``target`` that replaces it only when complete."""

    def __init__(self, target: Path, *, fsync: bool, mode: int) -> None:
        self.target = target
        self.fsync = fsync
        self.mode = mode
        self.size = 0
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file: IO[bytes] = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)

    def commit(self) -> int:
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, self.mode)
        os.replace(self.tmp, self.target)
        if self.fsync:
            dir_fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return self.size

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class FilesSink(Connector):
    """Files below ``root``: reads, atomic writes, and arrival events for what was written.

    A write goes to a temporary file in the target's directory, is fsynced and then renamed
    over the target (``os.replace``), so readers and watchers see the old file or the whole
    new one, never a partial one. If producing the data fails mid-way, the temporary file is
    removed and the target is untouched.
    """

    kind = "files"

    def __init__(self, name: str, options: FilesOptions) -> None:
        super().__init__(name)
        self.options = options
        self._root = Path(options.root)

    @property
    def root(self) -> Path:
        return self._root

    async def _open(self) -> None:
        root = self._root
        create = self.options.create_root

        def _resolve() -> Path:
            if create:
                root.expanduser().mkdir(parents=True, exist_ok=True)
            return root.expanduser().resolve(strict=True)

        try:
            resolved = await anyio.to_thread.run_sync(_resolve)
        except OSError as exc:
            hint = " (set create_root = true to create it)" if not self.options.create_root else ""
            raise ConnectorConfigError(
                f"connectors.{self.name}.root: {root}: {exc.strerror}{hint}", connector=self.name
            ) from None
        if not resolved.is_dir():
            raise ConnectorConfigError(
                f"connectors.{self.name}.root: {root} is not a directory", connector=self.name
            )
        self._root = resolved

    def path(self, relative: str | PurePath) -> Path:
        """The absolute path of ``relative`` below the root (symlinks resolved).

        Raises :class:`ConnectorRejected` for absolute paths and paths that resolve outside
        the root (``../x``, a symlink leading out).
        """
        self._check_open()
        rel = PurePath(relative)
        if rel.is_absolute() or rel.drive:
            raise ConnectorRejected(
                f"connector {self.name!r}: {str(relative)!r} is absolute; pass a path relative"
                f" to the root {self._root}",
                connector=self.name,
            )
        target = (self._root / rel).resolve()
        if target == self._root or not target.is_relative_to(self._root):
            raise ConnectorRejected(
                f"connector {self.name!r}: {str(relative)!r} resolves outside the root"
                f" {self._root}; refused",
                connector=self.name,
            )
        return target

    def uri(self, relative: str | PurePath) -> str:
        """``file://`` URI of a path below the root (for arrival events)."""
        return self.path(relative).as_uri()

    async def _io(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn)
        except OSError as exc:
            raise translate_os_error(exc, what, self.name) from exc

    async def read_bytes(self, relative: str | PurePath) -> bytes:
        target = self.path(relative)
        return await self._io(f"read {relative}", target.read_bytes)

    async def read_text(self, relative: str | PurePath, *, encoding: str = "utf-8") -> str:
        target = self.path(relative)
        return await self._io(f"read {relative}", lambda: target.read_text(encoding=encoding))

    async def exists(self, relative: str | PurePath) -> bool:
        target = self.path(relative)
        return await self._io(f"stat {relative}", target.exists)

    async def remove(self, relative: str | PurePath, *, missing_ok: bool = False) -> None:
        target = self.path(relative)
        await self._io(f"remove {relative}", lambda: target.unlink(missing_ok=missing_ok))

    async def glob(self, pattern: str) -> list[str]:
        """Paths below the root matching ``pattern`` (``*.csv``, ``**/*.jsonl``), relative and
        sorted; files only."""
        self._check_open()
        root = self._root

        def _glob() -> list[str]:
            return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())

        return await self._io(f"glob {pattern}", _glob)

    async def write_bytes(self, relative: str | PurePath, data: Data) -> int:
        """Atomically write ``data`` (bytes, or an iterable or async iterable of chunks).

        Parent directories are created. Returns the bytes written.
        """
        target = self.path(relative)
        what = f"write {relative}"
        o = self.options
        if isinstance(data, bytes | bytearray | memoryview):
            data = [bytes(data)]
        if not isinstance(data, AsyncIterable):
            chunks = data
            return await self._io(what, lambda: self._write_sync(target, chunks))
        handle = await self._io(what, lambda: _AtomicFile(target, fsync=o.fsync, mode=o.file_mode))
        try:
            async for chunk in data:
                await self._io(what, functools.partial(handle.write, chunk))
            return await self._io(what, handle.commit)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(handle.abort)
            raise

    def _write_sync(self, target: Path, chunks: Iterable[bytes]) -> int:
        handle = _AtomicFile(target, fsync=self.options.fsync, mode=self.options.file_mode)
        try:
            for chunk in chunks:
                handle.write(chunk)
            return handle.commit()
        except BaseException:
            handle.abort()
            raise

    async def write_text(
        self, relative: str | PurePath, text: Text, *, encoding: str = "utf-8"
    ) -> int:
        """Atomically write ``text`` (a string, or an iterable or async iterable of strings)."""
        if isinstance(text, str):
            return await self.write_bytes(relative, text.encode(encoding))
        if isinstance(text, AsyncIterable):
            return await self.write_bytes(relative, _encode_async(text, encoding))
        return await self.write_bytes(relative, (part.encode(encoding) for part in text))

    async def arrival(
        self,
        relative: str | PurePath,
        *,
        dataset: str,
        partition: str | None = None,
        attributes: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> CloudEvent:
        """An arrival event for a file below the root (size, rows, ``file://`` URI), e.g. to
        announce what a step wrote. Its id is stable for one version of the file."""
        target = self.path(relative)
        limit = self.options.count_rows_max_bytes
        facts = await self._io(
            f"stat {relative}", lambda: file_facts(target, count_rows_max_bytes=limit)
        )
        if facts is None:
            raise ConnectorRejected(
                f"connector {self.name!r}: {relative} is not a regular file", connector=self.name
            )
        return arrival_event(
            facts,
            dataset=dataset,
            partition=partition,
            source=source or f"orchestrator://connectors/{self.name}",
            attributes=attributes,
        )

    def __repr__(self) -> str:
        return f"<FilesSink {self.name!r} root={str(self._root)!r} {self.state}>"


async def _encode_async(parts: AsyncIterable[str], encoding: str) -> AsyncIterable[bytes]:
    async for part in parts:
        yield part.encode(encoding)


class FilesFactory:
    """Files below a root directory: reads and atomic writes (temp file, fsync, rename)."""

    options_type = FilesOptions
    path_options = frozenset({"root"})

    def create(self, name: str, options: Mapping[str, Any]) -> FilesSink:
        return FilesSink(name, parse_options(name, options, FilesOptions))
