"""``params`` templates and correlation keys: dotted paths into the event."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.triggers import Rule, key_of, render_params
from orchestrator.triggers.templates import template_problem

EVENT: dict[str, Any] = {
    "type": "data.arrived",
    "data": {
        "dataset": "sales.orders",
        "partition": "2026-11-24",
        "rows": 10,
        "ratio": 0.5,
        "late": False,
        "attributes": {"region": "eu-west"},
        "files": ["a.csv", "b.csv"],
        "nothing": None,
    },
}


def test_whole_value_placeholders_keep_the_type() -> None:
    params = {
        "day": "{data.partition}",
        "rows": "{data.rows}",
        "ratio": "{data.ratio}",
        "late": "{data.late}",
        "attributes": "{data.attributes}",
        "files": "{data.files}",
        "first": "{data.files.0}",
        "missing": "{data.nope}",
        "null": "{data.nothing}",
    }
    assert render_params(params, EVENT) == {
        "day": "2026-11-24",
        "rows": 10,
        "ratio": 0.5,
        "late": False,
        "attributes": {"region": "eu-west"},
        "files": ["a.csv", "b.csv"],
        "first": "a.csv",
        "missing": None,
        "null": None,
    }


def test_placeholders_inside_strings_are_written_out() -> None:
    params = {
        "path": "s3://lake/{data.dataset}/{data.partition}/",
        "summary": "{data.rows} rows, late={data.late}, ratio {data.ratio}",
        "region": "[{data.attributes.region}]",
        "gone": "x{data.nope}y{data.nothing}z",
        "files": "{data.files}!",
    }
    assert render_params(params, EVENT) == {
        "path": "s3://lake/sales.orders/2026-11-24/",
        "summary": "10 rows, late=false, ratio 0.5",
        "region": "[eu-west]",
        "gone": "xyz",
        "files": '["a.csv","b.csv"]!',
    }


def test_templates_reach_into_lists_and_tables_and_leave_other_values() -> None:
    params = {
        "source": "rollup",
        "n": 3,
        "flag": True,
        "list": ["{data.partition}", 1, ["{data.rows}"]],
        "table": {"day": "{data.partition}", "{data.rows}": "key is not templated"},
    }
    assert render_params(params, EVENT) == {
        "source": "rollup",
        "n": 3,
        "flag": True,
        "list": ["2026-11-24", 1, [10]],
        "table": {"day": "2026-11-24", "{data.rows}": "key is not templated"},
    }


def test_doubled_braces_are_literal() -> None:
    params = {
        "json": '{{"day": "{data.partition}"}}',
        "literal": "{{data.partition}}",
        "open": "{{",
    }
    assert render_params(params, EVENT) == {
        "json": '{"day": "2026-11-24"}',
        "literal": "{data.partition}",
        "open": "{",
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{}", "placeholder {} is not a dotted path"),
        ("{data partition}", "placeholder {data partition} is not a dotted path"),
        ("{data..partition}", "is not a dotted path"),
        ("{data.partition:>10}", "is not a dotted path"),
        ("day {data.partition", "the '{' at position 4 opens a placeholder that is never closed"),
        ("a}b", "a single '}' at position 1; write '}}' for a literal brace"),
    ],
)
def test_malformed_templates(text: str, problem: str) -> None:
    found = template_problem(text)
    assert found is not None
    assert problem in found
    with pytest.raises(ValueError, match=r"never closed|not a dotted path|single"):
        render_params({"x": text}, EVENT)


def test_well_formed_templates_have_no_problem() -> None:
    for text in ("plain", "", "{data.partition}", "{{}}", "a {x} b {y.z-1}"):
        assert template_problem(text) is None


def rule(key: str = "data.partition") -> Rule:
    return Rule(name="r", pipeline="p", match={"type": ["t"]}, key=key)


def test_key_of() -> None:
    assert key_of(rule(), EVENT) == "2026-11-24"
    assert key_of(rule("data.dataset"), EVENT) == "sales.orders"
    assert key_of(rule("data.rows"), EVENT) == "10"
    assert key_of(rule("data.ratio"), EVENT) == "0.5"
    assert key_of(rule("data.late"), EVENT) == "false"
    assert key_of(rule("data.files.1"), EVENT) == "b.csv"
    for absent in ("data.nope", "data.nothing", "data.attributes", "data.files", "x.y"):
        assert key_of(rule(absent), EVENT) is None, absent
    assert key_of(rule(), {"data": "not an object"}) is None
