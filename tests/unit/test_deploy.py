"""Deployment files agree with the software they deploy: the image, the compose stack, docs.

Every ``orchestrator`` command line is parsed by the real CLI parser, every ``ORCH_*`` variable
is loaded by the real config loader, and the timings, ports and paths that must line up
between files are compared. Nothing here needs a network or a Docker engine; the one check
that does (``docker compose config``) skips without one. Kubernetes manifests and the systemd
unit are checked in ``test_deploy_kubernetes.py`` and ``test_deploy_systemd.py``, which share
the helpers defined here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import pytest
import yaml

from orchestrator import config as config_mod
from orchestrator.cli import build_parser
from orchestrator.config import Settings
from orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"
COMPOSE = DEPLOY / "docker-compose.yml"

# Upper bounds the daemon's shutdown spends outside the drain grace (orchestrator/daemon.py):
# up to 30 s waiting for intake to stop, up to 10 s waiting for the scheduler to stop. A
# supervisor's kill timeout must cover runner.shutdown_grace_seconds plus these.
STOP_BOUNDS_SECONDS = 30 + 10

# ORCH_* variables the CLI reads itself rather than the config loader.
CLI_ENV = frozenset({"ORCH_CONFIG"})


# -- shared helpers -----------------------------------------------------------------------


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse a full ``orchestrator ...`` command line with the real parser."""
    assert argv, "empty command line"
    assert PurePosixPath(argv[0]).name == "orchestrator", f"not the orchestrator CLI: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"the orchestrator CLI rejects {argv[1:]} (exit {exc.code})") from None


def load_settings(env: Mapping[str, str], path: Path | None = None, *, where: str = "") -> Settings:
    """Load settings as the daemon would, failing with ``where`` named on any ConfigError."""
    try:
        return config_mod.load(path, env=dict(env))
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}")


def check_env_names(env: Mapping[str, str], where: str) -> None:
    """Each ``ORCH_*`` variable alone must load: the error then names the variable."""
    names = [n for n in env if n.startswith("ORCH_")]
    assert names, f"{where}: no ORCH_* variables to check"
    for name in names:
        # The loader skips ORCH_ names without "__" (the CLI reads ORCH_CONFIG), so a
        # single-underscore typo would be ignored silently: only ORCH_CONFIG may lack it.
        assert "__" in name or name in CLI_ENV, (
            f"{where}: {name} is neither a config key (ORCH_<SECTION>__<KEY>) "
            f"nor one of {sorted(CLI_ENV)}"
        )
        load_settings({name: env[name]}, where=f"{where}: {name}={env[name]!r}")


def seconds(span: str | int | float) -> float:
    """``90``, ``"90s"``, ``"1m30s"``, ``"1min 30s"`` → seconds (compose and systemd spans)."""
    if isinstance(span, int | float):
        return float(span)
    text = span.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|min|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, f"cannot read time span {span!r}"
    return sum(float(n) * units[u] for n, u in parts)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, cmd: str) -> list[str]:
        return [args for c, args in self.instructions if c == cmd]

    def last(self, cmd: str) -> str:
        found = self.all(cmd)
        assert found, f"stage {self.name!r} has no {cmd}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                out[key] = value
        return out


def _substitute(text: str, args: Mapping[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[Stage]:
    """Instructions per stage, continuation lines joined, ``ARG`` defaults substituted in
    ``FROM`` and ``COPY`` (``ENV`` keeps ``$PATH`` and friends as written)."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        cmd, _, rest = (buf + s).partition(" ")
        instructions.append((cmd.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for cmd, rest in instructions:
        if cmd == "ARG":
            name, _, default = rest.partition("=")
            if default or name not in args:
                args[name] = default
            continue
        if cmd == "FROM":
            words = _substitute(rest, args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
            continue
        assert stages, f"{cmd} before the first FROM"
        stages[-1].instructions.append((cmd, _substitute(rest, args) if cmd == "COPY" else rest))
    return stages


def runtime_stage() -> Stage:
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    """The variables the runtime image sets, as a container sees them."""
    return runtime_stage().env()


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON array) form: {args!r}"
    assert all(isinstance(v, str) for v in value)
    return value


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def orchestrator_services(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run the image built from deploy/Dockerfile."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def service_settings(svc: Mapping[str, Any], name: str) -> Settings:
    """Settings a compose service's container loads: its mounted config plus its env."""
    env = {**image_env(), **{k: str(v) for k, v in svc.get("environment", {}).items()}}
    config_path = PurePosixPath(env["ORCH_CONFIG"])
    host_dir = _mounted_host_dir(svc, str(config_path.parent))
    assert host_dir is not None, f"{name}: nothing is mounted at {config_path.parent}"
    return load_settings(env, host_dir / config_path.name, where=f"compose service {name}")


def _mounted_host_dir(svc: Mapping[str, Any], target: str) -> Path | None:
    for volume in svc.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (COMPOSE.parent / source).resolve()
    return None


# -- the checks can fail ------------------------------------------------------------------


def test_cli_check_rejects_a_flag_the_parser_does_not_know() -> None:
    assert parse_cli(["orchestrator", "run", "--migrate"]).migrate is True
    with pytest.raises(AssertionError, match="rejects"):
        parse_cli(["orchestrator", "run", "--drain-seconds", "30"])
    with pytest.raises(AssertionError, match="not the orchestrator CLI"):
        parse_cli(["python", "-m", "orchestrator", "run"])


@pytest.mark.parametrize(
    "name", ["ORCH_HEALTH__PROT", "ORCH_HELTH__PORT", "ORCH_POSTGRES__DSN_FLIE"]
)
def test_env_check_rejects_a_misspelt_variable(name: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=name):
        check_env_names({name: "1"}, "probe")


def test_env_check_rejects_a_single_underscore_the_loader_would_ignore() -> None:
    check_env_names({"ORCH_CONFIG": "/etc/orchestrator/orchestrator.toml"}, "probe")
    with pytest.raises(AssertionError, match="ORCH_HEALTH_PORT"):
        check_env_names({"ORCH_HEALTH_PORT": "8477"}, "probe")


def test_time_spans_are_read_like_compose_and_systemd() -> None:
    assert seconds("90") == seconds(90) == seconds("1m30s") == seconds("1min 30s") == 90.0
    with pytest.raises(AssertionError):
        seconds("ninety")


# -- every YAML file ----------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {
        "docker-compose.yml",
        "otel-collector.yaml",
        "kubernetes/kustomization.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/migrate-job.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/secret.example.yaml",
    } <= names
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_builds_in_a_builder_stage_and_ships_a_slim_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a multi-stage build"
    builder = next(s for s in stages if s.name == "builder")
    runtime = stages[-1]
    assert runtime.base == "python:3.11-slim"
    assert builder.base.startswith("python:3.11")
    runs = " && ".join(builder.all("RUN"))
    venv = re.search(r"python -m venv (\S+)", runs)
    assert venv, "the builder makes no venv"
    assert re.search(r"\bpip install \.(\s|$)", runs), "the builder does not `pip install .`"
    copied = [shlex.split(a) for a in runtime.all("COPY") if a.startswith("--from=builder")]
    assert [venv.group(1), venv.group(1)] in [c[1:] for c in copied], (
        "the runtime does not copy the builder's venv to the same path"
    )
    assert f"{venv.group(1)}/bin" in image_env()["PATH"]


def test_uvloop_is_a_core_dependency_the_image_checks_for() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("uvloop") for d in deps)
    builder = next(s for s in dockerfile_stages() if s.name == "builder")
    assert any("import uvloop" in r for r in builder.all("RUN"))


def test_dockerfile_runtime_runs_as_a_non_root_user() -> None:
    user = runtime_stage().last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user!r}: use a numeric uid so runAsNonRoot can verify it"
    assert int(uid) != 0
    assert user.split(":")[-1] != "0", "the primary group is root"


def test_dockerfile_entrypoint_is_the_cli_and_cmd_runs_the_daemon() -> None:
    runtime = runtime_stage()
    entrypoint = exec_form(runtime.last("ENTRYPOINT"))
    assert entrypoint == ["orchestrator"]
    cmd = exec_form(runtime.last("CMD"))
    assert parse_cli(entrypoint + cmd).command == "run"
    assert runtime.last("STOPSIGNAL") == "SIGTERM"


def test_dockerfile_healthcheck_is_the_cli_probe_on_a_reachable_port() -> None:
    runtime = runtime_stage()
    options, sep, command = runtime.last("HEALTHCHECK").partition(" CMD ")
    assert sep, "HEALTHCHECK has no CMD"
    argv = exec_form(command.strip())
    assert parse_cli(argv).command == "health"
    timeout = re.search(r"--timeout=(\S+)", options)
    assert timeout, "HEALTHCHECK has no --timeout"
    assert seconds(timeout.group(1)) > 5, "the probe itself waits up to 5 s"
    settings = load_settings(image_env(), where="Dockerfile ENV")
    assert settings.health.port == 8477
    assert settings.health.host == "0.0.0.0"
    assert str(settings.health.port) in runtime.last("EXPOSE").split()


def test_dockerfile_env_names_real_config_keys() -> None:
    env = image_env()
    check_env_names(env, "Dockerfile ENV")
    assert env["ORCH_CONFIG"] == "/etc/orchestrator/orchestrator.toml"


def _dockerignore_patterns() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [s.rstrip("/") for s in (ln.strip() for ln in lines) if s and not s.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> str | None:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled by this check"
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts):
                return pattern
        elif any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return pattern
    return None


def test_build_context_keeps_what_the_dockerfile_copies_and_drops_the_rest() -> None:
    patterns = _dockerignore_patterns()
    for junk in (".git", ".venv", "tests", "orchestrator/__pycache__"):
        assert _ignored(junk, patterns), f"{junk} would be sent in the build context"
    sources = []
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            tokens = shlex.split(args)
            if any(t.startswith("--from=") for t in tokens):
                continue  # from another stage, not from the build context
            sources += [t for t in tokens if not t.startswith("--")][:-1]
    assert {"pyproject.toml", "orchestrator", "connectors", "examples/"} <= set(sources)
    for source in sources:
        rel = source.rstrip("/") or "."
        assert (ROOT / rel).exists(), f"COPY {source}: no such path in the build context"
        assert _ignored(rel, patterns) is None, f"COPY {source} is excluded by the dockerignore"


# -- docker compose -----------------------------------------------------------------------


def test_compose_runs_the_whole_stack() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    roles = set(services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}, "single-node KRaft runs both roles"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    ours = orchestrator_services(compose())
    commands = {n: parse_cli(["orchestrator", *s["command"]]) for n, s in ours.items()}
    daemons = [n for n, a in commands.items() if a.command == "run"]
    migrations = [n for n, a in commands.items() if a.command == "db"]
    assert len(daemons) >= 2, "expected two daemon replicas"
    assert [commands[n].db_command for n in migrations] == ["migrate"]


def test_compose_orchestrator_env_maps_to_real_config_keys() -> None:
    for name, svc in orchestrator_services(compose()).items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        check_env_names(env, f"compose service {name}")
        settings = service_settings(svc, name)
        assert settings.kafka.enable_idempotence, f"{name}: real Kafka, idempotence on"
        assert settings.postgres.dsn_file, f"{name}: the DSN comes from a secret file"


def test_compose_addresses_point_at_the_stack() -> None:
    doc = compose()
    services = doc["services"]
    kafka_env = services["kafka"]["environment"]
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":")[-1]
    for name, svc in orchestrator_services(doc).items():
        settings = service_settings(svc, name)
        for server in settings.kafka.bootstrap_servers.split(","):
            assert server in kafka_env["KAFKA_ADVERTISED_LISTENERS"], f"{name}: {server}"
        endpoint = urllib.parse.urlsplit(settings.telemetry.otlp_endpoint)
        assert endpoint.hostname in services, f"{name}: no service {endpoint.hostname}"
        assert str(endpoint.port) == http_port, f"{name}: the collector listens on {http_port}"


def test_compose_dsn_secret_matches_the_postgres_service() -> None:
    doc = compose()
    pg = doc["services"]["postgres"]
    pg_env = pg["environment"]
    secret_dir = PurePosixPath("/run/secrets")
    password_secret = PurePosixPath(pg_env["POSTGRES_PASSWORD_FILE"]).name
    assert password_secret in pg["secrets"]
    password = (COMPOSE.parent / doc["secrets"][password_secret]["file"]).read_text().strip()
    for name, svc in orchestrator_services(doc).items():
        dsn_file = PurePosixPath(service_settings(svc, name).postgres.dsn_file)
        assert dsn_file.parent == secret_dir, name
        assert dsn_file.name in svc["secrets"], name
        dsn = (COMPOSE.parent / doc["secrets"][dsn_file.name]["file"]).read_text().strip()
        url = urllib.parse.urlsplit(dsn)
        assert url.hostname == "postgres"
        assert url.username == pg_env["POSTGRES_USER"]
        assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]
        assert url.password == password, f"{name}: DSN password differs from Postgres's"


def test_compose_mounts_the_example_config_where_the_image_looks() -> None:
    config_dir = str(PurePosixPath(image_env()["ORCH_CONFIG"]).parent)
    for name, svc in orchestrator_services(compose()).items():
        assert _mounted_host_dir(svc, config_dir) == EXAMPLES, name
        settings = service_settings(svc, name)
        for rules in settings.rules.files:
            assert (EXAMPLES / rules).is_file(), f"{name}: rules file {rules} is not mounted"
        for module in settings.pipelines.modules:
            found = [EXAMPLES / p / f"{module}.py" for p in settings.pipelines.paths]
            assert any(f.is_file() for f in found), f"{name}: pipeline module {module}"


def test_compose_daemons_are_probed_and_stopped_within_the_grace() -> None:
    doc = compose()
    for name, svc in orchestrator_services(doc).items():
        if parse_cli(["orchestrator", *svc["command"]]).command != "run":
            continue
        settings = service_settings(svc, name)
        assert parse_cli(svc["healthcheck"]["test"][1:]).command == "health"
        assert svc["healthcheck"]["test"][0] == "CMD"
        published = [p for p in svc["ports"] if p.endswith(f":{settings.health.port}")]
        assert published, f"{name}: health port {settings.health.port} is not published"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = settings.runner.shutdown_grace_seconds
        assert seconds(svc["stop_grace_period"]) >= grace + STOP_BOUNDS_SECONDS, (
            f"{name}: stop_grace_period {svc['stop_grace_period']} < "
            f"runner.shutdown_grace_seconds {grace} + {STOP_BOUNDS_SECONDS}"
        )
        deps = {k: v["condition"] for k, v in svc["depends_on"].items()}
        assert deps["kafka"] == deps["postgres"] == "service_healthy"
        migrate = [k for k, v in deps.items() if v == "service_completed_successfully"]
        assert migrate, f"{name}: does not wait for the migration"
        assert parse_cli(["orchestrator", *doc["services"][migrate[0]]["command"]]).db_command
    migrate_svc = next(s for s in orchestrator_services(doc).values() if s["command"][0] == "db")
    assert migrate_svc["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_collector_pipelines_use_defined_components_and_reach_jaeger() -> None:
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    for name, pipeline in collector["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector[kind], f"{name}: {kind[:-1]} {component}"
    traces = collector["service"]["pipelines"]["traces"]["exporters"]
    endpoint = collector["exporters"][traces[0]]["endpoint"]
    services = compose()["services"]
    host = endpoint.split(":")[0]
    assert services[host]["image"].startswith("jaegertracing/")
    assert services[host]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    col = services["otel-collector"]
    config_flag = next(a for a in col["command"] if a.startswith("--config="))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in col["volumes"]}
    source = mounted[config_flag.removeprefix("--config=")]
    assert (COMPOSE.parent / source).resolve() == DEPLOY / "otel-collector.yaml"


def _docker_compose_usable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on PATH"
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return "the docker client has no compose plugin"
    engine = subprocess.run(
        [docker, "info"], capture_output=True, text=True, timeout=30, check=False
    )
    if engine.returncode != 0:
        return "no Docker engine is reachable"
    return None


def test_docker_compose_config_validates() -> None:
    reason = _docker_compose_usable()
    if reason:
        pytest.skip(f"docker compose config needs a compose client and engine: {reason}")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- docs ---------------------------------------------------------------------------------


def _doc_commands(text: str) -> list[list[str]]:
    """``orchestrator ...`` invocations in the shell blocks: at the start of a command line,
    after ``docker compose exec SERVICE`` or after ``kubectl exec POD --``."""
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word != "orchestrator" and not word.endswith("/bin/orchestrator"):
                    continue
                if i == 0 or words[i - 1] == "--" or (i >= 2 and words[i - 2] == "exec"):
                    commands.append(words[i:])
                break
    return commands


def test_docs_commands_are_accepted_by_the_cli() -> None:
    commands = _doc_commands((ROOT / "docs" / "deploy.md").read_text())
    assert len(commands) >= 3
    for argv in commands:
        parse_cli(argv)


def test_docs_name_only_real_config_keys_and_the_grace_settings() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    sections = {f.name: f.type for f in msgspec.structs.fields(Settings)}
    names = set(re.findall(r"\bORCH_([A-Z]+)__([A-Z_]+)\b", text))
    assert len(names) >= 5
    for section, key in names:
        struct = sections.get(section.lower())
        assert struct is not None, f"docs: ORCH_{section}__{key}: no section {section.lower()}"
        keys = {f.name for f in msgspec.structs.fields(struct)}
        assert key.lower() in keys, f"docs: ORCH_{section}__{key}: no key {key.lower()}"
    for setting in (
        "runner.shutdown_grace_seconds",
        "terminationGracePeriodSeconds",
        "TimeoutStopSec",
        "stop_grace_period",
    ):
        assert setting in text, f"docs/deploy.md does not mention {setting}"
