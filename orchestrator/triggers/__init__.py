"""Trigger rules: declarative patterns that decide which pipelines an event starts.

Pure: no Kafka, no Postgres, no I/O except reading rules files. Typical use::

    ruleset = load_rules(["rules.toml"])          # RuleError names file, rule and field
    for rule in ruleset.match(event_to_dict(event)):
        ...                                        # rule.pipeline, rule.params

Patterns use Amazon EventBridge's content-filtering vocabulary; see ``docs/rules.md``.
"""

from orchestrator.triggers.index import RuleSet
from orchestrator.triggers.loader import check_rules, load_rules
from orchestrator.triggers.patterns import CompiledPattern, compile_pattern
from orchestrator.triggers.problems import RuleProblem
from orchestrator.triggers.rules import Explanation, Rule
from orchestrator.triggers.view import event_to_dict

__all__ = [
    "CompiledPattern",
    "Explanation",
    "Rule",
    "RuleProblem",
    "RuleSet",
    "check_rules",
    "compile_pattern",
    "event_to_dict",
    "load_rules",
]
