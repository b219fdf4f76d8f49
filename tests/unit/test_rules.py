"""Rules, rule sets and rules files: matching order, explanations, and problems that name
the file, the rule and the field."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestrator import triggers
from orchestrator.errors import RuleError
from orchestrator.events import Arrival, CloudEvent, new_arrival
from orchestrator.triggers import (
    Explanation,
    Rule,
    RuleProblem,
    RuleSet,
    check_rules,
    event_to_dict,
    load_rules,
)

EXAMPLE = """
[[rule]]
name = "orders-rollup"
pipeline = "orders"
priority = 5
params = { target = "warehouse" }
[rule.match]
type = ["data.arrived"]
data.dataset = ["demo.orders"]            # TOML dotted keys make nesting
data.rows = [{ numeric = [">", 0, "<=", 1000] }]
data.attributes.region = [{ prefix = "eu" }, "us"]

[[rule]]
name = "customers"
pipeline = "crm"
description = "any customer drop"
match = { data = { dataset = "demo.customers" } }

[[rule]]
name = "everything-eu"
pipeline = "audit"
enabled = true
[rule.match]
data.attributes.region = [{ prefix = "eu" }]
"""


def event(dataset: str = "demo.orders", **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "e-1",
        "source": "test://",
        "type": "data.arrived",
        "time": "2026-11-24T10:00:00Z",
        "data": {"dataset": dataset, **data},
    }


def write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def names(rules: list[Rule]) -> list[str]:
    return [r.name for r in rules]


def rule(name: str, match: dict[str, Any], **kwargs: Any) -> Rule:
    return Rule(name=name, pipeline=kwargs.pop("pipeline", "p"), match=match, **kwargs)


# --- public surface -----------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    assert sorted(triggers.__all__) == [
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
    for name in triggers.__all__:
        assert getattr(triggers, name) is not None


def test_rule_defaults_and_strictness() -> None:
    r = Rule(name="r", pipeline="p", match={"type": ["t"]})
    assert (r.priority, r.params, r.description, r.enabled) == (0, {}, "", True)
    with pytest.raises(AttributeError):
        r.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Rule("r", "p", {"type": ["t"]})  # type: ignore[call-arg]
    decoded = msgspec.json.decode(
        b'{"name": "r", "pipeline": "p", "match": {"type": ["t"]}}', type=Rule
    )
    assert decoded == r
    with pytest.raises(msgspec.ValidationError, match="unknown field `windw`"):
        msgspec.json.decode(b'{"name": "r", "pipeline": "p", "match": {}, "windw": 1}', type=Rule)


# --- event_to_dict ------------------------------------------------------------------------


def test_event_to_dict_is_the_envelope_with_nested_data() -> None:
    ce = CloudEvent(
        specversion="1.0",
        id="1",
        source="s",
        type="data.arrived",
        time=datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
        subject="demo.orders/2026-11-24",
        data=Arrival(
            dataset="demo.orders", partition="2026-11-24", rows=10, attributes={"region": "eu"}
        ),
    )
    assert event_to_dict(ce) == {
        "specversion": "1.0",
        "id": "1",
        "source": "s",
        "type": "data.arrived",
        "time": "2026-11-24T10:00:00Z",
        "subject": "demo.orders/2026-11-24",
        "data": {
            "dataset": "demo.orders",
            "partition": "2026-11-24",
            "rows": 10,
            "attributes": {"region": "eu"},
        },
    }


def test_unset_fields_are_absent_so_exists_false_matches_them() -> None:
    view = event_to_dict(new_arrival("demo.orders"))
    assert "partition" not in view["data"]
    assert "attributes" not in view["data"]
    ruleset = RuleSet.build([rule("daily", {"data": {"partition": [{"exists": False}]}})])
    assert names(ruleset.match(view)) == ["daily"]
    assert ruleset.match(event_to_dict(new_arrival("demo.orders", partition="p1"))) == []


# --- RuleSet ------------------------------------------------------------------------------


def test_match_returns_rules_in_file_order_across_index_families() -> None:
    rules = [
        rule("unindexed", {"source": [{"prefix": "test"}]}),
        rule("by-type", {"type": ["data.arrived"]}),
        rule("by-dataset", {"data": {"dataset": ["demo.orders"]}}),
        rule("by-prefix", {"data": {"dataset": [{"prefix": "demo."}]}}),
        rule("other-dataset", {"data": {"dataset": ["demo.customers"]}}),
        rule("by-dataset-and-prefix", {"data": {"dataset": ["demo.orders", {"prefix": "d"}]}}),
    ]
    ruleset = RuleSet.build(rules)
    assert len(ruleset) == 6
    assert names(ruleset.match(event())) == [
        "unindexed",
        "by-type",
        "by-dataset",
        "by-prefix",
        "by-dataset-and-prefix",
    ]
    assert names(ruleset.match(event("demo.customers"))) == [
        "unindexed",
        "by-type",
        "by-prefix",
        "other-dataset",
        "by-dataset-and-prefix",
    ]
    assert names(ruleset.match({"type": "x", "data": {"dataset": "zzz"}})) == []


def test_indexed_rules_still_check_their_other_clauses() -> None:
    ruleset = RuleSet.build(
        [
            rule(
                "big-orders",
                {
                    "type": ["data.arrived"],
                    "data": {"dataset": ["demo.orders"], "rows": [{"numeric": [">", 100]}]},
                },
            ),
            rule("typed", {"type": ["data.arrived"], "source": ["elsewhere"]}),
        ]
    )
    assert names(ruleset.match(event(rows=101))) == ["big-orders"]
    assert ruleset.match(event(rows=100)) == []
    assert ruleset.match({**event(rows=101), "type": "data.deleted"}) == []
    assert names(ruleset.match({**event(), "source": "elsewhere"})) == ["typed"]


def test_disabled_rules_never_match_but_are_explained() -> None:
    ruleset = RuleSet.build(
        [
            rule("off", {"type": ["data.arrived"]}, enabled=False),
            rule("on", {"type": ["data.arrived"]}),
        ]
    )
    assert names(ruleset.match(event())) == ["on"]
    assert ruleset.explain(event())[0] == Explanation(
        "off", False, "rule is disabled (enabled = false)"
    )


def test_unusual_event_shapes_go_through_full_patterns() -> None:
    ruleset = RuleSet.build(
        [
            rule("a", {"data": {"dataset": ["a"], "rows": [1]}}),
            rule("b", {"data": {"dataset": ["b"]}}),
            rule("t", {"type": ["x", "y"]}),
        ]
    )
    # several datasets in one event: any of them
    assert names(ruleset.match({"data": {"dataset": ["b", "a"], "rows": 1}})) == ["a", "b"]
    # data as a list: fields of ONE element must match together (EventBridge arrays)
    split = {"data": [{"dataset": "a", "rows": 2}, {"dataset": "b", "rows": 1}]}
    assert names(ruleset.match(split)) == ["b"]
    together = {"data": [{"dataset": "a", "rows": 1}]}
    assert names(ruleset.match(together)) == ["a"]
    assert names(ruleset.match({"type": ["y", "z"]})) == ["t"]
    assert ruleset.match({}) == []
    assert ruleset.match({"data": "scalar", "type": 5}) == []


def test_explain_agrees_with_match_and_names_the_failing_clause() -> None:
    ruleset = RuleSet.build(
        [
            rule("orders", {"data": {"dataset": ["demo.orders"]}}),
            rule("eu", {"data": {"attributes": {"region": [{"prefix": "eu"}]}}}),
        ]
    )
    view = event("demo.customers", attributes={"region": "eu-west"})
    explanations = ruleset.explain(view)
    assert explanations == [
        Explanation(
            "orders", False, "data.dataset: 'demo.customers' is not one of ['demo.orders']"
        ),
        Explanation("eu", True, "matched"),
    ]
    assert [e.rule for e in explanations if e.matched] == names(ruleset.match(view))


def test_build_rejects_bad_rules_naming_rule_and_field() -> None:
    with pytest.raises(RuleError) as info:
        RuleSet.build([rule("daily", {"data": {"rows": [{"numeric": [">", 0, "<="]}]}})])
    assert info.value.rule == "daily"
    assert info.value.field == "match.data.rows"
    assert str(info.value).startswith("rule 'daily' field 'match.data.rows': numeric expects")
    with pytest.raises(RuleError, match="rule 'x' field 'match': match is empty"):
        RuleSet.build([rule("x", {})])
    with pytest.raises(RuleError, match=r"rule 'x' field 'name': .* must be unique"):
        RuleSet.build([rule("x", {"type": ["a"]}), rule("x", {"type": ["b"]})])
    with pytest.raises(RuleError, match=r"rule #1 field 'name': expected a non-empty name"):
        RuleSet.build([rule("", {"type": ["a"]})])
    with pytest.raises(RuleError, match="field 'pipeline': expected a pipeline name"):
        RuleSet.build([rule("x", {"type": ["a"]}, pipeline="")])


def test_empty_ruleset() -> None:
    assert len(RuleSet()) == 0
    assert RuleSet.build([]).match(event()) == []


# --- load_rules ---------------------------------------------------------------------------


def test_load_the_documented_example(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, EXAMPLE)])
    first = ruleset.rules[0]
    assert first == Rule(
        name="orders-rollup",
        pipeline="orders",
        priority=5,
        params={"target": "warehouse"},
        match={
            "type": ["data.arrived"],
            "data": {
                "dataset": ["demo.orders"],
                "rows": [{"numeric": [">", 0, "<=", 1000]}],
                "attributes": {"region": [{"prefix": "eu"}, "us"]},
            },
        },
    )
    assert ruleset.rules[1].description == "any customer drop"
    eu_orders = event(rows=10, attributes={"region": "eu-west"})
    assert names(ruleset.match(eu_orders)) == ["orders-rollup", "everything-eu"]
    assert names(ruleset.match(event(rows=10, attributes={"region": "us"}))) == ["orders-rollup"]
    assert names(ruleset.match(event(rows=0, attributes={"region": "us"}))) == []
    assert names(ruleset.match(event("demo.customers"))) == ["customers"]


def test_several_files_keep_their_order(tmp_path: Path) -> None:
    a = write(tmp_path, '[[rule]]\nname="a"\npipeline="p"\nmatch={type=["t"]}\n', "a.toml")
    b = write(tmp_path, '[[rule]]\nname="b"\npipeline="p"\nmatch={type=["t"]}\n', "b.toml")
    assert names(load_rules([b, a]).match({"type": "t"})) == ["b", "a"]
    assert len(load_rules([])) == 0


@pytest.mark.parametrize(
    ("text", "rule_label", "field", "message"),
    [
        (
            '[[rule]]\nname="daily"\npipeline="p"\nmatch={data={rows=[{numeric=[">",0,"<="]}]}}',
            "daily",
            "match.data.rows",
            "rules.toml: rule 'daily' field 'match.data.rows': numeric expects",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\nwindow="2h"\nmatch={type=["t"]}',
            "r",
            "window",
            "rules.toml: rule 'r' field 'window': unknown key 'window'; known keys: name",
        ),
        (
            '[[rule]]\nname="r"\npipline="p"\nmatch={type=["t"]}',
            "r",
            "pipline",
            "unknown key 'pipline'; did you mean 'pipeline'?",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\nmatch={}',
            "r",
            "match",
            "rule 'r' field 'match': match is empty, so the rule would fire on every event",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\npriority="high"\nmatch={type=["t"]}',
            "r",
            "priority",
            "field 'priority': expected an integer, got 'high'",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\nenabled=1\nmatch={type=["t"]}',
            "r",
            "enabled",
            "expected true or false, got 1",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\nmatch="everything"',
            "r",
            "match",
            "field 'match': expected a table, got 'everything'",
        ),
        (
            '[[rule]]\nname="r"\nmatch={type=["t"]}',
            "r",
            "pipeline",
            "rule 'r' field 'pipeline': missing required key 'pipeline'",
        ),
        (
            '[[rule]]\nname="a"\npipeline="p"\nmatch={type=["t"]}\n'
            '[[rule]]\npipeline="p"\nmatch={type=["t"]}',
            "#2",
            "name",
            "rules.toml: rule #2 field 'name': missing required key 'name'",
        ),
        (
            '[[rule]]\nname="r"\npipeline="p"\nmatch={rows={ numeric = [">", 0] }}',
            "r",
            "match.rows",
            "rules.toml: rule 'r' field 'match.rows': 'numeric' is an operator, so it goes "
            "inside the value list: rows = [{ numeric = ... }]",
        ),
        (
            '[[rule]]\nname="a"\npipeline="p"\nmatch={type=["t"]}\n'
            '[[rule]]\nname="a"\npipeline="q"\nmatch={type=["u"]}',
            "a",
            "name",
            "the name 'a' is already used by a rule earlier in this file",
        ),
        (
            '[rule]\nname="a"\npipeline="p"\nmatch={type=["t"]}',
            "",
            "",
            "rules.toml: 'rule' is a single table; write each rule as [[rule]], not [rule]",
        ),
        (
            '[[rules]]\nname="a"\npipeline="p"\nmatch={type=["t"]}',
            "",
            "rules",
            "rules.toml: field 'rules': unknown top-level key 'rules'; rules go in [[rule]]",
        ),
        ("[[rule]\nname=", "", "", "rules.toml: is not valid TOML: "),
    ],
)
def test_load_errors_name_file_rule_and_field(
    tmp_path: Path, text: str, rule_label: str, field: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        load_rules([path])
    err = info.value
    assert (err.file, err.rule, err.field) == (str(path), rule_label, field)
    rendered = str(err).replace(str(path), "rules.toml")
    assert message in rendered, rendered


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(RuleError, match=r"nope\.toml: cannot read the rules file: No such file"):
        load_rules([missing])


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    text = '[[rule]]\nname="a"\npipeline="p"\nmatch={type=["t"]}\n'
    first, second = write(tmp_path, text, "a.toml"), write(tmp_path, text, "b.toml")
    with pytest.raises(RuleError, match=f"b.toml: rule 'a' field 'name': .* in {first}"):
        load_rules([first, second])


# --- check_rules --------------------------------------------------------------------------


def test_check_reports_every_problem_in_order(tmp_path: Path) -> None:
    text = """
[[rule]]
name = "daily"
pipeline = "rollup"
match = { data = { rows = [{ numeric = [">", 0, "<="] }], region = [{ prefix = 5 }] } }

[[rule]]
pipeline = "nope"
colour = "red"
match = { type = ["t"] }

[[rule]]
name = "ok"
pipeline = "rollup"
match = { type = ["t"] }

[[rule]]
name = "ok"
pipeline = "rolup"
match = { type = ["t"] }
"""
    path = write(tmp_path, text)
    problems = check_rules([path], pipelines={"rollup", "publish"})
    rendered = [str(p).replace(str(path), "rules.toml") for p in problems]
    assert rendered == [
        "rules.toml: rule 'daily' field 'match.data.rows': numeric expects operator/number "
        'pairs like ["<", 10] or [">", 0, "<=", 5] (operators =, <, <=, >, >=), got an odd '
        "number of items (3): ['>', 0, '<=']",
        "rules.toml: rule 'daily' field 'match.data.region': prefix expects a string or "
        '{ equals-ignore-case = "..." }, got number 5',
        "rules.toml: rule #2 field 'colour': unknown key 'colour'; known keys: name, pipeline, "
        "match, priority, params, description, enabled, key, on, all_of, any_of, n_of, "
        "sequence, within, expect, debounce, batch, concurrency, on_overlap, contract",
        "rules.toml: rule #2 field 'name': missing required key 'name'",
        "rules.toml: rule #2 field 'pipeline': unknown pipeline 'nope'; known pipelines: "
        "publish, rollup",
        "rules.toml: rule 'ok' field 'pipeline': unknown pipeline 'rolup'; did you mean 'rollup'?",
    ]
    assert problems[0] == RuleProblem(
        file=str(path),
        rule="daily",
        field="match.data.rows",
        message=problems[0].message,
    )


def test_check_clean_files_and_pipelines(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    assert check_rules([path]) == []
    assert check_rules([path], pipelines={"orders", "crm", "audit"}) == []
    problems = check_rules([path], pipelines=set())
    assert problems[0].message == ("unknown pipeline 'orders'; no pipelines are configured")


def test_check_and_load_see_the_same_first_problem(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nname="x"\npipeline="p"\nmatch={a=[{exists="no"}]}')
    (problem,) = check_rules([path])
    with pytest.raises(RuleError) as info:
        load_rules([path])
    assert str(info.value) == str(problem)
    assert str(problem).endswith("field 'match.a': exists expects true or false, got string 'no'")
