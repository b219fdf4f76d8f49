"""``python -m bench.intake`` drives the real intake loop: every record reaches the batch write."""

from __future__ import annotations

import pytest

from bench.intake import measure, records

pytestmark = pytest.mark.anyio


def test_records_spread_over_four_partitions_in_offset_order() -> None:
    recs = records(9)
    assert [(r.partition, r.offset) for r in recs[:5]] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    assert all(dict(r.headers)["traceparent"].startswith(b"00-") for r in recs)


async def test_every_record_becomes_one_run_request_and_a_time_is_taken() -> None:
    best, runs = await measure(batch=8, batches=2, repeat=1)
    assert runs == 8
    assert 0 < best < 1_000_000


async def test_with_the_batch_write_every_run_is_encoded_and_handed_to_the_scheduler() -> None:
    best, runs = await measure(batch=8, batches=2, repeat=1, write=True)
    assert runs == 8  # adopted by the stand-in scheduler, through the real batch write
    assert 0 < best < 1_000_000
