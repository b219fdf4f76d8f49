"""The rule set and its index: matching cost that does not grow with the number of rules.

Each enabled rule goes into exactly one family, decided once at build time:

1. **dataset**: its pattern has ``data.dataset`` as a list of exact strings and/or plain
   ``{ prefix = "..." }`` objects. The rule sits in a hash bucket per exact value and per
   prefix; an event only visits the buckets of its own dataset (and of the prefixes of it
   that some rule uses, one dictionary lookup per distinct prefix length).
2. **type**: otherwise, its pattern has ``type`` as a list of exact strings: one bucket per
   value.
3. **unindexed**: everything else, checked for every event (keep this list short).

A bucket entry holds the rule's pattern *without* the clause the bucket already decided, so
the common rule costs one dictionary lookup plus its remaining clauses. When an event's
``data`` is a list (EventBridge's array matching must then see whole elements), the full
pattern is used instead. Results are always in rule order.

Correlated rules are kept apart: :meth:`RuleSet.match` never returns them, and
:meth:`RuleSet.correlate` uses an index of their conditions on exact datasets
(:mod:`.correlated_index`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from orchestrator.triggers.buckets import dataset_keys, exact_strings, without, without_dataset
from orchestrator.triggers.codegen import Group, generate_group
from orchestrator.triggers.correlated_index import CorrelatedIndex, explain_correlated
from orchestrator.triggers.correlation import Correlator
from orchestrator.triggers.nodes import Node, Test
from orchestrator.triggers.operators import leaf_values
from orchestrator.triggers.problems import RuleProblem
from orchestrator.triggers.rules import Explanation, Rule
from orchestrator.triggers.validation import CompiledRule, validate_rule

__all__ = ["RuleSet", "assemble"]

_Append = Callable[[int], None]

_Members = dict[str, list[tuple[int, Node]]]


class RuleSet:
    """Compiled, indexed rules. Build with :meth:`build` (or :func:`load_rules`)."""

    __slots__ = (
        "_by_dataset",
        "_by_prefix",
        "_by_type",
        "_compiled",
        "_correlated_index",
        "_correlators",
        "_full",
        "_members",
        "_prefix_lengths",
        "_stats",
        "_unindexed",
        "correlated",
        "rules",
    )

    rules: tuple[Rule, ...]
    """Every rule, simple and correlated, enabled or not, in rule (file) order."""
    correlated: tuple[Correlator, ...]
    """The enabled correlated rules, compiled, in rule order."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        rules = tuple(rules)
        patterns: list[CompiledRule] = []
        seen: set[str] = set()
        for position, rule in enumerate(rules, 1):
            compiled, problems = validate_rule(rule, label=rule.name or f"#{position}")
            if rule.name in seen:
                problems.append(
                    RuleProblem(
                        file="",
                        rule=rule.name,
                        field="name",
                        message="this name is used by an earlier rule; rule names must be unique",
                    )
                )
            if problems or compiled is None:
                raise problems[0].error()
            seen.add(rule.name)
            patterns.append(compiled)
        self._setup(rules, tuple(patterns))

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> RuleSet:
        """Validate and compile every rule; raise :class:`RuleError` on the first problem."""
        return cls(rules)

    def _setup(self, rules: tuple[Rule, ...], compiled: tuple[CompiledRule, ...]) -> None:
        self.rules = rules
        self._compiled = compiled
        self._full: tuple[Test, ...] = tuple(
            c.match.matches if c.match is not None else _never for c in compiled
        )
        self._correlators: dict[int, Correlator] = {
            i: Correlator(rule, c)
            for i, (rule, c) in enumerate(zip(rules, compiled, strict=True))
            if rule.correlated
        }
        self._setup_correlated(rules)
        by_dataset: _Members = {}
        by_prefix: _Members = {}
        by_type: _Members = {}
        unindexed: list[tuple[int, Node]] = []
        for i, (rule, pattern) in enumerate(zip(rules, compiled, strict=True)):
            if not rule.enabled or pattern.match is None or i in self._correlators:
                continue
            match, root = rule.match, pattern.match.root
            data = match.get("data")
            keys = dataset_keys(data.get("dataset")) if isinstance(data, Mapping) else None
            if keys is not None:
                node = without_dataset(root)
                exact, prefixes = keys
                for key in exact:
                    by_dataset.setdefault(key, []).append((i, node))
                for key in prefixes:
                    by_prefix.setdefault(key, []).append((i, node))
                continue
            types = exact_strings(match.get("type"))
            if types:
                node = without(root, "type")
                for key in types:
                    by_type.setdefault(key, []).append((i, node))
                continue
            unindexed.append((i, root))
        self._by_dataset: dict[str, Group] = {k: generate_group(m) for k, m in by_dataset.items()}
        self._by_prefix: dict[str, Group] = {k: generate_group(m) for k, m in by_prefix.items()}
        self._by_type: dict[str, Group] = {k: generate_group(m) for k, m in by_type.items()}
        self._unindexed = generate_group(unindexed) if unindexed else None
        self._stats = len(unindexed)
        self._prefix_lengths = tuple(sorted({len(p) for p in by_prefix}))
        # For the rare event whose ``data`` is a list: bucket -> rules, tested in full.
        self._members = (
            {k: tuple(i for i, _ in m) for k, m in by_dataset.items()},
            {k: tuple(i for i, _ in m) for k, m in by_prefix.items()},
        )

    def match(self, event: Mapping[str, Any]) -> list[Rule]:
        """The enabled rules whose pattern matches ``event``, in rule (file) order."""
        hits: list[int] = []
        append = hits.append
        data = event.get("data")
        if data.__class__ is dict or isinstance(data, Mapping):
            dataset = data.get("dataset")
            if dataset.__class__ is str:
                group = self._by_dataset.get(dataset)
                if group is not None:
                    group(event, append)
                if self._prefix_lengths:  # inlined _prefixes(): this is the hot path
                    by_prefix, size = self._by_prefix, len(dataset)
                    for length in self._prefix_lengths:
                        if length > size:
                            break
                        group = by_prefix.get(dataset[:length])
                        if group is not None:
                            group(event, append)
            elif isinstance(dataset, list | tuple):
                for key in _strings(dataset):
                    group = self._by_dataset.get(key)
                    if group is not None:
                        group(event, append)
                    self._prefixes(key, event, append)
        elif isinstance(data, list | tuple):
            self._whole_elements(_dataset_leaves(data), event, append)
        kind = event.get("type")
        if kind.__class__ is str:
            group = self._by_type.get(kind)
            if group is not None:
                group(event, append)
        elif isinstance(kind, list | tuple):
            for key in _strings(kind):
                group = self._by_type.get(key)
                if group is not None:
                    group(event, append)
        if self._unindexed is not None:
            self._unindexed(event, append)
        if not hits:
            return []
        if len(hits) == 1:
            return [self.rules[hits[0]]]
        rules = self.rules  # from several buckets: restore rule order, drop repeats
        return [rules[i] for i in sorted(set(hits))]

    def _prefixes(self, dataset: str, event: Mapping[str, Any], append: _Append) -> None:
        by_prefix, size = self._by_prefix, len(dataset)
        for length in self._prefix_lengths:
            if length > size:
                break
            group = by_prefix.get(dataset[:length])
            if group is not None:
                group(event, append)

    def _whole_elements(self, keys: set[str], event: Mapping[str, Any], append: _Append) -> None:
        """``data`` is a list: EventBridge matches fields of one element together, so test
        each candidate's whole pattern rather than what its bucket left over."""
        exact, prefixed = self._members
        for key in keys:
            candidates = list(exact.get(key, ()))
            for length in self._prefix_lengths:
                if length <= len(key):
                    candidates.extend(prefixed.get(key[:length], ()))
            for i in candidates:
                if self._full[i](event):
                    append(i)

    def _setup_correlated(self, rules: tuple[Rule, ...]) -> None:
        active = [i for i in sorted(self._correlators) if rules[i].enabled]
        self.correlated = tuple(self._correlators[i] for i in active)
        self._correlated_index = CorrelatedIndex(
            self.correlated, tuple(self._compiled[i] for i in active)
        )

    def correlate(self, event: Mapping[str, Any]) -> list[tuple[Correlator, str, list[str]]]:
        """``(correlator, key, conditions)`` for every enabled correlated rule that ``event``
        contributes to: it satisfies at least one ``on`` condition (and ``match``, if given)
        and has the rule's key. In rule order; conditions in ``on`` order."""
        if not self.correlated:
            return []
        return self._correlated_index.correlate(event)

    def explain(self, event: Mapping[str, Any]) -> list[Explanation]:
        """One :class:`Explanation` per rule, in rule order; agrees with :meth:`match` for
        simple rules and with :meth:`correlate` for correlated ones (``matched``: the event
        contributes a condition for a key)."""
        out: list[Explanation] = []
        for i, (rule, compiled) in enumerate(zip(self.rules, self._compiled, strict=True)):
            if not rule.enabled:
                out.append(Explanation(rule.name, False, "rule is disabled (enabled = false)"))
                continue
            corr = self._correlators.get(i)
            if corr is not None:
                out.append(explain_correlated(corr, compiled, event))
                continue
            reason = compiled.match.explain(event) if compiled.match is not None else None
            out.append(Explanation(rule.name, reason is None, reason or "matched"))
        return out

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        correlated = (
            f"; {len(self.correlated)} correlated "
            f"({self._correlated_index.unindexed_rules} unindexed)"
            if self.correlated
            else ""
        )
        return (
            f"<RuleSet {len(self.rules)} rules: {len(self._by_dataset)} dataset keys, "
            f"{len(self._by_prefix)} dataset prefixes, {len(self._by_type)} type keys, "
            f"{self._stats} unindexed{correlated}>"
        )


def assemble(rules: tuple[Rule, ...], compiled: tuple[CompiledRule, ...]) -> RuleSet:
    """A RuleSet from rules already validated and compiled (by the loader)."""
    ruleset = RuleSet.__new__(RuleSet)
    ruleset._setup(rules, compiled)  # same package; avoids compiling twice
    return ruleset


def _never(_: Mapping[str, Any]) -> bool:
    return False


def _strings(value: list[Any] | tuple[Any, ...]) -> set[str]:
    return {x for x in leaf_values(value) if isinstance(x, str)}


def _dataset_leaves(data: list[Any] | tuple[Any, ...]) -> set[str]:
    keys: set[str] = set()
    for item in data:
        if isinstance(item, Mapping):
            value = item.get("dataset")
            if isinstance(value, str):
                keys.add(value)
            elif isinstance(value, list | tuple):
                keys |= _strings(value)
        elif isinstance(item, list | tuple):
            keys |= _dataset_leaves(item)
    return keys
