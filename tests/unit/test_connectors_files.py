"""The files sink (atomic writes, root confinement) and the file watcher, on a temp dir."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ObjectReceiveStream

from connectors import ConnectorConfigError, ConnectorRejected, create
from connectors.files import FilesSink, FileWatcherSource, count_rows
from orchestrator import CloudEvent

pytestmark = pytest.mark.anyio

DEADLINE = 10  # seconds: a watcher that misses a file fails the test instead of hanging it


def files_sink(root: Path, **options: Any) -> FilesSink:
    sink = create("out", {"kind": "files", "root": str(root), **options})
    assert isinstance(sink, FilesSink)
    return sink


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[FilesSink]:
    root = tmp_path / "root"
    root.mkdir()
    async with files_sink(root) as opened:
        yield opened


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- files sink ------------------------------------------------------------------------


async def test_write_and_read_back(sink: FilesSink) -> None:
    assert await sink.write_text("day=2026-11-24/sales.csv", "a,b\n1,2\n") == 8
    assert await sink.read_text("day=2026-11-24/sales.csv") == "a,b\n1,2\n"
    assert await sink.read_bytes("day=2026-11-24/sales.csv") == b"a,b\n1,2\n"
    assert await sink.exists("day=2026-11-24/sales.csv")
    assert await sink.glob("**/*.csv") == ["day=2026-11-24/sales.csv"]
    path = sink.root / "day=2026-11-24" / "sales.csv"
    assert path.stat().st_mode & 0o777 == 0o644
    assert sink.uri("day=2026-11-24/sales.csv") == path.as_uri()
    await sink.remove("day=2026-11-24/sales.csv")
    assert not await sink.exists("day=2026-11-24/sales.csv")


async def test_chunked_writes_from_iterables_and_async_iterables(sink: FilesSink) -> None:
    assert await sink.write_bytes("a.bin", (bytes([i]) * 3 for i in range(4))) == 12

    async def lines() -> AsyncIterator[str]:
        for i in range(3):
            await anyio.lowlevel.checkpoint()
            yield f"{i}\n"

    assert await sink.write_text("b.txt", lines()) == 6
    assert await sink.read_text("b.txt") == "0\n1\n2\n"


async def test_a_write_failing_midway_leaves_the_old_file_and_no_partial_one(
    sink: FilesSink,
) -> None:
    await sink.write_text("report.csv", "old\n")

    def failing() -> Iterator[bytes]:
        yield b"new first half\n"
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        await sink.write_bytes("report.csv", failing())
    assert await sink.read_text("report.csv") == "old\n"
    assert leftovers(sink.root) == ["report.csv"]

    async def failing_async() -> AsyncIterator[bytes]:
        yield b"new first half\n"
        raise ValueError("the async source broke")

    with pytest.raises(ValueError, match="the async source broke"):
        await sink.write_bytes("report.csv", failing_async())
    with pytest.raises(ValueError, match="broke"):
        await sink.write_bytes("fresh.csv", failing())
    assert leftovers(sink.root) == ["report.csv"]
    assert await sink.read_text("report.csv") == "old\n"


async def test_a_cancelled_write_leaves_no_partial_file(sink: FilesSink) -> None:
    first_chunk_written = anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"part one\n"
        first_chunk_written.set()
        await anyio.sleep_forever()
        yield b"never"

    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.write_bytes, "slow.csv", slow())
        with anyio.fail_after(DEADLINE):
            await first_chunk_written.wait()
        assert len(leftovers(sink.root)) == 1  # the temporary file, hidden
        assert leftovers(sink.root)[0].startswith(".slow.csv.")
        tg.cancel_scope.cancel()
    assert leftovers(sink.root) == []


@pytest.mark.parametrize("path", ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "", "."])
async def test_paths_escaping_the_root_are_refused(sink: FilesSink, path: str) -> None:
    with pytest.raises(ConnectorRejected, match=r"refused|absolute"):
        await sink.write_text(path, "x")
    assert not (sink.root.parent / "outside.txt").exists()


async def test_a_symlink_out_of_the_root_is_refused(sink: FilesSink, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (sink.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConnectorRejected, match="resolves outside the root"):
        await sink.write_text("link/x.txt", "x")
    with pytest.raises(ConnectorRejected, match="resolves outside the root"):
        await sink.read_text("link/x.txt")
    assert list(outside.iterdir()) == []


async def test_missing_files_and_roots(sink: FilesSink, tmp_path: Path) -> None:
    with pytest.raises(ConnectorRejected, match=r"read nope\.txt: No such file") as info:
        await sink.read_text("nope.txt")
    assert info.value.retryable is False
    with pytest.raises(ConnectorConfigError, match=r"connectors\.out\.root: .*create_root"):
        async with files_sink(tmp_path / "missing"):
            pass
    async with files_sink(tmp_path / "made" / "here", create_root=True) as made:
        await made.write_text("x", "y")
    assert (tmp_path / "made" / "here" / "x").read_text() == "y"


async def test_arrival_describes_a_written_file(sink: FilesSink) -> None:
    await sink.write_text("sales.csv", 'id,note\n1,"two\nlines"\n2,plain\n')
    event = await sink.arrival("sales.csv", dataset="sales", partition="2026-11-24")
    assert event.data.dataset == "sales"
    assert event.data.partition == "2026-11-24"
    assert event.data.rows == 2  # the quoted newline is inside one record; header excluded
    assert event.data.bytes == (sink.root / "sales.csv").stat().st_size
    assert event.data.uri == (sink.root / "sales.csv").as_uri()
    assert event.key == "sales/2026-11-24"
    again = await sink.arrival("sales.csv", dataset="sales", partition="2026-11-24")
    assert again.id == event.id  # one file version, one event id
    await sink.write_text("sales.csv", "id\n1\n")
    assert (await sink.arrival("sales.csv", dataset="sales")).id != event.id


def test_count_rows(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    (tmp_path / "b.csv").write_text("h\n1\n2\n3\n")
    (tmp_path / "c.txt").write_text("1\n2\n")
    assert count_rows(tmp_path / "a.jsonl") == 2
    assert count_rows(tmp_path / "b.csv") == 3
    assert count_rows(tmp_path / "b.csv", csv_header=False) == 4
    assert count_rows(tmp_path / "c.txt") is None


# -- watcher ---------------------------------------------------------------------------


def watcher(directory: Path, **options: Any) -> FileWatcherSource:
    pytest.importorskip("watchfiles")
    source = create(
        "landing",
        {"kind": "file_watcher", "dir": str(directory), "dataset": "sales", **options},
    )
    assert isinstance(source, FileWatcherSource)
    return source


async def _collect(source: FileWatcherSource, send: Any) -> None:
    async with send:
        async for event in source.events():
            await send.send(event)


async def next_event(events: ObjectReceiveStream[CloudEvent]) -> CloudEvent:
    with anyio.fail_after(DEADLINE):
        return await events.receive()


async def test_the_watcher_announces_a_new_file(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "old.csv").write_text("id\n1\n")
    source = watcher(
        landing,
        glob="*.csv",
        recursive=True,
        partition_regex=r"day=(?P<partition>\d{4}-\d{2}-\d{2})",
        debounce_ms=200,
    )
    send, events = anyio.create_memory_object_stream[CloudEvent](10)
    async with source, events, anyio.create_task_group() as tg:
        tg.start_soon(_collect, source, send)
        with anyio.fail_after(DEADLINE):
            await source.ready.wait()
        async with files_sink(landing) as out:
            await out.write_text("day=2026-11-24/.staging.csv", "ignored: hidden\n")
            await out.write_text("day=2026-11-24/notes.txt", "ignored: glob\n")
            await out.write_text("day=2026-11-24/sales.csv", "id,qty\n1,5\n2,7\n3,1\n")
        event = await next_event(events)
        path = landing / "day=2026-11-24" / "sales.csv"
        assert event.data.uri == path.as_uri()
        assert event.data.dataset == "sales"
        assert event.data.partition == "2026-11-24"
        assert event.data.rows == 3
        assert event.data.bytes == path.stat().st_size
        assert event.data.attributes == {"path": "day=2026-11-24/sales.csv", "change": "added"}
        assert event.source == "orchestrator://connectors/landing"
        assert event.key == "sales/2026-11-24"

        path.write_text("id,qty\n1,5\n")
        changed = await next_event(events)
        assert changed.data.uri == path.as_uri()
        assert changed.data.rows == 1
        assert changed.data.attributes["change"] == "modified"
        assert changed.id != event.id

        tg.cancel_scope.cancel()


async def test_the_watcher_can_announce_existing_files_and_stops_when_closed(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n')
    source = watcher(tmp_path, glob="*.jsonl", existing="emit", tick_ms=50)
    send, events = anyio.create_memory_object_stream[CloudEvent](10)
    async with events, anyio.create_task_group() as tg:
        async with source:
            tg.start_soon(_collect, source, send)
            first = await next_event(events)
            assert first.data.attributes == {"path": "a.jsonl", "change": "existing"}
            assert first.data.rows == 1
            assert first.data.partition is None
            (tmp_path / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
            second = await next_event(events)
            assert second.data.attributes["path"] == "b.jsonl"
            assert second.data.rows == 2
        # Closing the source ends events(), so the collector finishes and closes the stream.
        with anyio.fail_after(DEADLINE):
            async for extra in events:
                pytest.fail(f"unexpected event after close: {extra}")


async def test_the_watcher_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConnectorConfigError, match=r"connectors\.landing\.dir: .*No such file"):
        async with watcher(tmp_path / "nope"):
            pass


async def test_rows_are_not_counted_for_large_files(tmp_path: Path) -> None:
    async with files_sink(tmp_path, count_rows_max_bytes=10) as out:
        await out.write_text("big.csv", "h\n" + "1\n" * 20)
        assert (await out.arrival("big.csv", dataset="d")).data.rows is None
        await out.write_text("small.csv", "h\n1\n")
        assert (await out.arrival("small.csv", dataset="d")).data.rows == 1
    assert sorted(os.listdir(tmp_path)) == ["big.csv", "small.csv"]
