"""Security settings reach the clients, and secrets are redacted where they could leak."""

from __future__ import annotations

import ssl
from pathlib import Path

from orchestrator.config import load
from orchestrator.kafka import client_options
from orchestrator.store import redact_dsn
from orchestrator.store.connection import _ssl_context


def test_sasl_ssl_options_with_password_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_username = "orch"\nsasl_password_file = "pw"\n'
    )
    opts = client_options(load(cfg, env={}))
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "orch"
    assert opts["sasl_plain_password"] == "s3cret"
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode is ssl.CERT_REQUIRED


def test_plaintext_has_no_security_options() -> None:
    opts = client_options(load(None, env={}))
    assert opts["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in opts
    assert "sasl_plain_password" not in opts


def test_env_password_overrides_file_free_config() -> None:
    s = load(
        None,
        env={
            "ORCH_KAFKA__SASL_PASSWORD": "from-env",
            "ORCH_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        },
    )
    assert client_options(s)["sasl_plain_password"] == "from-env"


def test_postgres_tls_modes() -> None:
    assert _ssl_context("", "") is None
    assert _ssl_context("require", "") == "require"
    ctx = _ssl_context("verify-full", "")
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname is True
    ca_only = _ssl_context("verify-ca", "")
    assert isinstance(ca_only, ssl.SSLContext)
    assert ca_only.check_hostname is False


def test_dsn_password_is_redacted() -> None:
    assert redact_dsn("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
