"""Correlated, absence and flow-control rule fields: loading, problems that name the file,
rule and field, parsed flow control, and how RuleSet keeps correlated rules apart."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestrator.errors import RuleError
from orchestrator.triggers import (
    Batch,
    Expect,
    Explanation,
    FlowControl,
    NOf,
    Rule,
    RuleSet,
    check_rules,
    correlator,
    flow_control,
    key_of,
    load_rules,
)

EXAMPLE = """
[[rule]]
name = "daily-rollup"
pipeline = "rollup"
key = "data.partition"
within = "2h"
all_of = ["orders", "customers"]
params = { day = "{data.partition}", source = "rollup" }
[rule.on.orders]
data.dataset = ["sales.orders"]
[rule.on.customers]
data.dataset = ["sales.customers"]

[[rule]]
name = "orders-late"
pipeline = "page-oncall"
expect = { conditions = ["orders"], after = "3h" }
on.customers = { data.dataset = ["sales.customers"] }
on.orders = { data.dataset = ["sales.orders"] }

[[rule]]
name = "orders-copy"
pipeline = "copy"
debounce = "30s"
concurrency = 1
on_overlap = "skip"
priority = 5
match = { data.dataset = ["sales.orders"] }

[[rule]]
name = "big-batches"
pipeline = "load"
batch = { max_events = 100, max_wait = "5m" }
on_overlap = "cancel_running"
match = { type = ["data.arrived"] }

[[rule]]
name = "two-of-three"
pipeline = "p"
n_of = { n = 2, of = ["a", "b", "c"] }
match = { source = [{ prefix = "prod://" }] }
on.a = { data.dataset = ["a"] }
on.b = { data.dataset = ["b"] }
on.c = { data.attributes.kind = ["c"] }

[[rule]]
name = "etl"
pipeline = "p"
key = "data.attributes.run"
sequence = ["extract", "load"]
on.extract = { data.dataset = ["raw"] }
on.load = { data.dataset = ["clean"] }

[[rule]]
name = "nightly"
pipeline = "p"
expect = { conditions = ["orders"], by = "02:00", timezone = "Europe/Paris" }
on.customers = { data.dataset = ["sales.customers"] }
on.orders = { data.dataset = ["sales.orders"] }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


def event(dataset: str, **data: Any) -> dict[str, Any]:
    return {
        "type": "data.arrived",
        "source": "prod://x",
        "data": {"dataset": dataset, "partition": "2026-11-24", **data},
    }


def names(rules: list[Rule]) -> list[str]:
    return [r.name for r in rules]


def test_the_example_loads_into_structs(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    rollup, late, copy, batches, two, etl, nightly = ruleset.rules
    assert rollup == Rule(
        name="daily-rollup",
        pipeline="rollup",
        key="data.partition",
        within="2h",
        all_of=["orders", "customers"],
        params={"day": "{data.partition}", "source": "rollup"},
        on={
            "orders": {"data": {"dataset": ["sales.orders"]}},
            "customers": {"data": {"dataset": ["sales.customers"]}},
        },
    )
    assert late.expect == Expect(conditions=["orders"], after="3h")
    assert nightly.expect == Expect(conditions=["orders"], by="02:00", timezone="Europe/Paris")
    assert batches.batch == Batch(max_events=100, max_wait="5m")
    assert two.n_of == NOf(n=2, of=["a", "b", "c"])
    assert etl.sequence == ["extract", "load"]
    assert [r.correlated for r in ruleset.rules] == [True, True, False, False, True, True, True]
    assert [c.rule.name for c in ruleset.correlated] == [
        "daily-rollup",
        "orders-late",
        "two-of-three",
        "etl",
        "nightly",
    ]
    assert copy.match == {"data": {"dataset": ["sales.orders"]}}
    assert check_rules([write(tmp_path, EXAMPLE)]) == []


def test_new_fields_default_so_old_rules_keep_their_meaning() -> None:
    r = Rule(name="r", pipeline="p", match={"type": ["t"]})
    assert (r.key, r.on, r.all_of, r.any_of, r.n_of, r.sequence, r.within, r.expect) == (
        "data.partition",
        {},
        None,
        None,
        None,
        None,
        None,
        None,
    )
    assert (r.debounce, r.batch, r.concurrency, r.on_overlap) == (None, None, None, "queue")
    assert not r.correlated
    assert flow_control(r) == FlowControl(
        debounce=None,
        batch_max_events=None,
        batch_max_wait=None,
        concurrency=None,
        on_overlap="queue",
        priority=0,
    )
    assert correlator(r) is None


def test_rules_decode_from_json_with_nested_tables() -> None:
    raw = (
        b'{"name": "r", "pipeline": "p", "on": {"a": {"type": ["t"]}, "b": {"type": ["u"]}},'
        b' "n_of": {"n": 1, "of": ["a", "b"]}, "batch": {"max_wait": "1m"}}'
    )
    rule = msgspec.json.decode(raw, type=Rule)
    assert rule.n_of == NOf(n=1, of=["a", "b"])
    assert rule.batch == Batch(max_wait="1m")
    assert RuleSet.build([rule]).correlated[0].rule is rule


# --- flow control -------------------------------------------------------------------------


def test_flow_control_is_parsed(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    by_name = {r.name: r for r in ruleset.rules}
    copy = flow_control(by_name["orders-copy"])
    assert copy == FlowControl(
        debounce=timedelta(seconds=30),
        batch_max_events=None,
        batch_max_wait=None,
        concurrency=1,
        on_overlap="skip",
        priority=5,
    )
    assert copy.collects
    batches = flow_control(by_name["big-batches"])
    assert (batches.batch_max_events, batches.batch_max_wait, batches.on_overlap) == (
        100,
        timedelta(minutes=5),
        "cancel_running",
    )
    only_wait = Rule(name="w", pipeline="p", match={"type": ["t"]}, batch=Batch(max_wait="1h"))
    assert flow_control(only_wait).batch_max_events is None
    assert flow_control(only_wait).batch_max_wait == timedelta(hours=1)
    assert not flow_control(by_name["daily-rollup"]).collects


# --- problems -----------------------------------------------------------------------------

HEAD = '[[rule]]\nname = "r"\npipeline = "p"\n'
ON = 'on.orders = { data.dataset = ["o"] }\non.customers = { data.dataset = ["c"] }\n'
MATCH = 'match = { type = ["t"] }\n'
EXPECT_ORDERS = 'expect = { conditions = ["orders"], after = "1h" }\n'


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            ON + 'all_of = ["orders", "customers"]\nwithin = "two hours"\n',
            "within",
            "expected a duration like '2h', '30m', '1h30m', '45s', '1d', got 'two hours'",
        ),
        (
            ON + 'all_of = ["orders", "custmers"]\n',
            "all_of",
            "unknown condition 'custmers'; did you mean 'customers'? conditions are defined "
            "as [rule.on.NAME] patterns (defined: orders, customers)",
        ),
        (
            ON + 'any_of = ["orders"]\n',
            "on.customers",
            "condition 'customers' is defined but never used; name it in any_of or remove it",
        ),
        (
            ON + 'n_of = { n = 3, of = ["orders", "customers"] }\n',
            "n_of.n",
            "expected a whole number from 1 to 2 (the number of conditions in n_of.of), got 3",
        ),
        (
            ON + 'n_of = { n = 0, of = ["orders", "customers"] }\n',
            "n_of.n",
            "from 1 to 2",
        ),
        (
            ON + 'n_of = { n = "two", of = ["orders", "customers"] }\n',
            "n_of.n",
            "expected an integer, got 'two'",
        ),
        (
            ON + 'n_of = { m = 1, of = ["orders", "customers"] }\n',
            "n_of.m",
            "unknown key 'm' in n_of; known keys: n, of",
        ),
        (
            ON + 'sequence = ["orders", "customers", "orders"]\n',
            "sequence",
            "lists 'orders' more than once; name each condition once",
        ),
        (
            ON + 'all_of = ["orders"]\nany_of = ["customers"]\n',
            "any_of",
            "all_of and any_of are both given; a rule combines its conditions one way",
        ),
        (
            ON + 'all_of = ["orders", "customers"]\n' + EXPECT_ORDERS,
            "expect",
            "all_of and expect are both given",
        ),
        (
            ON + 'expect = { conditions = ["orders"] }\n',
            "expect",
            "give exactly one of after (a duration after the first related event",
        ),
        (
            ON + 'expect = { conditions = ["orders"], after = "1h", by = "02:00" }\n',
            "expect",
            "give exactly one of after",
        ),
        (
            ON + 'expect = { conditions = ["orders"], by = "2am" }\n',
            "expect.by",
            "expected a time of day as 'HH:MM' (24-hour), e.g. '02:00', got '2am'",
        ),
        (
            ON + 'expect = { conditions = ["orders"], by = "02:00", timezone = "Europe/Pariss" }\n',
            "expect.timezone",
            "unknown time zone 'Europe/Pariss'; did you mean 'Europe/Paris'?",
        ),
        (
            ON + 'expect = { conditions = ["orders"], after = "1h", timezone = "UTC" }\n',
            "expect.timezone",
            "timezone applies to expect.by only; remove it",
        ),
        (
            ON + 'expect = { conditions = ["ordres"], after = "1h" }\n',
            "expect.conditions",
            "unknown condition 'ordres'; did you mean 'orders'?",
        ),
        (
            'on.orders = { data.dataset = ["o"] }\n' + EXPECT_ORDERS,
            "expect.conditions",
            "every condition in 'on' is expected, so the first event would satisfy the watch",
        ),
        (
            ON + 'expect = { conditions = ["orders"], after = "soon" }\n',
            "expect.after",
            "expected a duration like '2h'",
        ),
        (MATCH + "batch = { max_events = 0 }\n", "batch.max_events", "at least 1, got 0"),
        (MATCH + "batch = {}\n", "batch", "give max_events, max_wait or both"),
        (MATCH + 'batch = { max_wait = "5 min" }\n', "batch.max_wait", "expected a duration"),
        (
            MATCH + 'debounce = "30s"\nbatch = { max_events = 5 }\n',
            "batch",
            "debounce and batch both collect a key's events into one run; keep one",
        ),
        (MATCH + 'debounce = "30"\n', "debounce", "expected a duration like '2h'"),
        (
            MATCH + "concurrency = 0\n",
            "concurrency",
            "expected a whole number of at least 1, got 0; leave it out for no limit",
        ),
        (
            MATCH + 'on_overlap = "cancel"\n',
            "on_overlap",
            "expected one of 'queue', 'skip', 'cancel_running', got 'cancel'; did you mean "
            "'cancel_running'?",
        ),
        (
            MATCH + 'key = "data..partition"\n',
            "key",
            "expected a dotted path into the event like 'data.partition', got 'data..partition'",
        ),
        (MATCH + 'key = ""\n', "key", "expected a dotted path"),
        (
            MATCH + 'params = { day = "{data.partition" }\n',
            "params.day",
            "the '{' at position 0 opens a placeholder that is never closed; write '{{'",
        ),
        (
            MATCH + 'params = { paths = ["ok", "{data partition}"] }\n',
            "params.paths[1]",
            "placeholder {data partition} is not a dotted path",
        ),
        (
            MATCH + 'params = { nested = { a = "}" } }\n',
            "params.nested.a",
            "a single '}' at position 0; write '}}' for a literal brace",
        ),
        (
            MATCH + 'within = "2h"\n',
            "within",
            "within is the window of a correlated rule; add conditions",
        ),
        (
            'all_of = ["orders"]\n',
            "on",
            "all_of refers to conditions, so define them: [rule.on.NAME] tables",
        ),
        (ON, "on", "conditions need a way to combine them: add one of all_of, any_of"),
        (
            'all_of = ["orders"]\non.orders = "sales.orders"\n',
            "on.orders",
            "expected a pattern (a table of event fields), got 'sales.orders'",
        ),
        (
            'all_of = ["orders"]\non.orders = {}\n',
            "on.orders",
            "the pattern is empty, so every event would satisfy the condition",
        ),
        (
            'all_of = ["orders"]\non.orders = { data.rows = [{ numeric = [">"] }] }\n',
            "on.orders.data.rows",
            "numeric expects operator/number pairs",
        ),
        (
            ON + 'all_of = ["orders", "customers"]\nmatch = { a = [{ exists = "no" }] }\n',
            "match.a",
            "exists expects true or false",
        ),
        (ON + 'all_of = "orders"\n', "all_of", "expected a list of strings, got 'orders'"),
        (ON + "all_of = []\n", "all_of", 'expected at least one condition name, e.g. ["orders"]'),
        (
            'pipeline2 = "x"\n',
            "match",
            "missing required key 'match' (the pattern that selects events); or define "
            "conditions with on + all_of",
        ),
    ],
)
def test_problems_name_file_rule_and_field(
    tmp_path: Path, body: str, field: str, message: str
) -> None:
    if body.startswith("pipeline2"):  # a rule with nothing but name and pipeline
        body = ""
    path = write(tmp_path, HEAD + body)
    problems = check_rules([path])
    rendered = [str(p).replace(str(path), "rules.toml") for p in problems]
    wanted = f"rules.toml: rule 'r' field '{field}': "
    assert any(r.startswith(wanted) and message in r for r in rendered), rendered
    with pytest.raises(RuleError) as info:
        load_rules([path])
    assert (info.value.file, info.value.rule) == (str(path), "r")


def test_check_reports_all_problems_of_a_correlated_rule(tmp_path: Path) -> None:
    body = ON + 'all_of = ["orders", "nope"]\nwithin = "soon"\nconcurrency = 0\non_overlap = "x"\n'
    path = write(tmp_path, HEAD + body)
    fields = [p.field for p in check_rules([path])]
    assert fields == ["all_of", "within", "on.customers", "concurrency", "on_overlap"]


def test_type_problems_still_report_pattern_problems(tmp_path: Path) -> None:
    body = 'all_of = ["a"]\nconcurrency = "one"\non.a = { x = [{ exists = 1 }] }\n'
    path = write(tmp_path, HEAD + body)
    fields = [p.field for p in check_rules([path])]
    assert fields == ["concurrency", "on.a.x"]


def test_python_built_rules_are_held_to_the_same_checks() -> None:
    on = {"a": {"type": ["t"]}}
    with pytest.raises(RuleError, match=r"rule 'r' field 'n_of.n': expected a whole number"):
        RuleSet.build([Rule(name="r", pipeline="p", on=on, n_of=NOf(n=2, of=["a"]))])
    with pytest.raises(RuleError, match=r"rule 'r' field 'within': expected a duration"):
        correlator(Rule(name="r", pipeline="p", on=on, any_of=["a"], within="1 hour"))
    with pytest.raises(RuleError, match=r"rule 'r' field 'match': match is empty"):
        RuleSet.build([Rule(name="r", pipeline="p")])
    with pytest.raises(RuleError, match=r"field 'all_of': expected a list of condition names"):
        RuleSet.build([Rule(name="r", pipeline="p", on=on, all_of="a")])  # type: ignore[arg-type]


# --- RuleSet: match, correlate, explain -----------------------------------------------------


def test_match_ignores_correlated_rules_and_correlate_finds_them(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    orders = event("sales.orders")
    assert names(ruleset.match(orders)) == ["orders-copy", "big-batches"]
    found = [(c.rule.name, key, conds) for c, key, conds in ruleset.correlate(orders)]
    assert found == [
        ("daily-rollup", "2026-11-24", ["orders"]),
        ("orders-late", "2026-11-24", ["orders"]),
        ("nightly", "2026-11-24", ["orders"]),
    ]
    # the correlation key comes from the rule: etl keys on data.attributes.run
    raw = event("raw", attributes={"run": "r-7", "kind": "c"})
    found = [(c.rule.name, key, conds) for c, key, conds in ruleset.correlate(raw)]
    assert found == [("two-of-three", "2026-11-24", ["c"]), ("etl", "r-7", ["extract"])]
    # no key: the event contributes nothing
    assert ruleset.correlate({"data": {"dataset": "sales.orders"}}) == []
    assert ruleset.correlate(event("unknown")) == []


def test_correlate_agrees_with_testing_every_correlated_rule(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    events = [
        event("sales.orders"),
        event("a"),
        event("b", attributes={"kind": "c"}),
        {**event("a"), "source": "test://"},
        {"data": [{"dataset": "sales.orders", "partition": "p"}], "source": "prod://"},
        {"data": {"dataset": ["a", "b"], "partition": "p"}, "source": "prod://"},
        {"type": "data.arrived"},
    ]
    for e in events:
        expected = []
        for corr in ruleset.correlated:
            conditions = corr.conditions(e)
            key = corr.rule.key
            value: Any = e
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if conditions and isinstance(value, str):
                expected.append((corr.rule.name, value, conditions))
        got = [(c.rule.name, k, conds) for c, k, conds in ruleset.correlate(e)]
        assert got == expected, e


def test_disabled_correlated_rules_do_not_correlate() -> None:
    on = {"a": {"data": {"dataset": ["a"]}}}
    ruleset = RuleSet.build([Rule(name="off", pipeline="p", on=on, any_of=["a"], enabled=False)])
    assert ruleset.correlated == ()
    assert ruleset.correlate(event("a")) == []
    assert ruleset.explain(event("a")) == [
        Explanation("off", False, "rule is disabled (enabled = false)")
    ]


def test_explain_covers_correlated_rules(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    by_rule = {e.rule: e for e in ruleset.explain(event("sales.orders"))}
    assert by_rule["daily-rollup"] == Explanation(
        "daily-rollup", True, "contributes condition 'orders' for key '2026-11-24' (all_of)"
    )
    assert by_rule["orders-late"].reason == (
        "contributes condition 'orders' for key '2026-11-24' (expect)"
    )
    assert by_rule["two-of-three"] == Explanation(
        "two-of-three",
        False,
        "meets no condition (a: data.dataset: 'sales.orders' is not one of ['a']; "
        "b: data.dataset: 'sales.orders' is not one of ['b']; "
        "c: data.attributes.kind: field is missing; expected one of ['c'])",
    )
    assert by_rule["orders-copy"] == Explanation("orders-copy", True, "matched")
    no_key = ruleset.explain({"data": {"dataset": "sales.orders"}, "source": "prod://"})
    assert no_key[0] == Explanation(
        "daily-rollup",
        False,
        "meets condition 'orders' but the key data.partition is missing, so it contributes nothing",
    )
    filtered = {e.rule: e for e in ruleset.explain({**event("a"), "source": "test://"})}
    assert filtered["two-of-three"].reason.startswith("does not pass match: source:")
    for e in [event("sales.orders"), event("raw", attributes={"run": "x"})]:
        explained = [x.rule for x in ruleset.explain(e) if x.matched]
        simple = names(ruleset.match(e))
        correlated = [c.rule.name for c, _, _ in ruleset.correlate(e)]
        assert sorted(explained) == sorted(simple + correlated)


def test_repr_counts_correlated_rules(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    # two-of-three has a condition on data.attributes: every event must try it
    assert repr(ruleset).endswith("; 5 correlated (1 unindexed)>")


def random_correlated(rng: random.Random, i: int) -> Rule:
    datasets = ["a", "b", "c", "d"]

    def pattern() -> dict[str, Any]:
        roll = rng.randrange(5)
        data: dict[str, Any] = {}
        if roll <= 2:
            data["dataset"] = rng.sample(datasets, rng.randrange(1, 3))
        elif roll == 3:
            data["dataset"] = [{"prefix": rng.choice(datasets)}]
        if rng.random() < 0.4 or not data:
            data["rows"] = [{"numeric": [">", rng.randrange(0, 5)]}]
        if rng.random() < 0.2:
            data["$or"] = [{"rows": [1]}, {"partition": [{"exists": True}]}]
        return {"data": data}

    names = [f"c{j}" for j in range(rng.randrange(1, 4))]
    match: dict[str, Any] = {}
    if rng.random() < 0.3:
        match = {"data": {"dataset": rng.sample(datasets, 2)}}
    elif rng.random() < 0.2:
        match = {"type": ["data.arrived"]}
    return Rule(
        name=f"r{i}",
        pipeline="p",
        on={n: pattern() for n in names},
        all_of=names,
        match=match,
        key=rng.choice(["data.partition", "data.rows"]),
        enabled=rng.random() > 0.1,
    )


def random_view(rng: random.Random) -> dict[str, Any]:
    def data() -> dict[str, Any]:
        d: dict[str, Any] = {}
        if rng.random() < 0.9:
            d["dataset"] = rng.choice(["a", "b", "c", "d", "ab", "e"])
        if rng.random() < 0.7:
            d["rows"] = rng.randrange(0, 6)
        if rng.random() < 0.7:
            d["partition"] = rng.choice(["p1", "p2"])
        return d

    event: dict[str, Any] = {"type": rng.choice(["data.arrived", "other"])}
    shape = rng.randrange(10)
    if shape < 7:
        event["data"] = data()
    elif shape == 7:
        event["data"] = {**data(), "dataset": ["a", "b"]}
    elif shape == 8:
        event["data"] = [data(), data()]
    return event


def test_the_correlated_index_agrees_with_testing_every_rule() -> None:
    rng = random.Random(11)
    for _ in range(20):
        ruleset = RuleSet.build([random_correlated(rng, i) for i in range(30)])
        for _ in range(200):
            view = random_view(rng)
            expected = []
            for corr in ruleset.correlated:
                conditions = corr.conditions(view)
                key = key_of(corr.rule, view)
                if conditions and key is not None:
                    expected.append((corr.rule.name, key, conditions))
            got = [(c.rule.name, k, conds) for c, k, conds in ruleset.correlate(view)]
            assert got == expected, view
