"""Typed, frozen daemon configuration: one TOML file, overridden by ``ORCH_*`` variables.

Environment overrides use ``__`` between section and key:
``ORCH_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` sets ``[kafka] bootstrap_servers``. Values are
read as TOML literals when they parse as one (``5``, ``true``, ``["a", "b"]``), otherwise as
plain strings; a comma-separated string is accepted for list-valued keys.

Secrets are never required in the file: every secret has a ``*_file`` twin naming a file to
read it from, and the ``ORCH_*`` variables work for secrets too.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from orchestrator.errors import ConfigError

__all__ = [
    "ContractSettings",
    "HealthSettings",
    "KafkaSettings",
    "PipelineSettings",
    "PostgresSettings",
    "RulesSettings",
    "RunnerSettings",
    "Settings",
    "TelemetrySettings",
    "load",
]

ENV_PREFIX = "ORCH_"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class KafkaSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers."""
    topics: tuple[str, ...] = ("arrivals",)
    """Topics the daemon consumes arrival events from."""
    group_id: str = "orchestrator"
    """Consumer group shared by every daemon replica."""
    client_id: str = "orchestrator"
    """Client id reported to the brokers (shows up in broker logs and quotas)."""
    max_batch: int = 500
    """Most records taken by one ``getmany`` and written in one Postgres transaction."""
    fetch_timeout_ms: int = 1000
    """How long one ``getmany`` waits when no record is available (the idle tick)."""
    fetch_max_wait_ms: int = 10
    """Longest a fetch waits at the broker for data. Low values keep the arrival-to-step
    latency in milliseconds on brokers that answer a fetch only when it expires."""
    commit_interval_ms: int = 100
    """Offsets of durable batches are committed at most this often (and when idle or
    stopping); a crash then redelivers at most this much, which the store deduplicates."""
    max_record_bytes: int = 1_048_576
    """Records larger than this are dead-lettered without decoding."""
    publish_topic: str = "arrivals"
    """Default topic for ``orchestrator publish`` and for events emitted by steps."""
    dead_letter_topic: str = ""
    """If set, dead letters are also copied to this topic (the table is always written)."""
    create_topics: bool = True
    """Create missing ``topics`` (and ``publish_topic``) at start-up."""
    topic_partitions: int = 3
    """Partitions of topics the daemon creates; they bound how many daemons share intake."""
    topic_replication: int = 1
    """Replication factor of topics the daemon creates (3 on a production cluster)."""
    enable_idempotence: bool = False
    """Idempotent producer. Turn on for Apache Kafka, Redpanda, MSK and Confluent."""
    session_timeout_ms: int = 10_000
    """A member silent this long leaves the group and its partitions move to others."""
    heartbeat_interval_ms: int = 3_000
    """Consumer-group heartbeat interval (a third of the session timeout or less)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How clients talk to the brokers: TLS, SASL, both or neither."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """SASL mechanism when ``security_protocol`` is ``SASL_*``."""
    sasl_username: str = ""
    sasl_password: str = ""
    """Prefer ``sasl_password_file`` or ``ORCH_KAFKA__SASL_PASSWORD``; never logged."""
    sasl_password_file: str = ""
    """File holding the SASL password (e.g. a mounted Kubernetes Secret)."""
    ssl_cafile: str = ""
    """CA bundle to verify the brokers' certificates (default: the system's)."""
    ssl_certfile: str = ""
    """Client certificate for mutual TLS."""
    ssl_keyfile: str = ""
    """Private key of ``ssl_certfile``."""


class PostgresSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/orchestrator"
    """libpq-style DSN. Prefer ``dsn_file`` or ``ORCH_POSTGRES__DSN`` for one with a password."""
    dsn_file: str = ""
    """File holding the DSN (e.g. a mounted Kubernetes Secret); wins over ``dsn``."""
    schema: str = "public"
    """Schema holding the orchestrator's tables (one per environment or test)."""
    pool_min: int = 2
    """Connections the pool keeps open."""
    pool_max: int = 10
    """Most connections one daemon opens (plus two for LISTEN)."""
    migrate_on_start: bool = False
    """Apply pending migrations when ``orchestrator run`` starts."""
    sslmode: str = ""
    """``disable``, ``require``, ``verify-ca`` or ``verify-full``; empty keeps the DSN's."""
    sslrootcert: str = ""
    """CA file used with ``sslmode = "verify-ca"`` or ``"verify-full"``."""


class RulesSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    files: tuple[str, ...] = ()
    """Rule files (TOML), relative to the config file's directory."""


class PipelineSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    modules: tuple[str, ...] = ()
    """Python modules whose module-level ``Pipeline`` objects are loaded."""
    paths: tuple[str, ...] = ()
    """Directories added to ``sys.path`` before importing, relative to the config file."""


class RunnerSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_concurrent_runs: int = 64
    """Runs one daemon executes at once."""
    queue_depth: int = 1000
    """Runs held by a daemon and waiting for a free worker; above it the intake fetches
    nothing more (the backlog stays in Kafka) and nothing more is claimed."""
    lease_seconds: float = 30.0
    """A claimed run's lease; renewed every third of it, taken over by others when expired."""
    default_step_timeout: float = 300.0
    """Seconds a step without its own ``timeout`` may run before it fails."""
    default_retries: int = 0
    """Retries of steps that declare no retry policy (0: one attempt)."""
    shutdown_grace_seconds: float = 30.0
    """On SIGTERM, in-flight steps get this long to finish before they are cancelled."""


class TelemetrySettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    service_name: str = "orchestrator"
    """OTel ``service.name`` of the daemon's spans and metrics."""
    otlp_endpoint: str = ""
    """OTLP/HTTP endpoint (``http://collector:4318``). Empty: use ``OTEL_EXPORTER_OTLP_*``
    variables if set, otherwise export nothing."""
    log_level: str = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``."""
    log_format: Literal["text", "json"] = "text"
    """``json`` writes one JSON object per line, with run and step ids as fields."""


class HealthSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    """Address the health endpoint binds (``0.0.0.0`` in a container)."""
    port: int = 0
    """HTTP port for ``/livez`` and ``/readyz``; 0 disables the endpoint."""


class ContractSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The data contract of one dataset (``[contracts."<dataset>"]``)."""

    required: tuple[str, ...] = ()
    """Payload fields that must be present: ``partition``, ``uri``, ``rows``, ``bytes``,
    ``schema``."""
    partition_pattern: str = ""
    """Regular expression the whole ``partition`` must match (e.g. ``\\d{4}-\\d{2}-\\d{2}``)."""
    min_rows: int | None = None
    """Smallest acceptable ``rows`` (a missing ``rows`` then breaks the contract)."""
    max_bytes: int | None = None
    """Largest acceptable ``bytes``."""
    attributes: dict[str, str] = {}
    """Attributes that must be present, with their type: ``str``, ``int``, ``float``, ``bool``."""
    allow_extra_attributes: bool = True
    """False: attributes not listed in ``attributes`` break the contract."""


class Settings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    rules: RulesSettings = msgspec.field(default_factory=RulesSettings)
    pipelines: PipelineSettings = msgspec.field(default_factory=PipelineSettings)
    runner: RunnerSettings = msgspec.field(default_factory=RunnerSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    contracts: dict[str, ContractSettings] = msgspec.field(default_factory=dict)
    """Data contracts by dataset (see docs/configuration.md, "Data contracts")."""
    connectors: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Connectors by name: ``[connectors.<name>]`` tables holding ``kind`` and that kind's
    options, validated by the ``connectors`` package (see docs/connectors.md).
    ``ORCH_CONNECTORS__<NAME>__<KEY>`` overrides one option."""
    base_dir: str = "."
    """Directory relative paths are resolved against (the config file's directory)."""

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def postgres_dsn(self) -> str:
        """The DSN, read from ``dsn_file`` when one is named."""
        if self.postgres.dsn_file:
            return _read_secret(self.resolve(self.postgres.dsn_file), "postgres.dsn_file")
        return self.postgres.dsn

    def sasl_password(self) -> str:
        if self.kafka.sasl_password_file:
            return _read_secret(
                self.resolve(self.kafka.sasl_password_file), "kafka.sasl_password_file"
            )
        return self.kafka.sasl_password


def _read_secret(path: Path, key: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from None


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(doc: dict[str, Any], env: Mapping[str, str]) -> None:
    sections = {f.name for f in msgspec.structs.fields(Settings)}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if "__" not in rest:
            # ORCH_CONFIG and friends are read by the CLI; catch ORCH_KAFKA_TOPICS-style typos.
            for section in sections:
                if rest.startswith(section + "_"):
                    fixed = f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :].upper()}"
                    raise ConfigError(
                        f"{name}: did you mean {fixed}? (section and key are "
                        "separated by a double underscore)"
                    )
            continue
        section, key = rest.split("__", 1)
        if section not in sections:
            raise ConfigError(f"{name}: unknown config section {section!r}")
        target = doc.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{name}: {section!r} is not a section")
        if section == "connectors":
            connector, sep, option = key.partition("__")
            if not (connector and sep and option):
                raise ConfigError(f"{name}: expected ORCH_CONNECTORS__<NAME>__<KEY>")
            table = target.setdefault(connector, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: connectors.{connector} is not a table")
            table[option] = _env_value(raw)
            continue
        value = _env_value(raw)
        field_type = _field_type(section, key)
        if field_type is tuple and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        target[key] = value


def _field_type(section: str, key: str) -> type | None:
    for f in msgspec.structs.fields(Settings):
        if f.name == section and isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            for sub in msgspec.structs.fields(f.type):
                if sub.name == key:
                    origin = getattr(sub.type, "__origin__", None)
                    return tuple if origin is tuple else None
    return None


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (optional) and ``ORCH_*`` variables in ``env``."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        base = p.resolve().parent
    doc.setdefault("base_dir", str(base))
    _apply_env(doc, env)
    try:
        return msgspec.convert(doc, Settings, strict=False)
    except msgspec.ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{_explain(exc)}") from None


def _explain(exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    # msgspec says "Object contains unknown field `x` - at `$.kafka`"; make the key explicit.
    if "unknown field" in msg:
        field = msg.split("`")[1] if "`" in msg else "?"
        at = msg.rsplit("at `$", 1)[-1].rstrip("`") if "at `$" in msg else ""
        key = f"{at.lstrip('.')}.{field}" if at else field
        return f"unknown config key {key!r}"
    return msg.replace("`$.", "`")
