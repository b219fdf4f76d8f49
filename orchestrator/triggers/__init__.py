"""Trigger rules: declarative patterns that decide which pipelines an event starts.

Pure: no Kafka, no Postgres, no clock, no I/O except reading rules files. Typical use::

    ruleset = load_rules(["rules.toml"])          # RuleError names file, rule and field
    view = event_to_dict(event)
    for rule in ruleset.match(view):              # simple rules
        ...                                        # rule.pipeline, render_params(rule.params, view)
    for corr, key, conditions in ruleset.correlate(view):   # correlated and absence rules
        state, firing = corr.apply(state, key=key, conditions=conditions,
                                   event_id=pk, event_time=published_at)

Patterns use Amazon EventBridge's content-filtering vocabulary; see ``docs/rules.md``.
"""

from orchestrator.triggers.correlation import CorrelationState, Correlator, Firing, correlator
from orchestrator.triggers.durations import parse_duration
from orchestrator.triggers.flow import FlowControl, flow_control
from orchestrator.triggers.index import RuleSet
from orchestrator.triggers.loader import check_rules, load_rules
from orchestrator.triggers.patterns import CompiledPattern, compile_pattern
from orchestrator.triggers.problems import RuleProblem
from orchestrator.triggers.rules import Batch, Expect, Explanation, NOf, Rule
from orchestrator.triggers.templates import key_of, render_params
from orchestrator.triggers.view import event_to_dict

__all__ = [
    "Batch",
    "CompiledPattern",
    "CorrelationState",
    "Correlator",
    "Expect",
    "Explanation",
    "Firing",
    "FlowControl",
    "NOf",
    "Rule",
    "RuleProblem",
    "RuleSet",
    "check_rules",
    "compile_pattern",
    "correlator",
    "event_to_dict",
    "flow_control",
    "key_of",
    "load_rules",
    "parse_duration",
    "render_params",
]
