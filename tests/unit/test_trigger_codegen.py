"""Generated matchers agree with the reference tree on random patterns and random events.

The generated code has fast paths for the common shapes (dict objects, scalar values) and
falls back to the reference for everything else; random inputs exercise both sides.
"""

from __future__ import annotations

import random
from typing import Any

from orchestrator.triggers import compile_pattern
from orchestrator.triggers.codegen import generate_group

KEYS = ["a", "b", "c"]
STRINGS = ["x", "xy", "y", "X", "yx", "", "10.0.0.7", "a*b"]
NUMBERS: list[Any] = [0, 1, 5, 5.0, -2.5, 10**20]


def random_item(rng: random.Random) -> Any:
    roll = rng.randrange(16)
    if roll < 3:
        return rng.choice(STRINGS)
    if roll < 5:
        return rng.choice(NUMBERS)
    if roll == 5:
        return rng.choice([True, False, None])
    operators: list[dict[str, Any]] = [
        {"prefix": rng.choice(["x", "", "1"])},
        {"suffix": "y"},
        {"prefix": {"equals-ignore-case": "X"}},
        {"equals-ignore-case": "xY"},
        {"wildcard": rng.choice(["x*", "*y", "x*y", "*", r"a\*b"])},
        {"anything-but": rng.choice(["x", 5, ["x", "y"], [0, 1], {"prefix": "x"}])},
        {
            "numeric": rng.choice(
                [[">", 0], ["<=", 5], [">=", 0, "<", 5], [">", 0, "<=", 5], ["=", 5]]
            )
        },
        {"exists": rng.choice([True, False])},
        {"cidr": "10.0.0.0/24"},
        {"anything-but": {"wildcard": "x*"}},
    ]
    return rng.choice(operators)


def random_pattern(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    pattern: dict[str, Any] = {}
    for key in rng.sample(KEYS, rng.randrange(1, 3)):
        if depth < 2 and rng.random() < 0.3:
            pattern[key] = random_pattern(rng, depth + 1)
        else:
            pattern[key] = [random_item(rng) for _ in range(rng.randrange(1, 4))]
    if depth < 2 and rng.random() < 0.15:
        pattern["$or"] = [random_pattern(rng, depth + 1) for _ in range(2)]
    return pattern


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.randrange(10)
    if roll < 4:
        return rng.choice(STRINGS)
    if roll < 6:
        return rng.choice(NUMBERS)
    if roll == 6:
        return rng.choice([True, False, None])
    if roll == 7 and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))]
    if depth < 2:
        return random_event(rng, depth + 1)
    return rng.choice(STRINGS)


def random_event(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {k: random_value(rng, depth) for k in KEYS if rng.random() < 0.7}


def test_generated_code_agrees_with_reference_and_explain() -> None:
    rng = random.Random(20261124)
    events = [random_event(rng) for _ in range(60)]
    checked = matched = 0
    for _ in range(400):
        compiled = compile_pattern(random_pattern(rng))
        for event in events:
            result = compiled.matches(event)
            assert result is compiled.reference(event), (compiled, event)
            assert (compiled.explain(event) is None) is result, (compiled, event)
            checked += 1
            matched += result
    assert checked == 400 * 60
    assert 0.02 < matched / checked < 0.9  # the inputs exercise both outcomes


SINGLE_OPERATORS: list[Any] = [
    "x",
    5,
    True,
    None,
    {"prefix": "x"},
    {"suffix": "y"},
    {"prefix": {"equals-ignore-case": "X"}},
    {"suffix": {"equals-ignore-case": "Y"}},
    {"equals-ignore-case": "xY"},
    {"wildcard": "x*y"},
    {"anything-but": "x"},
    {"anything-but": [0, 5]},
    {"anything-but": {"prefix": "x"}},
    {"exists": True},
    {"exists": False},
    {"cidr": "10.0.0.0/24"},
    *({"numeric": [op, 5]} for op in ("=", "<", "<=", ">", ">=")),
    *({"numeric": [low, 0, high, 5]} for low in (">", ">=") for high in ("<", "<=")),
]
BOUNDARY_VALUES: list[Any] = [
    *STRINGS,
    "xay",
    "X",
    "YX",
    0,
    5,
    5.0,
    4.999,
    5.001,
    -1,
    True,
    False,
    None,
    [],
    [0, "x"],
    {"k": 1},
]


def test_each_operator_alone_agrees_with_reference_on_boundaries() -> None:
    """Single-operator leaves take the inlined fast paths: check each at its edges."""
    for item in SINGLE_OPERATORS:
        for depth_pattern in ({"a": [item]}, {"a": {"b": [item]}}):
            compiled = compile_pattern(depth_pattern)
            for value in BOUNDARY_VALUES:
                for event in ({"a": value}, {"a": {"b": value}}, {}):
                    expected = compiled.reference(event)
                    assert compiled.matches(event) is expected, (item, event)


def test_group_function_reports_the_matching_members_in_order() -> None:
    rng = random.Random(7)
    patterns = [compile_pattern(random_pattern(rng)) for _ in range(40)]
    group = generate_group([(i * 3, p.root) for i, p in enumerate(patterns)])
    for _ in range(200):
        event = random_event(rng)
        hits: list[int] = []
        group(event, hits.append)
        assert hits == [i * 3 for i, p in enumerate(patterns) if p.matches(event)]


def test_shapes_share_compiled_code() -> None:
    first = compile_pattern({"data": {"dataset": ["one"]}, "type": ["t"]})
    second = compile_pattern({"data": {"dataset": ["two"]}, "type": ["u"]})
    assert first.matches.__code__ is second.matches.__code__
    assert first.matches({"type": "t", "data": {"dataset": "one"}})
    assert not second.matches({"type": "t", "data": {"dataset": "one"}})


class _CountingDict(dict[str, Any]):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads: dict[str, int] = {}

    def get(self, key: str, default: Any = None) -> Any:
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key, default)


def test_group_reads_a_field_its_members_share_once() -> None:
    patterns = [
        compile_pattern({"a": ["x"], "b": [{"prefix": "y"}]}),
        compile_pattern({"a": [{"prefix": "x"}], "c": {"d": [1]}}),
        compile_pattern({"c": {"d": [{"numeric": [">", 0]}]}, "b": ["yy"]}),
        compile_pattern({"e": [{"exists": False}]}),
    ]
    group = generate_group([(i, p.root) for i, p in enumerate(patterns)])
    event = _CountingDict({"a": "x", "b": "yy", "c": {"d": 1}})
    hits: list[int] = []
    group(event, hits.append)
    assert hits == [0, 1, 2, 3]
    assert event.reads == {"a": 1, "b": 1, "c": 1, "e": 1}
