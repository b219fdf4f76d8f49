"""Config parsing: defaults, env overrides, unknown keys, secrets from files, docs coverage."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from orchestrator.config import Settings, load
from orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_file_or_env() -> None:
    s = load(None, env={})
    assert s.kafka.topics == ("arrivals",)
    assert s.health.host == "127.0.0.1"
    assert s.runner.shutdown_grace_seconds == 30.0


def test_file_values_and_env_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ntopics = ["a"]\nmax_batch = 10\n[runner]\nlease_seconds = 9\n')
    s = load(
        cfg,
        env={
            "ORCH_KAFKA__MAX_BATCH": "20",
            "ORCH_KAFKA__TOPICS": "x, y",
            "ORCH_RUNNER__SHUTDOWN_GRACE_SECONDS": "2.5",
            "ORCH_KAFKA__ENABLE_IDEMPOTENCE": "true",
            "ORCH_CONFIG": "ignored.toml",
            "UNRELATED": "1",
        },
    )
    assert s.kafka.max_batch == 20
    assert s.kafka.topics == ("x", "y")
    assert s.kafka.enable_idempotence is True
    assert s.runner.lease_seconds == 9
    assert s.runner.shutdown_grace_seconds == 2.5
    assert s.resolve("rules.toml") == tmp_path / "rules.toml"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[kafka]\nbootstrap_server = "x"\n', {}, "unknown config key 'kafka.bootstrap_server'"),
        ("[kafkaa]\n", {}, "unknown config key 'kafkaa'"),
        ("", {"ORCH_NOPE__X": "1"}, "ORCH_NOPE__X: unknown config section 'nope'"),
        ("", {"ORCH_KAFKA__NOPE": "1"}, "unknown config key 'kafka.nope'"),
        ("", {"ORCH_HEALTH_PORT": "1"}, "ORCH_HEALTH_PORT: did you mean ORCH_HEALTH__PORT?"),
        ('[runner]\nlease_seconds = "long"\n', {}, "runner.lease_seconds"),
        ("[kafka\n", {}, "not valid TOML"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(cfg, env=env)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "absent.toml", env={})


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgresql://u:pw@h/db\n")
    (tmp_path / "sasl").write_text("hunter2\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[postgres]\ndsn_file = "dsn"\n[kafka]\nsasl_password_file = "sasl"\n')
    s = load(cfg, env={})
    assert s.postgres_dsn() == "postgresql://u:pw@h/db"
    assert s.sasl_password() == "hunter2"
    broken = msgspec.structs.replace(
        s, postgres=msgspec.structs.replace(s.postgres, dsn_file="absent")
    )
    with pytest.raises(ConfigError, match=r"postgres\.dsn_file: cannot read secret file"):
        broken.postgres_dsn()


def test_every_config_key_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for section in msgspec.structs.fields(Settings):
        if not (isinstance(section.type, type) and issubclass(section.type, msgspec.Struct)):
            continue
        if f"## [{section.name}]" not in doc:
            missing.append(section.name)
        missing += [
            f"{section.name}.{key.name}"
            for key in msgspec.structs.fields(section.type)
            if f"| `{key.name}` |" not in doc
        ]
    assert not missing, f"docs/configuration.md lacks {missing}"
