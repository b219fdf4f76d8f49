"""The outcome statement's parameters: attempt and outcome rows, as sent to Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from orchestrator.pipeline import StepRecord
from orchestrator.store import AttemptWrite, RunFinish
from orchestrator.store.batch import attempt_rows, outcome_rows

AT = datetime(2026, 11, 25, 12, 0, 0, 250_000, tzinfo=UTC)


def test_an_attempt_row_keeps_null_output_apart_from_none_and_times_as_epoch_seconds() -> None:
    rows = msgspec.json.decode(
        attempt_rows(
            [
                AttemptWrite(run_id=1, step="a", attempt=1, status="running", started_at=AT),
                AttemptWrite(
                    run_id=1,
                    step="a",
                    attempt=2,
                    status="succeeded",
                    output=b"null",
                    started_at=AT,
                    finished_at=AT,
                    skipped=True,
                ),
            ]
        )
    )
    assert rows == [
        [1, "a", 1, "running", [], None, AT.timestamp(), None, False],
        [1, "a", 2, "succeeded", [None], None, AT.timestamp(), AT.timestamp(), True],
    ]


def test_a_finished_steps_record_is_written_as_its_attempt_row() -> None:
    record = StepRecord(
        run_id=3,
        step="b",
        attempt=1,
        status="failed",
        output=None,
        error="ValueError: bad",
        started_at=AT,
        finished_at=AT,
    )
    same = AttemptWrite(
        run_id=3,
        step="b",
        attempt=1,
        status="failed",
        error="ValueError: bad",
        started_at=AT,
        finished_at=AT,
    )
    assert attempt_rows([record]) == attempt_rows([same])


def test_nul_characters_in_errors_are_replaced_for_postgres() -> None:
    (row,) = msgspec.json.decode(
        attempt_rows(
            [
                AttemptWrite(
                    run_id=1, step="a", attempt=1, status="failed", error="x\x00y", started_at=AT
                )
            ]
        )
    )
    assert row[5] == "x\ufffdy"
    outcomes = msgspec.json.decode(
        outcome_rows(
            [
                RunFinish(run_id=1, status="failed", failed_step="a", error="x\x00y"),
                RunFinish(run_id=2, status="succeeded"),
            ]
        )
    )
    assert outcomes == [[1, "failed", "a", "x\ufffdy"], [2, "succeeded", None, None]]
