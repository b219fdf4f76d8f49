"""deploy/systemd/orchestrator.service agrees with the CLI and the shutdown contract."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.config import Settings
from tests.unit.test_deploy import (
    DEPLOY,
    EXAMPLES,
    STOP_BOUNDS_SECONDS,
    load_settings,
    parse_cli,
    seconds,
)

UNIT = DEPLOY / "systemd" / "orchestrator.service"


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys kept (systemd allows them)."""
    section = ""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        key, sep, value = s.partition("=")
        assert sep, f"{UNIT.name}: not a directive: {s!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def _service() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for section, key, value in _directives(UNIT.read_text()):
        if section == "Service":
            found.setdefault(key, []).append(value)
    return found


def _one(key: str) -> str:
    values = _service().get(key, [])
    assert len(values) == 1, f"[Service] {key}: expected one value, found {values}"
    return values[0]


def _systemd_seconds(value: str) -> float:
    return seconds(value.replace("sec", "s"))


def test_unit_runs_the_daemon_with_the_config_file() -> None:
    assert _one("Type") == "exec"
    argv = shlex.split(_one("ExecStart"))
    assert argv[0].startswith("/"), "systemd needs an absolute path"
    args = parse_cli(argv)
    assert args.command == "run"
    assert args.config == "/etc/orchestrator/orchestrator.toml"


def test_unit_migrates_before_starting() -> None:
    (pre,) = _service()["ExecStartPre"]
    argv = shlex.split(pre.lstrip("-+!@:"))
    args = parse_cli(argv)
    assert (args.command, args.db_command) == ("db", "migrate")
    assert argv[0] == shlex.split(_one("ExecStart"))[0], "both use the same install"
    assert not pre.startswith("-"), "a failed migration must stop the start"


def test_unit_stops_with_sigterm_within_more_than_the_grace() -> None:
    assert _one("KillSignal") == "SIGTERM"
    assert _one("KillMode") in ("mixed", "control-group")
    timeout = _systemd_seconds(_one("TimeoutStopSec"))
    graces = {
        "the default": Settings().runner.shutdown_grace_seconds,
        "examples/orchestrator.toml": load_settings(
            {}, EXAMPLES / "orchestrator.toml", where="examples"
        ).runner.shutdown_grace_seconds,
    }
    for where, grace in graces.items():
        assert timeout > grace
        assert timeout >= grace + STOP_BOUNDS_SECONDS, (
            f"TimeoutStopSec {timeout} < runner.shutdown_grace_seconds {grace} ({where}) "
            f"+ {STOP_BOUNDS_SECONDS}"
        )


def test_unit_restarts_on_failure_and_reads_an_optional_env_file() -> None:
    assert _one("Restart") == "on-failure"
    assert _systemd_seconds(_one("RestartSec")) > 0
    assert _one("EnvironmentFile") == "-/etc/orchestrator/env"


def test_unit_is_hardened() -> None:
    service = _service()
    assert service.get("DynamicUser") == ["yes"] or service.get("User", ["root"]) != ["root"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert _one(key) == value, f"{key}={value}"
    assert _one("CapabilityBoundingSet") == "", "no capabilities are needed"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that the executables exist; stand in an existing one for the venv's.
    program = shlex.split(_one("ExecStart"))[0]
    stand_in = shutil.which("true")
    assert stand_in is not None
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(program, stand_in))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert not output, output
