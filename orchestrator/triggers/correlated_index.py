"""Which correlated rules an event contributes to, at the cost of one bucket lookup.

Every (rule, condition) pair is a *member*: the condition's pattern AND the rule's ``match``
(when given), as one pattern tree. A member goes into a bucket per exact ``data.dataset``
value, of the condition when it names exact datasets, else of ``match``; its tree then
leaves out the clause the bucket decided. Members with neither are *unindexed* and tried
for every event. Each bucket is one generated function (:func:`.codegen.generate_group`),
as for simple rules. Events whose ``data`` is not an object, or whose dataset is not one
string, are tested member by member with the full patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.triggers.buckets import exact_datasets, without_dataset
from orchestrator.triggers.codegen import Group, generate_group
from orchestrator.triggers.correlation import Correlator
from orchestrator.triggers.nodes import Node
from orchestrator.triggers.operators import MISSING
from orchestrator.triggers.rules import Explanation
from orchestrator.triggers.templates import key_of, lookup
from orchestrator.triggers.validation import CompiledRule

__all__ = ["CorrelatedIndex", "explain_correlated"]

Contribution = tuple[Correlator, str, list[str]]


class CorrelatedIndex:
    """The enabled correlated rules of a rule set, indexed on exact datasets."""

    __slots__ = ("_by_dataset", "_members", "_unindexed", "correlators", "unindexed_rules")

    def __init__(
        self, correlators: tuple[Correlator, ...], compiled: tuple[CompiledRule, ...]
    ) -> None:
        self.correlators = correlators
        members: list[tuple[int, str]] = []  # member id -> (correlator position, condition)
        by_dataset: dict[str, list[tuple[int, Node]]] = {}
        unindexed: list[tuple[int, Node]] = []
        unindexed_rules: set[int] = set()
        for position, (corr, patterns) in enumerate(zip(correlators, compiled, strict=True)):
            match = patterns.match
            match_keys = exact_datasets(corr.rule.match) if match is not None else None
            for name, pattern in patterns.on.items():
                member = len(members)
                members.append((position, name))
                keys = exact_datasets(corr.rule.on[name])
                if keys is not None:
                    head = match.root.clauses if match is not None else []
                    node = Node([*head, *without_dataset(pattern.root).clauses])
                elif match is not None and match_keys is not None:
                    keys = match_keys
                    node = Node([*without_dataset(match.root).clauses, *pattern.root.clauses])
                else:
                    head = match.root.clauses if match is not None else []
                    unindexed.append((member, Node([*head, *pattern.root.clauses])))
                    unindexed_rules.add(position)
                    continue
                for key in keys:
                    by_dataset.setdefault(key, []).append((member, node))
        self._members = tuple(members)
        self._by_dataset: dict[str, Group] = {k: generate_group(m) for k, m in by_dataset.items()}
        self._unindexed = generate_group(unindexed) if unindexed else None
        self.unindexed_rules = len(unindexed_rules)
        """How many rules have a condition that every event must try."""

    def correlate(self, event: Mapping[str, Any]) -> list[Contribution]:
        """``(correlator, key, conditions)`` per rule ``event`` contributes to, rule order."""
        hits: list[int] = []
        data = event.get("data")
        if data.__class__ is dict:
            dataset = data.get("dataset")
            if dataset.__class__ is str:
                group = self._by_dataset.get(dataset)
                if group is not None:
                    group(event, hits.append)
            elif dataset is not None:  # several datasets: full patterns
                return self._slow(event)
        elif data is not None:  # data as a list (or a scalar): full patterns
            return self._slow(event)
        # no dataset at all: no exact-dataset member can match, only the unindexed ones
        if self._unindexed is not None:
            self._unindexed(event, hits.append)
        if not hits:
            return []
        if len(hits) > 1:
            hits = sorted(set(hits))
        return self._contributions(event, hits)

    def _contributions(self, event: Mapping[str, Any], hits: list[int]) -> list[Contribution]:
        out: list[Contribution] = []
        members, correlators = self._members, self.correlators
        current = -1
        conditions: list[str] | None = None
        for member in hits:
            position, name = members[member]
            if position != current:
                current, conditions = position, None
                corr = correlators[position]
                key = key_of(corr.rule, event)
                if key is not None:
                    conditions = []
                    out.append((corr, key, conditions))
            if conditions is not None:
                conditions.append(name)
        return out

    def _slow(self, event: Mapping[str, Any]) -> list[Contribution]:
        """Full patterns, rule by rule: ``data`` is a list, several datasets, or none."""
        out: list[Contribution] = []
        for corr in self.correlators:
            conditions = corr.conditions(event)
            if conditions:
                key = key_of(corr.rule, event)
                if key is not None:
                    out.append((corr, key, conditions))
        return out


def explain_correlated(
    corr: Correlator, compiled: CompiledRule, event: Mapping[str, Any]
) -> Explanation:
    """Which conditions ``event`` contributes to ``corr``'s rule and for which key, or why
    none."""
    name = corr.rule.name
    if compiled.match is not None:
        why = compiled.match.explain(event)
        if why is not None:
            return Explanation(name, False, f"does not pass match: {why}")
    conditions = corr.conditions(event)
    if not conditions:
        reasons = "; ".join(
            f"{cond}: {pattern.explain(event)}" for cond, pattern in compiled.on.items()
        )
        return Explanation(name, False, f"meets no condition ({reasons})")
    plural = "conditions" if len(conditions) > 1 else "condition"
    quoted = ", ".join(repr(c) for c in conditions)
    key = key_of(corr.rule, event)
    if key is None:
        value = lookup(event, corr.rule.key)
        what = "is missing" if value is MISSING else f"is not a key value ({value!r})"
        return Explanation(
            name,
            False,
            f"meets {plural} {quoted} but the key {corr.rule.key} {what}, so it contributes "
            "nothing",
        )
    return Explanation(name, True, f"contributes {plural} {quoted} for key {key!r} ({corr.kind})")
