"""service.core.scheduler.policy on plain numbers: which stage runs next, which chunks form its batch.

No engine, no event loop, no clock: queue depths, queue times and settings in, a decision out.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.core.scheduler.policy import BatchingSettings, BatchPlan, Pick, pick_stage, plan_batch

# max_batch_size 4, stage 0 waits up to 2 s for a fuller batch, a deeper stage up to 5 s for more survivors.
SETTINGS = BatchingSettings(max_batch_size=4, max_wait=2.0, merge_wait=5.0)
UNBATCHED = BatchingSettings(max_batch_size=4, max_wait=2.0, merge_wait=5.0, batching=False)


def pick(depths: list[int], oldest: list[float], now: float, settings: BatchingSettings = SETTINGS) -> Pick:
    return pick_stage(depths, oldest, now, settings)


def test_nothing_queued_sleeps_until_woken() -> None:
    assert pick([0, 0, 0], [0.0, 0.0, 0.0], now=10.0) == Pick(None, None)


def test_stage_0_waits_for_a_fuller_batch_until_its_oldest_row_waited_max_wait() -> None:
    assert pick([3, 0, 0], [10.0, 0.0, 0.0], now=10.5) == Pick(None, 1.5)
    assert pick([3, 0, 0], [10.0, 0.0, 0.0], now=12.0) == Pick(0)  # waited exactly max_wait: runs
    assert pick([4, 0, 0], [10.0, 0.0, 0.0], now=10.0) == Pick(0)  # full: runs at once


def test_deepest_non_empty_stage_goes_first_when_stage_0_is_not_full() -> None:
    assert pick([3, 1, 1], [10.0, 10.0, 10.0], now=10.0) == Pick(2)
    assert pick([3, 1, 0], [10.0, 10.0, 0.0], now=10.0) == Pick(1)
    assert pick([0, 2, 0], [0.0, 10.0, 0.0], now=10.0) == Pick(1)


def test_under_load_a_deeper_stage_waits_for_survivors_up_to_merge_wait() -> None:
    # Stage 0 full: stage 2 (2 rows, queued at 10) waits for survivors of more stage-0 batches,
    # so stage 0 runs meanwhile.
    assert pick([4, 0, 2], [10.0, 0.0, 10.0], now=11.0) == Pick(0)
    # Its merge wait over: it runs even though stage 0 is full.
    assert pick([4, 0, 2], [10.0, 0.0, 10.0], now=15.0) == Pick(2)
    # A full deeper stage never waits.
    assert pick([4, 4, 0], [10.0, 10.0, 0.0], now=10.0) == Pick(1)


def test_under_load_stage_0_runs_while_deeper_stages_wait() -> None:
    """A waiting deeper stage never makes the dispatcher sleep: stage 0 is full, so it runs."""
    assert pick([5, 1, 1], [10.0, 10.0, 11.0], now=12.0) == Pick(0)
    assert pick([4, 3, 0], [10.0, 12.0, 0.0], now=12.0) == Pick(0)


def test_the_sleep_ends_when_stage_0_may_run() -> None:
    assert pick([1, 0, 0], [10.0, 0.0, 0.0], now=10.25) == Pick(None, 1.75)


def test_without_batching_or_while_closing_nothing_waits() -> None:
    assert pick([1, 0, 0], [10.0, 0.0, 0.0], now=10.0, settings=UNBATCHED) == Pick(0)
    assert pick([4, 0, 2], [10.0, 0.0, 10.0], now=10.0, settings=UNBATCHED) == Pick(2)
    assert pick([0, 0, 0], [0.0, 0.0, 0.0], now=10.0, settings=UNBATCHED) == Pick(None, None)
    assert pick_stage([1, 0, 0], [10.0, 0.0, 0.0], 10.0, SETTINGS, closing=True) == Pick(0)
    assert pick_stage([4, 0, 2], [10.0, 0.0, 10.0], 10.0, SETTINGS, closing=True) == Pick(2)


def test_oldest_is_read_only_for_non_empty_stages() -> None:
    nan = float("nan")  # an empty queue has no front chunk: its time must not matter
    assert pick([3, 0, 0], [10.0, nan, nan], now=10.5) == Pick(None, 1.5)
    assert pick([0, 0, 1], [nan, nan, 10.0], now=10.0) == Pick(2)


def test_batch_takes_whole_chunks_front_to_back_and_splits_the_one_that_does_not_fit() -> None:
    # (rows, request id) per chunk, front first.
    assert plan_batch([(1, 1), (2, 2), (3, 3)], SETTINGS) == BatchPlan(whole=2, split=1, rows=4)
    assert plan_batch([(1, 1), (3, 2), (3, 3)], SETTINGS) == BatchPlan(whole=2, split=0, rows=4)
    assert plan_batch([(9, 1)], SETTINGS) == BatchPlan(whole=0, split=4, rows=4)
    assert plan_batch([(2, 1)], SETTINGS) == BatchPlan(whole=1, split=0, rows=2)
    assert plan_batch([], SETTINGS) == BatchPlan(whole=0, split=0, rows=0)


def test_without_batching_a_batch_holds_one_request() -> None:
    # Request 1 has two chunks at the front (e.g. rows split earlier); request 2 waits.
    assert plan_batch([(1, 1), (1, 1), (1, 2)], UNBATCHED) == BatchPlan(whole=2, split=0, rows=2)
    assert plan_batch([(6, 1), (1, 2)], UNBATCHED) == BatchPlan(whole=0, split=4, rows=4)
    assert plan_batch([(1, 1), (1, 2), (1, 1)], SETTINGS) == BatchPlan(whole=3, split=0, rows=3)


def test_the_queue_is_read_only_as_far_as_the_batch_reaches() -> None:
    read: list[int] = []

    def front() -> Iterator[tuple[int, int]]:
        for i in range(1000):
            read.append(i)
            yield 1, i

    assert plan_batch(front(), SETTINGS) == BatchPlan(whole=4, split=0, rows=4)
    assert len(read) <= 5


@pytest.mark.parametrize("size", [1, 3, 4, 5, 12])
def test_the_plan_never_exceeds_max_batch_size_and_takes_what_fits(size: int) -> None:
    chunks = [(1 + (i % 3), i) for i in range(size)]
    plan = plan_batch(chunks, SETTINGS)
    rows = [r for r, _ in chunks]
    assert plan.rows == sum(rows[: plan.whole]) + plan.split <= SETTINGS.max_batch_size
    assert plan.rows == min(SETTINGS.max_batch_size, sum(rows))
