"""What every connector shares: the protocols, the base class, the errors and option parsing.

A connector is an async context manager: ``async with connector: ...`` opens its clients
or pools and closes them. Sinks deliver data to a system from step code
(``ctx.connectors["warehouse"]``); sources produce arrival events
(``async for event in source.events()``).

Errors::

    OrchestratorError                     (orchestrator.errors)
    └── ConnectorError                    any connector failure; ``retryable`` says what to do
        ├── ConnectorConfigError          bad options or kind; also a ConfigError
        ├── ConnectorUnavailable          unreachable, overloaded, 5xx/429 (retryable)
        │   └── ConnectorTimeout          no answer within the configured timeout
        └── ConnectorRejected             the system refused the data; retrying cannot help

A step that lets a ``ConnectorError`` escape is retried by its ``RetryPolicy`` only when the
error is retryable: retryability is the error's attribute, never a match on its message.

Factories (see :class:`ConnectorFactory`) build connectors from their config section without
I/O; the I/O happens when the connector is opened.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, Self, TypeVar, runtime_checkable

import msgspec

from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.events import CloudEvent

__all__ = [
    "Connector",
    "ConnectorConfigError",
    "ConnectorError",
    "ConnectorFactory",
    "ConnectorRejected",
    "ConnectorTimeout",
    "ConnectorUnavailable",
    "Options",
    "Sink",
    "Source",
    "parse_options",
    "read_secret",
    "redact_dsn",
]

# -- errors ----------------------------------------------------------------------------


class ConnectorError(OrchestratorError):
    """A connector failed. ``connector`` names it (the config section's name)."""

    retryable: bool = False

    def __init__(self, message: str, *, connector: str = "", retryable: bool | None = None) -> None:
        super().__init__(message)
        self.connector = connector
        if retryable is not None:
            self.retryable = retryable


class ConnectorConfigError(ConnectorError, ConfigError):
    """A connector's kind or options are invalid; the message names ``connectors.<name>.<key>``."""


class ConnectorUnavailable(ConnectorError):
    """The system is unreachable or asked to try later; a retry may succeed."""

    retryable = True


class ConnectorTimeout(ConnectorUnavailable):
    """The system did not answer within the configured timeout."""


class ConnectorRejected(ConnectorError):
    """The system refused the request or the data itself; retrying the same call cannot help."""

    retryable = False


# -- protocols and the base class ------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """Something steps deliver data to. Methods are the connector's own (``post``, ``execute``)."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


@runtime_checkable
class Source(Protocol):
    """Something that announces arrived data as CloudEvents."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...

    def events(self) -> AsyncIterator[CloudEvent]:
        """Arrival events, one per new or changed piece of data, until the source closes."""
        ...


State = Literal["new", "open", "closed"]


class Connector:
    """Base of the built-in connectors (and a convenient one for plugins).

    Subclasses override :meth:`_open` and :meth:`_close`. A connector is opened once:
    ``new → open → closed``; using it outside that window raises :class:`ConnectorError`.
    ``repr()`` shows the kind, name and state, never an option (options may hold secrets).
    """

    kind: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self._state: State = "new"

    @property
    def state(self) -> State:
        return self._state

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise ConnectorError(
                f"connector {self.name!r} is {self._state}; a connector is opened once,"
                " create a new one to open it again",
                connector=self.name,
            )
        try:
            await self._open()
        except BaseException:
            self._state = "closed"
            raise
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connector (idempotent)."""
        if self._state == "open":
            self._state = "closed"
            await self._close()
        self._state = "closed"

    async def _open(self) -> None:
        """Open clients, pools or files. Raise a :class:`ConnectorError` on failure."""

    async def _close(self) -> None:
        """Release what :meth:`_open` acquired."""

    def _check_open(self) -> None:
        if self._state != "open":
            hint = "use it inside `async with`" if self._state == "new" else "it was closed"
            raise ConnectorError(
                f"connector {self.name!r} ({self.kind}) is not open: {hint}",
                connector=self.name,
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} kind={self.kind!r} {self._state}>"


class ConnectorFactory(Protocol):
    """Builds connectors of one kind from their config section.

    ``create`` validates ``options`` (the section without ``kind``; relative paths already
    resolved against the config file's directory) and returns an unopened connector. It
    does no I/O: reading secret files and connecting happen when the connector is opened.

    Optional attributes the registry reads when present:

    * ``path_options: frozenset[str]``: options holding paths to resolve, besides the
      ``*_file`` ones (e.g. ``{"root"}``);
    * ``options_type: type[msgspec.Struct]``: the options struct, listed by
      ``orchestrator connectors list``.
    """

    def create(self, name: str, options: Mapping[str, Any]) -> Connector: ...


# -- options ---------------------------------------------------------------------------


class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of a connector's options. Fields named in ``secret_fields`` never show in repr."""

    secret_fields: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        shown = []
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            text = "'***'" if field.name in self.secret_fields and value else repr(value)
            shown.append(f"{field.name}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"


OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


def parse_options(name: str, options: Mapping[str, Any], type_: type[OptionsT]) -> OptionsT:
    """Validate ``options`` into ``type_``, or raise :class:`ConnectorConfigError` naming the key.

    Values are converted leniently (``"5"`` is accepted for an int) because environment
    overrides arrive as strings.
    """
    try:
        return msgspec.convert(dict(options), type_, strict=False)
    except msgspec.ValidationError as exc:
        raise ConnectorConfigError(_explain(name, str(exc), type_), connector=name) from None


def _explain(name: str, msg: str, type_: type[msgspec.Struct]) -> str:
    prefix = f"connectors.{name}"
    known = ", ".join(f.name for f in msgspec.structs.fields(type_))
    if msg.startswith("Object contains unknown field"):
        key = msg.split("`")[1]
        return f"{prefix}.{key}: unknown option (known options: {known})"
    if msg.startswith("Object missing required field"):
        key = msg.split("`")[1]
        return f"{prefix}.{key}: required option is missing"
    match = re.match(r"^(?P<what>.*) - at `\$\.?(?P<path>[^`]*)`$", msg)
    if match:
        path = match["path"].replace("[...]", ".<key>")
        return f"{prefix}.{path}: {match['what'][0].lower()}{match['what'][1:]}"
    return f"{prefix}: {msg}"


def read_secret(path: str, *, connector: str, key: str) -> str:
    """The stripped contents of a secret file, or a :class:`ConnectorConfigError` naming the key."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConnectorConfigError(
            f"connectors.{connector}.{key}: cannot read secret file {path}: {exc.strerror}",
            connector=connector,
        ) from None


def redact_dsn(dsn: str) -> str:
    """A DSN with any password replaced by ``***``, safe for logs and error messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
