"""Data contracts: each rule of a dataset's contract accepts and rejects what it should."""

from __future__ import annotations

import msgspec
import pytest

from orchestrator.config import ContractSettings
from orchestrator.contracts import Contracts
from orchestrator.errors import ConfigError
from orchestrator.events import new_arrival

CONTRACT = msgspec.convert(
    {
        "required": ["uri"],
        "partition_pattern": r"\d{4}-\d{2}-\d{2}",
        "min_rows": 1,
        "max_bytes": 1000,
        "attributes": {"region": "str", "version": "int"},
    },
    ContractSettings,
)
GOOD = {"uri": "s3://x", "rows": 5, "size": 10, "attributes": {"region": "eu", "version": 2}}


def check(**overrides: object) -> str | None:
    fields = {**GOOD, **overrides}
    partition = fields.pop("partition", "2026-11-24")
    event = new_arrival("sales.orders", partition=partition, **fields)  # type: ignore[arg-type]
    return Contracts({"sales.orders": CONTRACT}).check(event)


def test_conforming_event_and_uncontracted_dataset_pass() -> None:
    assert check() is None
    assert Contracts({"sales.orders": CONTRACT}).check(new_arrival("other")) is None
    assert not Contracts({})


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"uri": None}, "required field 'uri' is missing"),
        ({"partition": "yesterday"}, "partition 'yesterday' does not match"),
        ({"partition": None}, "partition None does not match"),
        ({"rows": 0}, "rows 0 is below the minimum of 1"),
        ({"rows": None}, "rows None is below the minimum of 1"),
        ({"size": 5000}, "bytes 5000 exceeds the maximum of 1000"),
        ({"attributes": {"version": 2}}, "attribute 'region' is missing"),
        ({"attributes": {"region": "eu", "version": "2"}}, "attribute 'version' should be int"),
        ({"attributes": {"region": "eu", "version": True}}, "attribute 'version' should be int"),
    ],
)
def test_each_breach_is_named(overrides: dict[str, object], reason: str) -> None:
    problem = check(**overrides)
    assert problem is not None
    assert reason in problem


def test_extra_attributes_can_be_forbidden() -> None:
    strict = msgspec.structs.replace(CONTRACT, allow_extra_attributes=False)
    event = new_arrival(
        "d",
        partition="2026-11-24",
        uri="u",
        rows=1,
        attributes={"region": "eu", "version": 1, "colour": "red"},
    )
    assert Contracts({"d": strict}).check(event) == "unexpected attributes ['colour']"
    assert Contracts({"d": CONTRACT}).check(event) is None


@pytest.mark.parametrize(
    ("contract", "message"),
    [
        ({"required": ["size"]}, "contracts.d.required: unknown field 'size'"),
        ({"attributes": {"a": "text"}}, "contracts.d.attributes.a: unknown type 'text'"),
        ({"partition_pattern": "("}, "contracts.d.partition_pattern: not a valid regex"),
    ],
)
def test_bad_contracts_are_config_errors(contract: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Contracts({"d": msgspec.convert(contract, ContractSettings)})
    assert message in str(info.value)
