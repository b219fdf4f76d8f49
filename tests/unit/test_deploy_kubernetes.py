"""deploy/kubernetes agrees with the image, the CLI, the config loader and the rule loader."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import pytest
import yaml

from orchestrator.config import Settings
from tests.unit.test_deploy import (
    DEPLOY,
    ROOT,
    STOP_BOUNDS_SECONDS,
    check_env_names,
    image_env,
    load_settings,
    parse_cli,
    runtime_stage,
)

K8S = DEPLOY / "kubernetes"


def _doc(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((K8S / name).read_text())
    assert isinstance(doc, dict)
    return doc


def _kustomized() -> list[dict[str, Any]]:
    kustomization = _doc("kustomization.yaml")
    return [_doc(name) for name in kustomization["resources"]]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _kustomized() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(kind)["spec"]["template"]["spec"]
    return spec


def _container(kind: str) -> dict[str, Any]:
    containers = _pod_spec(kind)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _container_env(kind: str) -> dict[str, str]:
    """The container's variables over the image's; valueFrom ones get a stand-in value."""
    env = dict(image_env())
    for var in _container(kind).get("env", []):
        env[var["name"]] = var.get("value", "from-a-reference")
    return env


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """The ConfigMap's keys as files, the way the pod sees its mounted volume."""
    data = _one("ConfigMap")["data"]
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    return tmp_path


def _settings(kind: str, config_dir: Path) -> Settings:
    env = _container_env(kind)
    name = PurePosixPath(env["ORCH_CONFIG"]).name
    return load_settings(env, config_dir / name, where=f"{kind} with configmap.yaml")


def _mounts(kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    volumes = {v["name"]: v for v in _pod_spec(kind)["volumes"]}
    for mount in _container(kind)["volumeMounts"]:
        yield mount["mountPath"], volumes[mount["name"]]


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = _doc("kustomization.yaml")
    assert "namespace" not in kustomization, "the base must stay namespace-agnostic"
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert "secret.example.yaml" not in resources
    kinds = sorted(d["kind"] for d in _kustomized())
    assert kinds == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget"]
    for doc in [*_kustomized(), _doc("secret.example.yaml")]:
        assert "namespace" not in doc["metadata"], f"{doc['kind']} names a namespace"


def test_kustomize_renders_the_base() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render the base")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == [
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
    ]


def test_configmap_config_and_env_load(config_dir: Path) -> None:
    for kind in ("Deployment", "Job"):
        check_env_names(_container_env(kind), kind)
        settings = _settings(kind, config_dir)
        assert settings.kafka.enable_idempotence
        assert settings.postgres.dsn_file, f"{kind}: the DSN comes from the Secret"


def test_configmap_rules_load_and_name_the_image_pipelines(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rule engine is imported here so the other manifest checks run without it.
    load_rules = pytest.importorskip("orchestrator.triggers").load_rules
    loading = pytest.importorskip("orchestrator.loading")
    settings = _settings("Deployment", config_dir)
    files = [settings.resolve(f) for f in settings.rules.files]
    assert files, "no rule files configured"
    assert all(f.parent == config_dir for f in files), "rules must be in the ConfigMap"
    assert len(load_rules(files)) >= 1
    # The image copies its PIPELINES directory to where pipelines.paths points.
    copies = {}
    for args in runtime_stage().all("COPY"):
        words = args.split()
        if not words[0].startswith("--from"):
            copies[words[-1].rstrip("/")] = words[-2].rstrip("/")
    (path,) = settings.pipelines.paths
    assert path in copies, f"pipelines.paths {path} is not where the image puts pipelines"
    source = ROOT / copies[path]
    monkeypatch.setattr(sys, "path", list(sys.path))
    local = msgspec.structs.replace(
        settings, pipelines=msgspec.structs.replace(settings.pipelines, paths=(str(source),))
    )
    pipelines = loading.load_pipelines(local)
    assert len(loading.load_ruleset(local, pipelines)) == len(load_rules(files))


def test_config_and_secret_are_mounted_where_the_settings_point(config_dir: Path) -> None:
    secret = _doc("secret.example.yaml")
    for kind in ("Deployment", "Job"):
        env = _container_env(kind)
        mounts = dict(_mounts(kind))
        config_dir_in_pod = str(PurePosixPath(env["ORCH_CONFIG"]).parent)
        assert (
            mounts[config_dir_in_pod]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
        )
        dsn_file = PurePosixPath(_settings(kind, config_dir).postgres.dsn_file)
        volume = mounts[str(dsn_file.parent)]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert dsn_file.name in secret["stringData"], f"{kind}: no key {dsn_file.name}"
        assert "/tmp" in mounts, f"{kind}: a read-only root needs a writable /tmp"


def test_deployment_runs_replicas_of_the_daemon(config_dir: Path) -> None:
    deployment = _one("Deployment")
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    settings = _settings("Deployment", config_dir)
    assert settings.kafka.topic_partitions >= replicas, "replicas beyond partitions take no intake"
    container = _container("Deployment")
    image_cmd = parse_cli(["orchestrator", *container["args"]])
    assert image_cmd.command == "run"
    assert "command" not in container, "keep the image's ENTRYPOINT (orchestrator)"
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items()


def test_probes_hit_the_health_endpoint_on_the_configured_port(config_dir: Path) -> None:
    settings = _settings("Deployment", config_dir)
    container = _container("Deployment")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        port = ports.get(get["port"], get["port"])
        assert port == settings.health.port, f"{probe} port {port} != health.port"
        paths[probe] = get["path"]
    assert paths["livenessProbe"] == "/livez"
    assert paths["readinessProbe"] == "/readyz"
    assert settings.health.host == "0.0.0.0", "kubelet probes the pod IP, not loopback"


def test_termination_grace_covers_the_drain(config_dir: Path) -> None:
    settings = _settings("Deployment", config_dir)
    grace = settings.runner.shutdown_grace_seconds
    termination = _pod_spec("Deployment")["terminationGracePeriodSeconds"]
    assert termination > grace
    assert termination >= grace + STOP_BOUNDS_SECONDS, (
        f"terminationGracePeriodSeconds {termination} < runner.shutdown_grace_seconds "
        f"{grace} + {STOP_BOUNDS_SECONDS}"
    )


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_non_root_on_a_read_only_root(kind: str) -> None:
    pod = _pod_spec(kind)["securityContext"]
    container = _container(kind)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert container["runAsNonRoot"] is True
    image_uid = int(runtime_stage().last("USER").split(":")[0])
    assert pod["runAsUser"] == image_uid != 0
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    resources = _container(kind)["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_migration_job_runs_db_migrate() -> None:
    job = _one("Job")
    args = parse_cli(["orchestrator", *_container("Job")["args"]])
    assert (args.command, args.db_command) == ("db", "migrate")
    assert _pod_spec("Job")["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1
    images = {_container(k)["image"] for k in ("Deployment", "Job")}
    assert len(images) == 1, "the Job must migrate with the daemon's image"


def test_disruption_budget_keeps_one_daemon_and_ignores_the_job() -> None:
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    selector = pdb["selector"]["matchLabels"].items()
    daemon_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"].items()
    assert selector <= daemon_labels
    assert not selector <= job_labels
