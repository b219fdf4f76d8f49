"""Connector registry, options, lifecycle and plugins (no external servers)."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import connectors
import connectors.files
import connectors.http
import connectors.postgres
from connectors import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorRejected,
    ConnectorTimeout,
    ConnectorUnavailable,
    Sink,
    Source,
    available,
    create,
    create_all,
    kinds,
    open_all,
)
from orchestrator import StepContext
from orchestrator.errors import ConfigError, OrchestratorError

pytestmark = pytest.mark.anyio

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugin_fixture"
BUILTIN_KINDS = {"files", "file_watcher", "http", "postgres"}


# -- public surface ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            connectors,
            {
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
            },
        ),
        (
            connectors.http,
            {
                "HttpFactory",
                "HttpOptions",
                "HttpRejected",
                "HttpResponse",
                "HttpSink",
                "HttpTimeout",
                "HttpUnavailable",
                "idempotency_key",
            },
        ),
        (
            connectors.postgres,
            {"PostgresFactory", "PostgresOptions", "PostgresSink", "PostgresTransaction"},
        ),
        (
            connectors.files,
            {
                "FileWatcherFactory",
                "FileWatcherOptions",
                "FileWatcherSource",
                "FilesFactory",
                "FilesOptions",
                "FilesSink",
                "count_rows",
            },
        ),
    ],
)
def test_public_names_are_exported(module: Any, names: set[str]) -> None:
    assert set(module.__all__) == names
    for name in names:
        assert getattr(module, name) is not None, name


def test_error_tree_and_retryability() -> None:
    assert issubclass(ConnectorError, OrchestratorError)
    assert ConnectorUnavailable("x").retryable is True
    assert ConnectorTimeout("x").retryable is True
    assert isinstance(ConnectorTimeout("x"), ConnectorUnavailable)
    assert ConnectorRejected("x").retryable is False
    assert ConnectorError("x", retryable=True).retryable is True
    err = ConnectorConfigError("connectors.a.b: bad", connector="a")
    assert isinstance(err, ConfigError)
    assert isinstance(err, ConnectorError)
    assert err.connector == "a"
    assert err.retryable is False


# -- registry --------------------------------------------------------------------------


def test_builtin_kinds_are_available_and_listed() -> None:
    factories = available()
    assert set(factories) >= BUILTIN_KINDS
    infos = {info.kind: info for info in kinds()}
    http = infos["http"]
    assert http.origin == "built-in"
    assert not http.error
    assert {"base_url", "bearer_token_file", "max_attempts"} <= set(http.options)
    assert http.summary


def test_describe_lists_kinds_and_validates_each_section(tmp_path: Path) -> None:
    listing = connectors.describe(
        {
            "hooks": {"kind": "http", "base_url": "http://x"},
            "bad": {"kind": "http", "base_url": "http://x", "retries": 1},
            "odd": {"kind": "nope"},
        },
        base_dir=tmp_path,
    )
    assert {k.kind for k in listing.kinds} >= BUILTIN_KINDS
    by_name = {c.name: c for c in listing.configured}
    assert by_name["hooks"] == connectors.Configured(name="hooks", kind="http")
    assert by_name["bad"].error.startswith("connectors.bad.retries: unknown option")
    assert "unknown connector kind 'nope'" in by_name["odd"].error
    assert not listing.ok
    assert msgspec.json.decode(msgspec.json.encode(listing))["configured"][0]["name"] == "hooks"


def test_unknown_kind_is_named_with_the_choices() -> None:
    with pytest.raises(ConnectorConfigError) as info:
        create("warehouse", {"kind": "postgress", "dsn": "postgresql://x"})
    msg = str(info.value)
    assert msg.startswith("connectors.warehouse.kind: unknown connector kind 'postgress'")
    assert "postgres" in msg
    assert "orchestrator.connectors" in msg


def test_missing_kind_is_named() -> None:
    with pytest.raises(ConnectorConfigError, match=r"^connectors\.w\.kind: required; one of: "):
        create("w", {"dsn": "postgresql://x"})


def test_unknown_option_key_is_named() -> None:
    with pytest.raises(ConnectorConfigError) as info:
        create("hooks", {"kind": "http", "base_url": "http://127.0.0.1", "retries": 3})
    msg = str(info.value)
    assert msg.startswith("connectors.hooks.retries: unknown option")
    assert "max_attempts" in msg  # the known options are listed


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "http"}, r"^connectors\.h\.base_url: required option is missing$"),
        (
            {"kind": "http", "base_url": "ftp://x"},
            r"^connectors\.h\.base_url: expected `str` matching regex",
        ),
        (
            {"kind": "http", "base_url": "http://x", "max_attempts": 0},
            r"^connectors\.h\.max_attempts: expected `int` >= 1$",
        ),
        (
            {"kind": "http", "base_url": "http://x", "headers": {"X-A": 1}},
            r"^connectors\.h\.headers\.<key>: expected `str`, got `int`$",
        ),
        (
            {"kind": "postgres", "pool_min": 5, "pool_max": 2},
            r"^connectors\.h: pool_min \(5\) exceeds pool_max \(2\)",
        ),
        (
            {"kind": "file_watcher", "dir": ".", "dataset": "d", "partition_regex": "("},
            r"^connectors\.h\.partition_regex: not a valid regex",
        ),
    ],
)
def test_invalid_options_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConnectorConfigError, match=message):
        create("h", section)


def test_env_style_string_values_are_converted() -> None:
    sink = create("h", {"kind": "http", "base_url": "http://x", "max_attempts": "2"})
    assert isinstance(sink, connectors.http.HttpSink)
    assert sink.options.max_attempts == 2


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    made = create_all(
        {
            "out": {"kind": "files", "root": "data"},
            "hooks": {"kind": "http", "base_url": "http://x", "bearer_token_file": "tok"},
            "abs": {"kind": "files", "root": str(tmp_path / "elsewhere")},
        },
        base_dir=tmp_path,
    )
    out, hooks, absolute = made["out"], made["hooks"], made["abs"]
    assert isinstance(out, connectors.files.FilesSink)
    assert out.options.root == str(tmp_path / "data")
    assert isinstance(hooks, connectors.http.HttpSink)
    assert hooks.options.bearer_token_file == str(tmp_path / "tok")
    assert isinstance(absolute, connectors.files.FilesSink)
    assert absolute.options.root == str(tmp_path / "elsewhere")


def test_secrets_never_show_in_repr() -> None:
    sink = create(
        "hooks",
        {"kind": "http", "base_url": "http://x", "bearer_token": "s3cr3t", "headers": {"K": "v"}},
    )
    assert isinstance(sink, connectors.http.HttpSink)
    assert "s3cr3t" not in repr(sink)
    assert "s3cr3t" not in repr(sink.options)
    assert "bearer_token='***'" in repr(sink.options)
    pg = create("wh", {"kind": "postgres", "dsn": "postgresql://u:pw@h/db"})
    assert "pw" not in repr(pg)
    assert "pw" not in repr(getattr(pg, "options", ""))


# -- lifecycle -------------------------------------------------------------------------


class Recording(Connector):
    kind = "recording"

    def __init__(self, name: str, journal: list[str], behaviour: str = "") -> None:
        super().__init__(name)
        self.journal = journal
        self.behaviour = behaviour

    async def _open(self) -> None:
        if self.behaviour == "fail-open":
            raise ConnectorUnavailable(f"{self.name} is down", connector=self.name)
        self.journal.append(f"open {self.name}")

    async def _close(self) -> None:
        self.journal.append(f"close {self.name}")
        if self.behaviour == "fail-close":
            raise RuntimeError(f"{self.name} broke while closing")
        if self.behaviour == "hang-close":
            await anyio.sleep_forever()


class RecordingFactory:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal

    def create(self, name: str, options: Mapping[str, Any]) -> Recording:
        unknown = set(options) - {"behaviour"}
        if unknown:
            raise ConnectorConfigError(f"connectors.{name}.{unknown.pop()}: unknown option")
        return Recording(name, self.journal, options.get("behaviour", ""))


@pytest.fixture
def journal() -> list[str]:
    return []


@pytest.fixture
def factories(journal: list[str]) -> dict[str, Any]:
    return {"rec": RecordingFactory(journal)}


async def test_open_all_opens_in_order_and_closes_in_reverse(
    journal: list[str], factories: dict[str, Any]
) -> None:
    config = {"a": {"kind": "rec"}, "b": {"kind": "rec"}, "c": {"kind": "rec"}}
    async with open_all(config, factories=factories) as opened:
        assert list(opened) == ["a", "b", "c"]
        assert all(c.state == "open" for c in opened.values())
        assert isinstance(opened["a"], Sink)
        journal.append("body")
    assert journal == ["open a", "open b", "open c", "body", "close c", "close b", "close a"]
    assert all(c.state == "closed" for c in opened.values())


async def test_close_errors_and_overruns_are_logged_not_raised(
    journal: list[str], factories: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "a": {"kind": "rec"},
        "b": {"kind": "rec", "behaviour": "fail-close"},
        "c": {"kind": "rec", "behaviour": "hang-close"},
    }
    caplog.set_level(logging.INFO, logger="connectors")
    with anyio.fail_after(5):
        async with open_all(config, factories=factories, close_timeout=0.2):
            pass
    assert journal[-3:] == ["close c", "close b", "close a"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'c'" in m and "did not close within 0.2s" in m for m in messages)
    assert any("'b'" in m and "failed to close" in m for m in messages)
    assert any("'a'" in m and m.endswith("closed") for m in messages)


async def test_a_failed_open_closes_those_already_open(
    journal: list[str], factories: dict[str, Any]
) -> None:
    config = {
        "a": {"kind": "rec"},
        "b": {"kind": "rec"},
        "c": {"kind": "rec", "behaviour": "fail-open"},
        "d": {"kind": "rec"},
    }
    with pytest.raises(ConnectorUnavailable, match="c is down"):
        async with open_all(config, factories=factories):
            pytest.fail("the body must not run")
    assert journal == ["open a", "open b", "close b", "close a"]


async def test_every_section_is_validated_before_anything_opens(
    journal: list[str], factories: dict[str, Any]
) -> None:
    config = {"a": {"kind": "rec"}, "b": {"kind": "rec", "typo": 1}}
    with pytest.raises(ConnectorConfigError, match=r"connectors\.b\.typo"):
        async with open_all(config, factories=factories):
            pytest.fail("the body must not run")
    assert journal == []


async def test_connectors_close_when_the_body_is_cancelled(
    journal: list[str], factories: dict[str, Any]
) -> None:
    with anyio.move_on_after(5) as scope:
        async with open_all({"a": {"kind": "rec"}, "b": {"kind": "rec"}}, factories=factories):
            scope.cancel()
            await anyio.sleep_forever()
    assert journal == ["open a", "open b", "close b", "close a"]


async def test_a_connector_is_opened_once_and_used_only_while_open(journal: list[str]) -> None:
    sink = create("out", {"kind": "http", "base_url": "http://127.0.0.1:9"})
    assert isinstance(sink, connectors.http.HttpSink)
    with pytest.raises(ConnectorError, match="is not open: use it inside `async with`"):
        await sink.post("/x", json={}, idempotency_key=None)
    async with sink:
        pass
    with pytest.raises(ConnectorError, match="it was closed"):
        await sink.post("/x", json={}, idempotency_key=None)
    with pytest.raises(ConnectorError, match="is opened once"):
        async with sink:
            pass


# -- plugins ---------------------------------------------------------------------------


def _install_dist_info(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """What ``pip install`` leaves behind for importlib.metadata: a ``*.dist-info`` folder."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[orchestrator.connectors]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_site(tmp_path: Path) -> Iterator[Path]:
    """The fixture plugin installed into a throwaway site directory on ``sys.path``.

    Its entry points are read from the fixture's own pyproject.toml, so the test checks
    the declaration a real install would register. (``pip install --no-build-isolation``
    would need the ``wheel`` package with this setuptools, and network access otherwise.)
    """
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site-packages"
    site.mkdir()
    shutil.copy(PLUGIN_DIR / "orch_echo_plugin.py", site)
    _install_dist_info(
        site,
        project["name"],
        project["version"],
        project["entry-points"]["orchestrator.connectors"],
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("orch_echo_plugin", None)
        importlib.invalidate_caches()


async def test_a_plugin_kind_is_discovered_and_works_from_a_step(plugin_site: Path) -> None:
    assert "echo" in available()
    info = {i.kind: i for i in kinds()}["echo"]
    assert info.origin == "orch-echo-plugin 0.1.0"
    assert info.target == "orch_echo_plugin:EchoFactory"
    assert info.options == ("prefix", "max_messages")
    assert not info.error

    async def notify(ctx: StepContext) -> str:
        sent: str = await ctx.connectors["shout"].send(f"run {ctx.run_id} done")
        return sent

    config = {"shout": {"kind": "echo", "prefix": "> ", "max_messages": 1}}
    async with open_all(config) as opened:
        ctx = StepContext.create(run_id=7, pipeline="p", step="notify", connectors=opened)
        assert await notify(ctx) == "> run 7 done"
        with pytest.raises(ConnectorRejected, match="more than 1 messages"):
            await notify(ctx)
    with pytest.raises(ConnectorConfigError, match=r"connectors\.shout\.volume: unknown option"):
        create("shout", {"kind": "echo", "volume": 11})


def test_plugin_kinds_vanish_when_uninstalled(plugin_site: Path) -> None:
    assert "echo" in available()
    sys.path.remove(str(plugin_site))
    try:
        assert "echo" not in available()
    finally:
        sys.path.insert(0, str(plugin_site))


def test_a_plugin_cannot_replace_a_builtin_or_break_the_others(
    tmp_path: Path, plugin_site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "bad-site"
    _install_dist_info(
        site,
        "orch-bad-plugin",
        "1.0",
        {"http": "orch_echo_plugin:EchoFactory", "broken": "orch_missing_module:Factory"},
    )
    sys.path.insert(0, str(site))
    try:
        factories = available()
        assert isinstance(factories["http"], connectors.http.HttpFactory)
        assert "broken" not in factories
        assert "echo" in factories
        infos = {i.kind: i for i in kinds()}
        assert "orch_missing_module" in infos["broken"].error
        assert any("it is a built-in kind" in r.getMessage() for r in caplog.records)
        with pytest.raises(ConnectorConfigError, match=r"connectors\.x\.kind: .*cannot be loaded"):
            create("x", {"kind": "broken"})
    finally:
        sys.path.remove(str(site))


def test_source_protocol_is_structural() -> None:
    options = connectors.files.FileWatcherOptions(dir=".", dataset="d")
    watcher = connectors.files.FileWatcherSource("w", options)  # no watchfiles needed
    assert isinstance(watcher, Source)
    sink = create("f", {"kind": "files", "root": "."})
    assert isinstance(sink, Sink)
    assert not isinstance(sink, Source)


@pytest.mark.parametrize(
    "options_type",
    [
        connectors.http.HttpOptions,
        connectors.postgres.PostgresOptions,
        connectors.files.FilesOptions,
        connectors.files.FileWatcherOptions,
    ],
)
def test_every_builtin_option_is_documented(options_type: type[Any]) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "connectors.md").read_text()
    for f in msgspec.structs.fields(options_type):
        assert f"| `{f.name}` |" in doc, f"{options_type.__name__}.{f.name} is not in the docs"
