"""Turn configuration into the things the daemon runs: pipelines from modules, rules from files."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

from orchestrator.config import Settings
from orchestrator.errors import ConfigError, PipelineError, RuleError
from orchestrator.pipeline import Pipeline
from orchestrator.triggers import RuleSet, load_rules

__all__ = ["load_pipelines", "load_ruleset"]


def load_pipelines(settings: Settings) -> dict[str, Pipeline]:
    """Import the configured modules and collect their module-level ``Pipeline`` objects."""
    for path in settings.pipelines.paths:
        resolved = str(settings.resolve(path))
        if resolved not in sys.path:
            sys.path.insert(0, resolved)
    found: dict[str, Pipeline] = {}
    for module_name in settings.pipelines.modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"pipelines.modules: cannot import {module_name!r}: {exc} "
                "(is its directory listed in pipelines.paths?)"
            ) from exc
        pipelines = [v for v in vars(module).values() if isinstance(v, Pipeline)]
        if not pipelines:
            raise ConfigError(f"pipelines.modules: {module_name!r} defines no Pipeline")
        for p in pipelines:
            if p.name in found and found[p.name] is not p:
                raise PipelineError(
                    f"pipeline {p.name!r} is defined twice ({module_name} and another module)"
                )
            p.validate()
            found[p.name] = p
    return found


def load_ruleset(settings: Settings, pipelines: Mapping[str, Pipeline]) -> RuleSet:
    """Load the configured rule files; every rule must name a loaded pipeline."""
    files = [settings.resolve(f) for f in settings.rules.files]
    ruleset = load_rules(files)
    for rule in ruleset.rules:
        if rule.pipeline not in pipelines:
            known = ", ".join(sorted(pipelines)) or "none loaded"
            raise RuleError(
                f"rule {rule.name!r} field 'pipeline': unknown pipeline {rule.pipeline!r} "
                f"(known: {known})",
                rule=rule.name,
                field="pipeline",
            )
    return ruleset
