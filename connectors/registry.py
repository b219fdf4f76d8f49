"""Which connector kinds exist, building connectors from config, and opening them together.

Kinds come from two places: the built-ins below, and installed distributions that declare
an entry point in the group ``orchestrator.connectors``::

    [project.entry-points."orchestrator.connectors"]
    echo = "orch_echo_plugin:EchoFactory"

The entry point's name is the kind; its object is a :class:`~connectors.base.ConnectorFactory`
or a class whose no-argument instance is one. A plugin cannot replace a built-in kind.

Config shape (one table per connector, ``kind`` plus that kind's options)::

    [connectors.warehouse]
    kind = "postgres"
    dsn_file = "/run/secrets/warehouse-dsn"
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec

from connectors.base import Connector, ConnectorConfigError, ConnectorFactory

__all__ = [
    "ENTRY_POINT_GROUP",
    "Configured",
    "KindInfo",
    "Listing",
    "available",
    "create",
    "create_all",
    "describe",
    "kinds",
    "open_all",
]

log = logging.getLogger("connectors")

ENTRY_POINT_GROUP = "orchestrator.connectors"
"""Entry-point group plugins register their connector kinds in."""

_BUILTINS: dict[str, str] = {
    "files": "connectors.files:FilesFactory",
    "file_watcher": "connectors.files:FileWatcherFactory",
    "http": "connectors.http:HttpFactory",
    "postgres": "connectors.postgres:PostgresFactory",
}


class KindInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One connector kind as ``orchestrator connectors list`` shows it."""

    kind: str
    origin: str
    """``built-in`` or ``<distribution> <version>`` of the plugin."""
    target: str
    """``module:attribute`` of the factory."""
    options: tuple[str, ...] = ()
    """Option names, when the factory declares ``options_type``."""
    summary: str = ""
    """First line of the factory's docstring."""
    error: str = ""
    """Why the factory could not be loaded (empty when it loaded)."""


class Configured(msgspec.Struct, frozen=True, kw_only=True):
    """One ``[connectors.<name>]`` section as ``orchestrator connectors list`` shows it."""

    name: str
    kind: str
    error: str = ""
    """Why the section is invalid (empty when it is valid)."""


class Listing(msgspec.Struct, frozen=True, kw_only=True):
    """What ``orchestrator connectors list`` prints: installed kinds, configured connectors."""

    kinds: list[KindInfo]
    configured: list[Configured]

    @property
    def ok(self) -> bool:
        return not any(c.error for c in self.configured)


def _load_target(target: str) -> ConnectorFactory:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return _as_factory(obj, target)


def _as_factory(obj: Any, target: str) -> ConnectorFactory:
    factory = obj() if isinstance(obj, type) else obj
    if not callable(getattr(factory, "create", None)):
        raise TypeError(f"{target} has no create(name, options) method")
    return factory  # type: ignore[no-any-return]


def _discover() -> dict[str, tuple[str, str, Any]]:
    """kind -> (origin, target, loader), built-ins first; plugins never shadow them."""
    found: dict[str, tuple[str, str, Any]] = {
        kind: ("built-in", target, target) for kind, target in _BUILTINS.items()
    }
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        origin = f"{dist.name} {dist.version}" if dist is not None else "plugin"
        if ep.name in found:
            if found[ep.name][0] == "built-in":
                log.warning(
                    "ignoring plugin connector kind %r from %s: it is a built-in kind",
                    ep.name,
                    origin,
                )
            continue  # the first distribution on sys.path wins, as for imports
        found[ep.name] = (origin, ep.value, ep)
    return found


def _load(kind: str, loader: Any) -> ConnectorFactory:
    if isinstance(loader, str):
        return _load_target(loader)
    return _as_factory(loader.load(), loader.value)


def available() -> dict[str, ConnectorFactory]:
    """Every loadable connector kind and its factory, by kind.

    A plugin that fails to import is logged and left out (``kinds()`` shows why).
    """
    factories: dict[str, ConnectorFactory] = {}
    for kind, (origin, target, loader) in _discover().items():
        try:
            factories[kind] = _load(kind, loader)
        except Exception as exc:
            log.warning(
                "connector kind %r (%s, %s) cannot be loaded: %r", kind, origin, target, exc
            )
    return factories


def kinds() -> list[KindInfo]:
    """Every discovered kind, loadable or not, sorted by kind."""
    infos = []
    for kind, (origin, target, loader) in sorted(_discover().items()):
        try:
            factory = _load(kind, loader)
        except Exception as exc:
            infos.append(KindInfo(kind=kind, origin=origin, target=target, error=repr(exc)))
            continue
        options_type = getattr(factory, "options_type", None)
        names: tuple[str, ...] = ()
        if isinstance(options_type, type) and issubclass(options_type, msgspec.Struct):
            names = tuple(f.name for f in msgspec.structs.fields(options_type))
        doc = (type(factory).__doc__ or "").strip().splitlines()
        infos.append(
            KindInfo(
                kind=kind,
                origin=origin,
                target=target,
                options=names,
                summary=doc[0] if doc else "",
            )
        )
    return infos


def _resolve_paths(
    options: dict[str, Any], factory: ConnectorFactory, base_dir: Path | None
) -> None:
    if base_dir is None:
        return
    path_options = set(getattr(factory, "path_options", frozenset()))
    for key, value in options.items():
        if (key.endswith("_file") or key in path_options) and isinstance(value, str) and value:
            path = Path(value).expanduser()
            options[key] = str(path if path.is_absolute() else base_dir / path)


def create(
    name: str,
    section: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    factories: Mapping[str, ConnectorFactory] | None = None,
) -> Connector:
    """Build (without opening) the connector configured by ``[connectors.<name>]``.

    ``section`` holds ``kind`` and the kind's options. Relative paths in ``*_file`` options
    (and the factory's ``path_options``) are resolved against ``base_dir``.
    """
    if not isinstance(section, Mapping):
        raise ConnectorConfigError(
            f"connectors.{name}: expected a table with `kind` and options,"
            f" got {type(section).__name__}",
            connector=name,
        )
    options = dict(section)
    kind = options.pop("kind", None)
    discovered = _discover() if factories is None else None
    known = sorted(factories if factories is not None else discovered or {})
    if not isinstance(kind, str) or not kind:
        raise ConnectorConfigError(
            f"connectors.{name}.kind: required; one of: {', '.join(known)}", connector=name
        )
    if factories is not None:
        factory = factories.get(kind)
    elif discovered is not None and kind in discovered:
        origin, target, loader = discovered[kind]
        try:
            factory = _load(kind, loader)
        except Exception as exc:
            raise ConnectorConfigError(
                f"connectors.{name}.kind: connector kind {kind!r} ({origin}, {target})"
                f" cannot be loaded: {exc!r}",
                connector=name,
            ) from exc
    else:
        factory = None
    if factory is None:
        raise ConnectorConfigError(
            f"connectors.{name}.kind: unknown connector kind {kind!r}; available: "
            f"{', '.join(known)} (plugins add kinds through the entry-point group"
            f" {ENTRY_POINT_GROUP!r})",
            connector=name,
        )
    _resolve_paths(options, factory, Path(base_dir) if base_dir is not None else None)
    connector = factory.create(name, options)
    if not (hasattr(connector, "__aenter__") and hasattr(connector, "__aexit__")):
        raise ConnectorConfigError(
            f"connectors.{name}: the {kind!r} factory returned {type(connector).__name__},"
            " which is not an async context manager",
            connector=name,
        )
    return connector


def create_all(
    config: Mapping[str, Mapping[str, Any]],
    *,
    base_dir: str | Path | None = None,
    factories: Mapping[str, ConnectorFactory] | None = None,
) -> dict[str, Connector]:
    """Build every configured connector without opening any: a config check with no I/O."""
    return {
        name: create(name, section, base_dir=base_dir, factories=factories)
        for name, section in config.items()
    }


def describe(
    config: Mapping[str, Mapping[str, Any]], *, base_dir: str | Path | None = None
) -> Listing:
    """Every installed kind, and every configured connector validated on its own (no I/O)."""
    configured = []
    for name, section in config.items():
        kind = section.get("kind", "") if isinstance(section, Mapping) else ""
        try:
            create(name, section, base_dir=base_dir)
        except ConnectorConfigError as exc:
            configured.append(Configured(name=name, kind=str(kind), error=str(exc)))
        else:
            configured.append(Configured(name=name, kind=str(kind)))
    return Listing(kinds=kinds(), configured=configured)


@contextlib.asynccontextmanager
async def open_all(
    config: Mapping[str, Mapping[str, Any]],
    *,
    base_dir: str | Path | None = None,
    close_timeout: float = 10.0,
    factories: Mapping[str, ConnectorFactory] | None = None,
) -> AsyncIterator[dict[str, Connector]]:
    """Open every configured connector, in config order; close them in reverse order.

    Every section is validated before any connector is opened, so a typo in the last one
    opens nothing. If opening one fails, those already open are closed and the error is
    raised. Closing is shielded from cancellation and bounded by ``close_timeout`` seconds
    per connector; a close that fails or overruns is logged, never raised.
    """
    connectors = create_all(config, base_dir=base_dir, factories=factories)
    opened: list[Connector] = []
    try:
        for connector in connectors.values():
            await connector.__aenter__()
            opened.append(connector)
            log.info("connector %r (%s) open", connector.name, _kind(connector))
        yield connectors
    finally:
        with anyio.CancelScope(shield=True):
            for connector in reversed(opened):
                await _close(connector, close_timeout)


async def _close(connector: Connector, seconds: float) -> None:
    name, kind = connector.name, _kind(connector)
    try:
        with anyio.move_on_after(seconds) as scope:
            await connector.__aexit__(None, None, None)
    except Exception:
        log.exception("connector %r (%s) failed to close; continuing", name, kind)
        return
    if scope.cancelled_caught:
        log.error("connector %r (%s) did not close within %.1fs; abandoned", name, kind, seconds)
    else:
        log.info("connector %r (%s) closed", name, kind)


def _kind(connector: Connector) -> str:
    return getattr(connector, "kind", "") or type(connector).__name__
