"""The rule index gives exactly the answer of testing every rule, in the same order."""

from __future__ import annotations

import random
from typing import Any

from orchestrator.triggers import Rule, RuleSet, compile_pattern

DATASETS = ["orders", "orders.eu", "customers", "ord", "o", ""]
TYPES = ["data.arrived", "data.deleted", "audit"]


def random_rule(rng: random.Random, i: int) -> Rule:
    match: dict[str, Any] = {}
    roll = rng.randrange(6)
    data: dict[str, Any] = {}
    if roll <= 1:  # dataset family: exact values and/or plain prefixes
        items: list[Any] = rng.sample(DATASETS, rng.randrange(1, 3))
        if rng.random() < 0.4:
            items.append({"prefix": rng.choice(["ord", "o", "cust", ""])})
        data["dataset"] = items if rng.random() < 0.8 else items[0]
    elif roll == 2:  # not indexable on dataset
        data["dataset"] = [{"suffix": "s"}, "orders"]
    if rng.random() < 0.5:
        data["rows"] = [{"numeric": [">", rng.randrange(0, 5)]}]
    if rng.random() < 0.2:
        data["$or"] = [{"rows": [1]}, {"partition": [{"exists": False}]}]
    if data:
        match["data"] = data
    if roll in (0, 3) or not match:
        match["type"] = rng.sample(TYPES, rng.randrange(1, 3))
    if roll == 4:
        match["source"] = [{"prefix": "s"}]
    return Rule(name=f"r{i}", pipeline="p", match=match, enabled=rng.random() > 0.05)


def random_event(rng: random.Random) -> dict[str, Any]:
    def data() -> dict[str, Any]:
        d: dict[str, Any] = {}
        if rng.random() < 0.9:
            d["dataset"] = rng.choice(DATASETS)
        if rng.random() < 0.7:
            d["rows"] = rng.randrange(0, 6)
        if rng.random() < 0.3:
            d["partition"] = "p"
        return d

    event: dict[str, Any] = {"source": rng.choice(["src", "other"])}
    if rng.random() < 0.95:
        event["type"] = rng.choice(TYPES) if rng.random() < 0.9 else rng.sample(TYPES, 2)
    shape = rng.randrange(10)
    if shape < 7:
        event["data"] = data()
    elif shape == 7:  # several datasets
        event["data"] = {**data(), "dataset": rng.sample(DATASETS, 2)}
    elif shape == 8:  # a list of objects: fields must match within one element
        event["data"] = [data() for _ in range(rng.randrange(1, 3))]
    return event


def brute_force(rules: list[Rule], event: dict[str, Any]) -> list[str]:
    return [r.name for r in rules if r.enabled and compile_pattern(r.match).matches(event)]


def test_index_agrees_with_testing_every_rule() -> None:
    rng = random.Random(11)
    rules = [random_rule(rng, i) for i in range(150)]
    ruleset = RuleSet.build(rules)
    compiled = [compile_pattern(r.match) for r in rules]
    seen_matches = 0
    for _ in range(1500):
        event = random_event(rng)
        expected = [
            r.name for r, c in zip(rules, compiled, strict=True) if r.enabled and c.matches(event)
        ]
        got = [r.name for r in ruleset.match(event)]
        assert got == expected, event
        explained = [e.rule for e in ruleset.explain(event) if e.matched]
        assert explained == expected, event
        seen_matches += len(got)
    assert seen_matches > 1500  # the random rules do match, often several at once


def test_index_families() -> None:
    ruleset = RuleSet.build(
        [
            Rule(name="exact", pipeline="p", match={"data": {"dataset": ["a", "b"]}}),
            Rule(name="prefix", pipeline="p", match={"data": {"dataset": [{"prefix": "a"}]}}),
            Rule(name="type", pipeline="p", match={"type": ["t"], "data": {"rows": [1]}}),
            Rule(name="other", pipeline="p", match={"source": ["s"]}),
        ]
    )
    assert repr(ruleset) == (
        "<RuleSet 4 rules: 2 dataset keys, 1 dataset prefixes, 1 type keys, 1 unindexed>"
    )
