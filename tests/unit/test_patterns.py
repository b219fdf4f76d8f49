"""Event patterns: EventBridge's documented examples, operator by operator, and bad patterns.

The sample event and most patterns are the ones Amazon documents for EventBridge content
filtering (and its open-source engine, Event Ruler); each operator is checked for what it
matches and for what it does not.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.errors import RuleError
from orchestrator.triggers import CompiledPattern, compile_pattern

EC2_EVENT: dict[str, Any] = {
    "version": "0",
    "id": "ddddd4-aaaa-7777-4444-345dd43cc333",
    "detail-type": "EC2 Instance State-change Notification",
    "source": "aws.ec2",
    "account": "012345679012",
    "time": "2017-10-02T16:24:49Z",
    "region": "us-east-1",
    "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-000000aaaaaa00000"],
    "detail": {
        "c-count": 5,
        "d-count": 3,
        "x-limit": 301.8,
        "source-ip": "10.0.0.33",
        "instance-id": "i-000000aaaaaa00000",
        "state": "running",
    },
}


def matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """Match through the generated function, and check the reference tree and explain()
    agree with it, so every test below also tests code generation."""
    compiled = compile_pattern(pattern)
    result = compiled.matches(event)
    assert compiled.reference(event) is result
    assert (compiled.explain(event) is None) is result
    return result


def detail(**fields: Any) -> dict[str, Any]:
    return {"detail": fields}


def error(pattern: Any) -> RuleError:
    with pytest.raises(RuleError) as info:
        compile_pattern(pattern, where="match")
    return info.value


# --- exact values, lists, AND ------------------------------------------------------------


def test_documented_simple_match() -> None:
    pattern = {
        "detail-type": ["EC2 Instance State-change Notification"],
        "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-000000aaaaaa00000"],
        "detail": {"state": ["initializing", "running"]},
    }
    assert matches(pattern, EC2_EVENT)
    assert not matches({**pattern, "detail": {"state": ["initializing"]}}, EC2_EVENT)


def test_every_field_must_match() -> None:
    assert matches({"source": ["aws.ec2"], "region": ["us-east-1"]}, EC2_EVENT)
    assert not matches({"source": ["aws.ec2"], "region": ["eu-west-1"]}, EC2_EVENT)


def test_event_array_matches_when_any_element_matches() -> None:
    event = {"resources": ["arn:a", "arn:b"]}
    assert matches({"resources": ["arn:b", "arn:z"]}, event)
    assert not matches({"resources": ["arn:z"]}, event)


def test_exact_values_are_typed() -> None:
    assert matches(detail(**{"c-count": [5]}), EC2_EVENT)
    assert matches(detail(**{"c-count": [5.0]}), EC2_EVENT)  # numbers compare by value
    assert not matches(detail(**{"c-count": ["5"]}), EC2_EVENT)
    assert not matches({"flag": [1]}, {"flag": True})
    assert matches({"flag": [True]}, {"flag": True})
    assert not matches({"flag": [True]}, {"flag": 1})
    assert not matches({"flag": [False]}, {"flag": 0})


def test_null_and_empty_string_are_not_interchangeable() -> None:
    event = {"detail": {"eventVersion": "", "responseElements": None}}
    assert matches({"detail": {"eventVersion": [""]}}, event)
    assert matches({"detail": {"responseElements": [None]}}, event)
    assert not matches({"detail": {"eventVersion": [None]}}, event)
    assert not matches({"detail": {"responseElements": [""]}}, event)


def test_scalar_is_accepted_as_one_element_list() -> None:
    assert matches({"source": "aws.ec2"}, EC2_EVENT)
    assert not matches({"source": "aws.s3"}, EC2_EVENT)


def test_missing_field_and_object_value_do_not_match_values() -> None:
    assert not matches({"nothing": ["x"]}, EC2_EVENT)
    assert not matches({"detail": ["running"]}, EC2_EVENT)  # an object is not a value


def test_nested_pattern_against_a_scalar_does_not_match() -> None:
    assert not matches({"source": {"name": ["aws.ec2"]}}, EC2_EVENT)


# --- prefix / suffix / equals-ignore-case / wildcard --------------------------------------


def test_prefix() -> None:
    assert matches({"time": [{"prefix": "2017-10-02"}]}, EC2_EVENT)
    assert not matches({"time": [{"prefix": "2017-10-03"}]}, EC2_EVENT)
    assert not matches(detail(**{"c-count": [{"prefix": "5"}]}), EC2_EVENT)  # strings only


def test_prefix_equals_ignore_case() -> None:
    pattern = {"detail": {"service": [{"prefix": {"equals-ignore-case": "EventB"}}]}}
    for service in ("EventBridge", "EVENTBRIDGE", "eventbus"):
        assert matches(pattern, {"detail": {"service": service}})
    assert not matches(pattern, {"detail": {"service": "Event Bridge"}})


def test_suffix() -> None:
    assert matches({"FileName": [{"suffix": ".png"}]}, {"FileName": "image.png"})
    assert not matches({"FileName": [{"suffix": ".png"}]}, {"FileName": "image.PNG"})
    assert matches({"source": [{"suffix": "ec2"}]}, EC2_EVENT)


def test_suffix_equals_ignore_case() -> None:
    pattern = {"detail": {"FileName": [{"suffix": {"equals-ignore-case": ".png"}}]}}
    assert matches(pattern, {"detail": {"FileName": "photo.PNG"}})
    assert matches(pattern, {"detail": {"FileName": "photo.png"}})
    assert not matches(pattern, {"detail": {"FileName": "photo.jpg"}})


def test_equals_ignore_case() -> None:
    assert matches({"source": [{"equals-ignore-case": "EC2"}]}, {"source": "ec2"})
    assert matches({"Name": [{"equals-ignore-case": "alice"}]}, {"Name": "ALICE"})
    assert not matches({"Name": [{"equals-ignore-case": "alice"}]}, {"Name": "alicia"})


def test_wildcard() -> None:
    pattern = {"source": [{"wildcard": "Simple*Service"}]}
    assert matches(pattern, {"source": "SimpleQueueService"})
    assert matches(pattern, {"source": "SimpleService"})
    assert not matches(pattern, {"source": "SimpleQueueServices"})
    arn = {"EventBusArn": [{"wildcard": "arn:aws:events:us-east-1:*:event-bus/*"}]}
    assert matches(arn, {"EventBusArn": "arn:aws:events:us-east-1:123456789012:event-bus/b"})
    assert not matches(arn, {"EventBusArn": "arn:aws:events:eu-west-1:1:event-bus/b"})
    assert matches({"f": [{"wildcard": "dir/*.png"}]}, {"f": "dir/sub/photo.png"})
    assert not matches({"f": [{"wildcard": "dir/*.png"}]}, {"f": "dir/photo.jpg"})


def test_wildcard_without_star_is_exact_and_escapes_work() -> None:
    assert matches({"f": [{"wildcard": "abc"}]}, {"f": "abc"})
    assert not matches({"f": [{"wildcard": "abc"}]}, {"f": "abcd"})
    assert matches({"f": [{"wildcard": r"a\*b"}]}, {"f": "a*b"})
    assert not matches({"f": [{"wildcard": r"a\*b"}]}, {"f": "axb"})
    assert matches({"f": [{"wildcard": r"a\\*"}]}, {"f": "a\\tail"})
    assert matches({"f": [{"wildcard": "*.*"}]}, {"f": "a.b"})
    assert matches({"f": [{"wildcard": "a*b*c"}]}, {"f": "a\nb\nc"})


# --- anything-but -------------------------------------------------------------------------


def test_anything_but_string_and_number() -> None:
    assert matches(detail(state=[{"anything-but": "initializing"}]), EC2_EVENT)
    assert not matches(detail(state=[{"anything-but": "running"}]), EC2_EVENT)
    assert matches(detail(**{"x-limit": [{"anything-but": 123}]}), EC2_EVENT)
    assert not matches(detail(**{"x-limit": [{"anything-but": 301.8}]}), EC2_EVENT)


def test_anything_but_lists() -> None:
    pattern = detail(state=[{"anything-but": ["stopped", "overloaded"]}])
    assert matches(pattern, EC2_EVENT)
    assert not matches(pattern, detail(state="stopped"))
    numbers = detail(**{"x-limit": [{"anything-but": [100, 200, 300]}]})
    assert matches(numbers, EC2_EVENT)
    assert not matches(numbers, detail(**{"x-limit": 200}))


def test_anything_but_prefix_suffix_ignore_case_wildcard() -> None:
    assert matches(detail(state=[{"anything-but": {"prefix": "init"}}]), EC2_EVENT)
    assert not matches(detail(state=[{"anything-but": {"prefix": "run"}}]), EC2_EVENT)
    png = {"FileName": [{"anything-but": {"suffix": ".png"}}]}
    assert matches(png, {"FileName": "notes.txt"})
    assert not matches(png, {"FileName": "photo.png"})
    case = {"state": [{"anything-but": {"equals-ignore-case": ["Stopped", "OverLoaded"]}}]}
    assert matches(case, {"state": "running"})
    assert not matches(case, {"state": "STOPPED"})
    lib = {"FilePath": [{"anything-but": {"wildcard": "*/lib/*"}}]}
    assert matches(lib, {"FilePath": "/usr/bin/python"})
    assert not matches(lib, {"FilePath": "/usr/lib/python"})


def test_anything_but_needs_the_field() -> None:
    assert not matches({"missing": [{"anything-but": "x"}]}, EC2_EVENT)


def test_anything_but_on_an_array_matches_if_any_element_is_not_excluded() -> None:
    pattern = {"tags": [{"anything-but": ["a"]}]}
    assert matches(pattern, {"tags": ["a", "b"]})
    assert not matches(pattern, {"tags": ["a", "a"]})


# --- numeric ------------------------------------------------------------------------------


def test_documented_numeric_example() -> None:
    pattern = detail(
        **{
            "c-count": [{"numeric": [">", 0, "<=", 5]}],
            "d-count": [{"numeric": ["<", 10]}],
            "x-limit": [{"numeric": ["=", 3.018e2]}],
        }
    )
    assert matches(pattern, EC2_EVENT)


@pytest.mark.parametrize(
    ("comparison", "inside", "outside"),
    [
        (["=", 5], [5, 5.0], [4.99, 6]),
        (["<", 5], [4, -1e9], [5, 6]),
        (["<=", 5], [5, 4.5], [5.01]),
        ([">", 5], [5.5, 1e9], [5, 0]),
        ([">=", 5], [5, 6], [4.999]),
        ([">", 0, "<=", 5], [0.1, 5], [0, 5.1]),
        ([">=", 0, "<", 5], [0, 4.9], [-0.1, 5]),
        (["<", 5, ">", 0], [1], [0, 5]),  # bounds in either order
    ],
)
def test_numeric_comparisons(
    comparison: list[Any], inside: list[float], outside: list[float]
) -> None:
    pattern = {"n": [{"numeric": comparison}]}
    for value in inside:
        assert matches(pattern, {"n": value}), value
    for value in outside:
        assert not matches(pattern, {"n": value}), value


def test_numeric_only_matches_numbers() -> None:
    pattern = {"n": [{"numeric": [">", 0]}]}
    assert not matches(pattern, {"n": "5"})
    assert not matches(pattern, {"n": True})
    assert not matches(pattern, {"n": None})
    assert matches(pattern, {"n": [0, "x", 3]})  # any element of an array


# --- exists -------------------------------------------------------------------------------


def test_exists() -> None:
    assert matches(detail(**{"c-count": [{"exists": True}]}), EC2_EVENT)
    assert not matches(detail(**{"c-count": [{"exists": False}]}), EC2_EVENT)
    assert matches(detail(**{"z-count": [{"exists": False}]}), EC2_EVENT)
    assert not matches(detail(**{"z-count": [{"exists": True}]}), EC2_EVENT)


def test_exists_only_sees_leaf_values() -> None:
    event = {"detail": {"state": "running", "c-count": {"c1": 100}, "tags": []}}
    assert matches(detail(**{"c-count": [{"exists": False}]}), event)  # an object: no leaf
    assert not matches(detail(**{"c-count": [{"exists": True}]}), event)
    assert matches(detail(tags=[{"exists": False}]), event)  # an empty list: no leaf
    assert matches(detail(none=[{"exists": True}]), {"detail": {"none": None}})


def test_exists_false_under_a_missing_parent() -> None:
    assert matches({"data": {"partition": [{"exists": False}]}}, {"type": "x"})
    assert not matches({"data": {"partition": [{"exists": True}]}}, {"type": "x"})


def test_exists_false_or_a_value() -> None:
    pattern = {"schema": [{"exists": False}, "v2"]}
    assert matches(pattern, {})
    assert matches(pattern, {"schema": "v2"})
    assert not matches(pattern, {"schema": "v1"})


# --- cidr ---------------------------------------------------------------------------------


def test_cidr() -> None:
    assert matches(detail(**{"source-ip": [{"cidr": "10.0.0.0/24"}]}), EC2_EVENT)
    assert not matches(detail(**{"source-ip": [{"cidr": "10.0.1.0/24"}]}), EC2_EVENT)
    assert matches({"ip": [{"cidr": "2001:db8::/32"}]}, {"ip": "2001:db8::1"})
    assert not matches({"ip": [{"cidr": "2001:db8::/32"}]}, {"ip": "10.0.0.1"})
    assert not matches({"ip": [{"cidr": "10.0.0.0/8"}]}, {"ip": "not an ip"})


# --- $or ----------------------------------------------------------------------------------


def test_or_at_top_level() -> None:
    pattern = {
        "source": ["aws.cloudwatch"],
        "$or": [
            {"metricName": ["CPUUtilization", "ReadLatency"]},
            {"namespace": ["AWS/EC2", "AWS/ES"]},
        ],
    }
    assert matches(pattern, {"source": "aws.cloudwatch", "metricName": "ReadLatency"})
    assert matches(pattern, {"source": "aws.cloudwatch", "namespace": "AWS/ES"})
    assert not matches(pattern, {"source": "aws.cloudwatch", "namespace": "AWS/S3"})
    assert not matches(pattern, {"source": "aws.ec2", "namespace": "AWS/ES"})


def test_or_with_and_inside_and_nested_or() -> None:
    pattern = {
        "source": ["aws.cloudwatch"],
        "$or": [
            {"metricName": ["CPUUtilization"]},
            {
                "metricType": ["MetricType"],
                "namespace": ["AWS/EC2"],
                "$or": [{"metricId": [1234]}, {"spaceId": [1000]}],
            },
            {"scope": ["Service"]},
        ],
    }
    base = {"source": "aws.cloudwatch", "metricType": "MetricType", "namespace": "AWS/EC2"}
    assert matches(pattern, {**base, "spaceId": 1000})
    assert not matches(pattern, {**base, "spaceId": 999})
    assert matches(pattern, {"source": "aws.cloudwatch", "scope": "Service"})


def test_or_inside_a_nested_object() -> None:
    pattern = {"detail": {"$or": [{"c-count": [{"numeric": [">", 10]}]}, {"d-count": [3]}]}}
    assert matches(pattern, EC2_EVENT)
    assert not matches(pattern, detail(**{"c-count": 5, "d-count": 4}))


# --- arrays of objects --------------------------------------------------------------------


def test_array_of_objects_matches_within_one_element() -> None:
    event = {
        "employees": [
            {"firstName": "John", "lastName": "Doe"},
            {"firstName": "Anna", "lastName": "Smith"},
            {"firstName": "Peter", "lastName": "Jones"},
        ]
    }
    assert matches({"employees": {"firstName": ["Anna"]}}, event)
    assert matches({"employees": {"firstName": ["Anna"], "lastName": ["Smith"]}}, event)
    assert not matches({"employees": {"firstName": ["Anna"], "lastName": ["Jones"]}}, event)
    nested = {"employees": [[event["employees"][0]], [event["employees"][2]]]}
    assert matches({"employees": {"lastName": ["Jones"]}}, nested)


# --- explain ------------------------------------------------------------------------------


def test_explain_names_the_first_failing_clause() -> None:
    compiled = compile_pattern(
        {"type": ["data.arrived"], "data": {"dataset": ["demo.orders"], "rows": [1]}}
    )
    event = {"type": "data.arrived", "data": {"dataset": "demo.customers", "rows": 2}}
    assert compiled.explain(event) == (
        "data.dataset: 'demo.customers' is not one of ['demo.orders']"
    )
    assert compiled.explain({**event, "data": {"dataset": "demo.orders", "rows": 1}}) is None


@pytest.mark.parametrize(
    ("pattern", "event", "reason"),
    [
        ({"a": ["x"]}, {}, "a: field is missing; expected one of ['x']"),
        ({"a": [{"prefix": "eu"}, "us"]}, {"a": "ap"}, "a: 'ap' does not match any of"),
        ({"a": [{"exists": False}]}, {"a": 1}, "a: field is present (1); expected it to be"),
        ({"a": [{"exists": False}]}, {"a": [1]}, "a: field is present ([1]); expected it"),
        ({"a": ["x"]}, {"a": []}, "a: holds [], which has no values; expected one of ['x']"),
        ({"a": [{"exists": True}]}, {}, "a: field is missing; expected the field to exist"),
        ({"a": ["x"]}, {"a": {"b": 1}}, "a: holds an object, not a value"),
        ({"a": ["x"]}, {"a": ["y", "z"]}, "a: no element of ['y', 'z'] is one of ['x']"),
        ({"n": [{"numeric": [">", 5]}]}, {"n": "9"}, "n: '9' does not match numeric ['>', 5]"),
        ({"$or": [{"a": [1]}, {"b": [2]}]}, {}, "no $or alternative matches: (0) a: field"),
    ],
)
def test_explain_reasons(pattern: dict[str, Any], event: dict[str, Any], reason: str) -> None:
    explained = compile_pattern(pattern).explain(event)
    assert explained is not None
    assert explained.startswith(reason), explained


def test_compiled_pattern_is_reusable() -> None:
    compiled = compile_pattern({"source": ["aws.ec2"]})
    assert isinstance(compiled, CompiledPattern)
    assert [compiled.matches(EC2_EVENT) for _ in range(3)] == [True, True, True]
    assert "aws.ec2" in repr(compiled)


# --- malformed patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "field", "message"),
    [
        ({"data": {"rows": [{"numeric": [">", 0, "<="]}]}}, "match.data.rows", "odd number"),
        ({"data": {"rows": [{"numeric": ["!=", 0]}]}}, "match.data.rows", "'!=' is not one of"),
        ({"n": [{"numeric": [">", "5"]}]}, "match.n", "expects a number after '>'"),
        ({"n": [{"numeric": [">", 1, ">=", 2]}]}, "match.n", "one lower bound"),
        ({"n": [{"numeric": ["=", 1, "<", 2]}]}, "match.n", "one lower bound"),
        ({"n": [{"numeric": [">", 5, "<", 1]}]}, "match.n", "range is empty"),
        ({"n": [{"numeric": [">", 0, "<", 9, ">"]}]}, "match.n", "odd number"),
        ({"n": [{"numeric": [">", 0, "<", 9, ">", 1, "<", 2]}]}, "match.n", "at most two"),
        ({"n": [{"numeric": 5}]}, "match.n", "operator/number pairs"),
        ({"a": [{"prefix": 5}]}, "match.a", "prefix expects a string"),
        ({"a": [{"suffix": ["x"]}]}, "match.a", "suffix expects a string"),
        ({"a": [{"exists": "yes"}]}, "match.a", "exists expects true or false"),
        ({"a": [{"contains": "x"}]}, "match.a", "unknown operator 'contains'"),
        ({"a": [{"prefix": "x", "suffix": "y"}]}, "match.a", "exactly one key"),
        ({"a": []}, "match.a", "an empty list matches nothing"),
        ({"a": [["x"]]}, "match.a", "a list inside a value list"),
        ({"a": [{"wildcard": "a**b"}]}, "match.a", "consecutive '*'"),
        ({"a": [{"wildcard": r"a\b"}]}, "match.a", "backslash before 'b'"),
        ({"a": [{"anything-but": []}]}, "match.a", "anything-but list is empty"),
        ({"a": [{"anything-but": ["x", 1]}]}, "match.a", "mixes strings and numbers"),
        ({"a": [{"anything-but": None}]}, "match.a", "anything-but expects"),
        ({"a": [{"anything-but": {"numeric": [">", 1]}}]}, "match.a", "inside it"),
        ({"a": [{"cidr": "10.0.0.0/33"}]}, "match.a", "not an IP network"),
        ({"a": [{"equals-ignore-case": 1}]}, "match.a", "equals-ignore-case expects a string"),
        ({"data": {"rows": {"numeric": [">", 0]}}}, "match.data.rows", "is an operator"),
        ({"$and": [{"a": [1]}]}, "match.$and", "only $or is supported"),
        ({"$or": {"a": [1]}}, "match.$or", "$or expects a non-empty list"),
        ({"$or": [{"a": [1]}, {"b": {"c": [{"exists": 1}]}}]}, "match.$or[1].b.c", "exists"),
        ({"data": {}}, "match.data", "an empty table has no conditions"),
        ({}, "match", "would match every event"),
    ],
)
def test_malformed_patterns_name_the_field(pattern: Any, field: str, message: str) -> None:
    err = error(pattern)
    assert err.field == field
    assert message in str(err)
    assert str(err).startswith(f"field {field!r}: ")


def test_compile_pattern_without_where() -> None:
    with pytest.raises(RuleError, match=r"^field 'data\.rows': numeric operator '\?' is not"):
        compile_pattern({"data": {"rows": [{"numeric": ["?", 0]}]}})
