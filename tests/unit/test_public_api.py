"""The public surface: every exported name exists, and the step-author API stays complete."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = [
    "orchestrator",
    "orchestrator.config",
    "orchestrator.errors",
    "orchestrator.events",
    "orchestrator.telemetry",
    "orchestrator.pipeline",
    "orchestrator.triggers",
    "orchestrator.store",
    "orchestrator.ingest",
    "orchestrator.dev",
    "connectors",
]

STEP_AUTHOR_API = {
    "Arrival",
    "CloudEvent",
    "NonRetryableError",
    "OrchestratorError",
    "Pipeline",
    "RetryPolicy",
    "StepContext",
    "StepError",
    "new_arrival",
}


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported, f"{name} exports nothing"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(exported)) == len(exported)


def test_step_author_api_is_exported() -> None:
    import orchestrator

    assert set(orchestrator.__all__) == STEP_AUTHOR_API


def test_importing_the_package_does_no_io_or_setup() -> None:
    # A fresh interpreter: importing must not start loops, threads, or install providers.
    code = (
        "import threading, logging, orchestrator, orchestrator.daemon, orchestrator.cli;"
        "from opentelemetry import trace;"
        "assert threading.active_count() == 1, threading.enumerate();"
        "assert not logging.getLogger().handlers;"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
