"""Scheduler: cross-request batching, survivor merging, deeper-first, deadlines, backpressure, failures.

Each test drives its own event loop with asyncio.run (no pytest-asyncio needed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pytest

from service.core.artifact import Manifest, load_manifest
from service.core.engine import CPU, Engine, StageBatch, StageOutput
from service.core.errors import (
    DeadlineExceededError,
    NotReadyError,
    OverCapacityError,
    StageFailedError,
    ValidationFailedError,
)
from service.core.scheduler import Scheduler
from service.core.scheduler.lifecycle import ORT_THREAD_NICENESS
from tests.fixtures.synthetic_artifact import random_images

T = TypeVar("T")
E = 3  # stages of the synthetic artifact
EXIT_FIRST = np.array([0.0, 0.0, 0.0], dtype=np.float32)
NEVER = np.array([np.inf, np.inf, np.inf], dtype=np.float32)
# Stage batches on the ORT worker thread, on the event loop, or both (the single-CPU `auto` mode: a
# batch predicted under the limit on the loop, the rest on the thread; the limit is high here so that
# after each stage's first, measured batch on the thread the rest run inline). Deadline tests stay
# thread-only: on the loop a deadline is honoured between batches, not during a slow one.
EXECUTION = [
    pytest.param({"run_on_loop": False}, id="thread"),
    pytest.param({"run_on_loop": True}, id="loop"),
    pytest.param({"run_on_loop": False, "inline_max_ms": 1000.0}, id="hybrid"),
]


class SlowEngine(Engine):
    """The real engine, with an optional sleep per stage and an optional failure count per stage."""

    delays: dict[int, float]
    failures: dict[int, int]

    def run_stage_batch(self, k: int, state: StageBatch) -> StageOutput:
        delay = getattr(self, "delays", {}).get(k, 0.0)
        if delay:
            time.sleep(delay)
        failures = getattr(self, "failures", {})
        if failures.get(k, 0) > 0:
            failures[k] -= 1
            raise StageFailedError(f"stage {k + 1} failed: simulated ORT error")
        return super().run_stage_batch(k, state)


@pytest.fixture(scope="module")
def manifest(synthetic_artifact: Path) -> Manifest:
    return load_manifest(synthetic_artifact)


@pytest.fixture()
def engine(manifest: Manifest, synthetic_artifact: Path) -> SlowEngine:
    eng = SlowEngine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    eng.delays = {}
    eng.failures = {}
    return eng


def _images(n: int, seed: int = 7) -> np.ndarray:
    return random_images(n, channels=1, height=8, width=8, seed=seed)


def run(scheduler: Scheduler, body: Callable[[Scheduler], Awaitable[T]]) -> T:
    """Start the scheduler, run body, stop it: all inside one asyncio.run."""

    async def main() -> T:
        await scheduler.start()
        try:
            return await body(scheduler)
        finally:
            await scheduler.stop(drain=True, timeout=5)

    return asyncio.run(main())


class Batch(NamedTuple):
    """What the observer hears of one stage batch."""

    stage: int
    size: int
    requests: int
    sources: int


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.exits: list[tuple[int, bool]] = []

    def on_stage_batch(self, stage: int, batch_size: int, seconds: float, requests: int, sources: int) -> None:
        self.batches.append(Batch(stage, batch_size, requests, sources))

    def on_exits(self, stage: int, confidences: np.ndarray, macs: float, deadline_hit: bool) -> None:
        self.exits.extend([(stage, deadline_hit)] * len(confidences))


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_concurrent_requests_match_engine_classify(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    """Batched, merged, compacted serving answers exactly what the synchronous engine answers."""
    rng = np.random.default_rng(0)
    requests = [(_images(n, seed=n), rng.uniform(0.3, 0.8, size=(n, E)).astype(np.float32)) for n in (1, 5, 3, 8)]
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=20, observer=observer, **on_loop)

    async def body(s: Scheduler) -> list[list[Any]]:
        return list(await asyncio.gather(*(s.submit(x, t) for x, t in requests)))

    answers = run(sched, body)
    for (x, t), got in zip(requests, answers, strict=True):
        want = engine.classify(x, t)
        assert [r.exit_index for r in got] == [r.exit_index for r in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.logits, w.logits, rtol=1e-5, atol=1e-6)
            assert g.macs == w.macs and g.confidence == pytest.approx(w.confidence, rel=1e-5)
            assert not g.deadline_hit
    total = sum(len(x) for x, _ in requests)
    assert len(observer.exits) == total
    assert sum(b.size for b in observer.batches) == sum(s.items for s in sched.stats.stages)
    assert any(b.stage == 0 and b.requests > 1 for b in observer.batches)  # arriving together, they share stage 1
    assert max(b.size for b in observer.batches) <= 8
    assert sched.queue_depths() == [0, 0, 0] and sched.pending == 0


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_threshold_zero_exits_at_first_stage_in_one_batch(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=32, max_wait_ms=20, observer=observer, **on_loop)

    async def body(s: Scheduler) -> list[list[Any]]:
        return list(await asyncio.gather(*(s.submit(_images(3, seed=i), EXIT_FIRST) for i in range(4))))

    answers = run(sched, body)
    assert all(r.exit_index == 0 for a in answers for r in a)
    st = sched.stats.stages
    assert (st[0].batches, st[0].items, st[1].items, st[2].items) == (1, 12, 0, 0)
    assert observer.batches == [Batch(stage=0, size=12, requests=4, sources=4)]


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_early_exit_false_runs_every_stage(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, **on_loop)
    x = _images(4)
    answers = run(sched, lambda s: s.submit(x, EXIT_FIRST, early_exit=False))
    assert [r.exit_index for r in answers] == [2] * 4
    np.testing.assert_allclose(np.stack([r.logits for r in answers]), engine.run_all_stages(x)[-1], rtol=1e-6)
    assert [s.items for s in sched.stats.stages] == [4, 4, 4]


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_survivors_of_different_batches_are_merged(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    """Under load (stage 0 full), survivors of two stage-1 batches share one stage-2 batch."""
    # Rows 0-1 exit at stage 1, rows 2-3 run to the end.
    thr = np.stack([EXIT_FIRST, EXIT_FIRST, NEVER, NEVER])
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=4, max_wait_ms=0, merge_wait_ms=2000, observer=observer, **on_loop)

    async def body(s: Scheduler) -> list[list[Any]]:
        return list(await asyncio.gather(*(s.submit(_images(4, seed=i), thr) for i in range(3))))

    answers = run(sched, body)
    assert [[r.exit_index for r in a] for a in answers] == [[0, 0, 2, 2]] * 3
    assert [s.items for s in sched.stats.stages] == [12, 6, 6]
    merged = [b for b in observer.batches if b.stage == 1 and b.sources > 1]
    assert merged and sum(b.size for b in merged) >= 4
    assert any(b.stage == 1 and b.requests > 1 for b in observer.batches)
    # Compaction: a stage-2 batch never holds more rows than the survivors it was given.
    assert all(b.size <= 4 for b in observer.batches)


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_sources_are_the_batches_survivors_come_from(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    """Two requests in one stage-1 batch: two sources there, one (that batch) at every deeper stage."""
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=20, observer=observer, **on_loop)

    async def body(s: Scheduler) -> None:
        await asyncio.gather(*(s.submit(_images(1, seed=i), NEVER) for i in range(2)))

    run(sched, body)
    assert observer.batches == [Batch(0, 2, 2, 2), Batch(1, 2, 2, 1), Batch(2, 2, 2, 1)]


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_deeper_stages_go_first(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    engine.delays = {0: 0.05}
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, observer=observer, **on_loop)

    async def body(s: Scheduler) -> None:
        first = asyncio.create_task(s.submit(_images(1, seed=1), NEVER))
        await asyncio.sleep(0.02)  # A's stage 1 is running; B queues behind it
        second = asyncio.create_task(s.submit(_images(1, seed=2), NEVER))
        await asyncio.gather(first, second)

    run(sched, body)
    assert [b.stage for b in observer.batches] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_batching_off_serves_each_request_alone(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=32, max_wait_ms=50, batching=False, observer=observer, **on_loop)

    async def body(s: Scheduler) -> None:
        await asyncio.gather(*(s.submit(_images(n, seed=n), NEVER) for n in (1, 2, 3)))

    run(sched, body)
    assert all(b.requests == 1 for b in observer.batches)
    assert sorted(b.size for b in observer.batches if b.stage == 0) == [1, 2, 3]


def test_deadline_returns_best_so_far(engine: SlowEngine) -> None:
    engine.delays = {1: 0.3}  # stage 2 is slow
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, observer=observer)
    x = _images(3)

    async def body(s: Scheduler) -> tuple[list[Any], float]:
        start = time.monotonic()
        out = await s.submit(x, NEVER, deadline=start + 0.1)
        return out, time.monotonic() - start

    answers, took = run(sched, body)
    assert took < 0.25  # answered at the deadline, not after the slow stage
    assert [(r.exit_index, r.deadline_hit) for r in answers] == [(0, True)] * 3
    np.testing.assert_allclose(np.stack([r.logits for r in answers]), engine.run_all_stages(x)[0], rtol=1e-6)
    assert all(r.macs == engine.manifest.stages[0].cumulative_macs for r in answers)
    assert observer.exits == [(0, True)] * 3 and sched.stats.deadline_hits == 3


class GatedEngine(SlowEngine):
    """Stage `held` waits for `gate` (a threading.Event) before it runs: the test decides when."""

    held: int
    gate: threading.Event

    def run_stage_batch(self, k: int, state: StageBatch) -> StageOutput:
        if k == self.held:
            assert self.gate.wait(timeout=30), "the test never released the held stage"
        return super().run_stage_batch(k, state)


@pytest.fixture()
def gated(manifest: Manifest, synthetic_artifact: Path) -> GatedEngine:
    eng = GatedEngine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    eng.delays, eng.failures = {}, {}
    eng.held, eng.gate = 0, threading.Event()
    return eng


async def _until(cond: Callable[[], bool]) -> None:
    """Yield to the loop until cond() holds (a timer or a batch has done its part)."""
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def _late_answers(answers: list[Any], engine: Engine, x: np.ndarray) -> None:
    """Every row answered by stage 1 (exit 1), flagged deadline_hit, with stage 1's own F."""
    assert [(r.exit_index, r.deadline_hit) for r in answers] == [(0, True)] * len(x)
    np.testing.assert_allclose(np.stack([r.logits for r in answers]), engine.run_all_stages(x)[0], rtol=1e-6)
    assert all(r.macs == engine.manifest.stages[0].cumulative_macs for r in answers)


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_deadline_passed_at_submit_is_answered_by_stage_1(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    """Anytime semantics: a deadline already gone (a tiny deadline_ms) is no failure: stage 1 answers."""
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, observer=observer, **on_loop)
    x = _images(2)

    async def body(s: Scheduler) -> list[Any]:
        out = await s.submit(x, NEVER, deadline=time.monotonic() - 1)
        assert s.pending == 0 and s.queue_depths() == [0, 0, 0]
        return out

    _late_answers(run(sched, body), engine, x)
    assert [b.stage for b in observer.batches] == [0]  # nothing deeper ran
    assert observer.exits == [(0, True)] * 2
    assert (sched.stats.deadline_late, sched.stats.deadline_hits) == (1, 2)


def test_deadline_passing_during_stage_1_is_answered_by_it(gated: GatedEngine) -> None:
    """The deadline fires while stage 1 runs (held): when it returns, it answers every row."""
    sched = Scheduler(gated, max_batch_size=8, max_wait_ms=0)
    x = _images(3)

    async def body(s: Scheduler) -> list[Any]:
        task = asyncio.create_task(s.submit(x, NEVER, deadline=time.monotonic() + 0.01))
        await _until(lambda: s.stats.deadline_late == 1)  # the timer fired during the held batch
        assert not task.done()
        gated.gate.set()
        return await task

    _late_answers(run(sched, body), gated, x)
    assert sched.stats.stages[1].batches == 0 and sched.pending == 0


def test_deadline_passing_in_the_stage_1_queue_behind_a_slow_batch(gated: GatedEngine) -> None:
    """B waits in stage 1's queue behind A's held batch while its deadline passes: stage 1 still
    answers B, and A (no deadline) is answered as usual."""
    sched = Scheduler(gated, max_batch_size=1, max_wait_ms=0)
    xa, xb = _images(1, seed=1), _images(1, seed=2)

    async def body(s: Scheduler) -> tuple[list[Any], list[Any]]:
        a = asyncio.create_task(s.submit(xa, NEVER))
        await _until(lambda: s.queue_depths()[0] == 0 and s.pending == 1)  # A's batch is running
        b = asyncio.create_task(s.submit(xb, NEVER, deadline=time.monotonic() + 0.01))
        await _until(lambda: s.stats.deadline_late == 1)
        assert s.queue_depths() == [1, 0, 0]  # B is still queued at stage 1
        gated.gate.set()
        return await a, await b

    got_a, got_b = run(sched, body)
    assert [(r.exit_index, r.deadline_hit) for r in got_a] == [(E - 1, False)]
    _late_answers(got_b, gated, xb)


def test_deadline_with_rows_at_both_sides_of_stage_1(gated: GatedEngine) -> None:
    """Rows past stage 1 answer at the deadline with their best so far; the row still queued at stage 1
    is answered by it; the held stage-2 batch's return is ignored."""
    gated.held = 1
    observer = RecordingObserver()
    sched = Scheduler(gated, max_batch_size=2, max_wait_ms=0, observer=observer)
    x = _images(3)

    async def body(s: Scheduler) -> list[Any]:
        # 1 s: only stage 1 of rows 0, 1 (a few ms) must run before it; the rest is held by the gate
        task = asyncio.create_task(s.submit(x, NEVER, deadline=time.monotonic() + 1.0))
        await _until(lambda: s.stats.deadline_late == 1)
        assert s.stats.deadline_hits == 2 and not task.done()  # rows 0, 1: their stage-1 F
        gated.gate.set()
        return await task

    _late_answers(run(sched, body), gated, x)
    assert observer.exits == [(0, True)] * 3 and sched.stats.deadline_hits == 3
    assert sched.stats.stages[2].batches == 0 and sched.pending == 0


def test_request_timeout_fails_requests_older_than_it_and_only_those(engine: SlowEngine) -> None:
    """The safety net: a stuck stage turns into a 504-type error after request_timeout_s, not a hang."""
    engine.delays = {0: 0.6}  # the first batch is stuck far longer than the timeout
    sched = Scheduler(engine, max_batch_size=1, max_wait_ms=0, request_timeout_s=0.2)

    async def body(s: Scheduler) -> tuple[list[Any], float]:
        start = time.monotonic()
        first = asyncio.create_task(s.submit(_images(1, seed=1), EXIT_FIRST))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(s.submit(_images(1, seed=2), EXIT_FIRST))  # admitted 0.1 s later
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        return outcomes, time.monotonic() - start

    (first, second), took = run(sched, body)
    assert isinstance(first, DeadlineExceededError) and isinstance(second, DeadlineExceededError)
    assert str(first) == "no answer within the request timeout of 0.2 s"
    assert 0.3 <= took < 0.55  # the second one: admitted at 0.1, failed by 0.3 + one sweep (0.05)
    assert sched.stats.timed_out == 2 and sched.pending == 0


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_request_timeout_leaves_timely_requests_alone(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    sched = Scheduler(engine, max_batch_size=4, max_wait_ms=0, request_timeout_s=0.2, **on_loop)

    async def body(s: Scheduler) -> None:
        for i in range(6):  # spread over more than the timeout
            assert len(await s.submit(_images(2, seed=i), EXIT_FIRST)) == 2
            await asyncio.sleep(0.06)

    run(sched, body)
    assert sched.stats.timed_out == 0 and sched.stats.completed == 6


def test_over_capacity_is_immediate(engine: SlowEngine) -> None:
    engine.delays = {0: 0.1}  # a slow stage on the worker thread; on the loop nothing else runs meanwhile
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, max_queue=4)

    async def body(s: Scheduler) -> None:
        admitted = asyncio.create_task(s.submit(_images(4), EXIT_FIRST))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(OverCapacityError) as info:
            await s.submit(_images(1), EXIT_FIRST)
        assert time.monotonic() - t0 < 0.05 and info.value.retry_after > 0
        assert len(await admitted) == 4
        assert len(await s.submit(_images(1), EXIT_FIRST)) == 1  # room again

    run(sched, body)
    assert sched.stats.rejected == 1


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_broken_stage_fails_only_its_batch_then_recovers(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    engine.failures = {1: 1}  # the first stage-2 run raises
    observer = RecordingObserver()
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=20, observer=observer, **on_loop)

    async def body(s: Scheduler) -> None:
        deep = s.submit(_images(2, seed=1), NEVER)  # reaches stage 2 -> that batch fails
        shallow = s.submit(_images(2, seed=2), EXIT_FIRST)  # same stage-1 batch, exits before stage 2
        results = await asyncio.gather(deep, shallow, return_exceptions=True)
        assert isinstance(results[0], StageFailedError)
        assert isinstance(results[1], list) and [r.exit_index for r in results[1]] == [0, 0]
        again = await s.submit(_images(2, seed=1), NEVER)  # the scheduler keeps running
        assert [r.exit_index for r in again] == [2, 2]

    run(sched, body)
    assert sched.stats.stages[1].failed_batches == 1 and sched.stats.failed == 1
    # deep + shallow share stage 1; the failed stage-2 batch is not reported; `again` runs alone.
    assert [(b.stage, b.requests) for b in observer.batches] == [(0, 2), (0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_stop_drains_then_refuses(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    engine.delays = {0: 0.05}
    sched = Scheduler(engine, max_batch_size=8, max_wait_ms=0, **on_loop)

    async def main() -> None:
        with pytest.raises(NotReadyError):
            await sched.submit(_images(1))  # not started
        await sched.start()
        task = asyncio.create_task(sched.submit(_images(2), NEVER))
        await asyncio.sleep(0.01)
        await sched.stop(drain=True, timeout=5)
        assert [r.exit_index for r in await task] == [2, 2]
        with pytest.raises(NotReadyError):
            await sched.submit(_images(1))

    asyncio.run(main())


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_stop_without_drain_fails_pending(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    engine.delays = {0: 0.1}
    sched = Scheduler(engine, max_batch_size=1, max_wait_ms=0, **on_loop)

    async def main() -> None:
        await sched.start()
        task = asyncio.create_task(sched.submit(_images(3), NEVER))
        await asyncio.sleep(0.02)
        await sched.stop(drain=False, timeout=2)
        with pytest.raises(NotReadyError):
            await task
        assert sched.pending == 0

    asyncio.run(main())


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_cancelled_request_releases_its_rows(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    engine.delays = {0: 0.05}
    sched = Scheduler(engine, max_batch_size=1, max_wait_ms=0, max_queue=8, **on_loop)

    async def body(s: Scheduler) -> None:
        task = asyncio.create_task(s.submit(_images(4), NEVER))
        await asyncio.sleep(0.01)
        assert s.pending == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.pending == 0 and sum(s.queue_depths()) == 0

    run(sched, body)
    assert sched.stats.cancelled == 1


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_validation_errors_are_raised_before_queueing(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    sched = Scheduler(engine, **on_loop)

    async def body(s: Scheduler) -> None:
        with pytest.raises(ValidationFailedError):
            await s.submit(np.zeros((1, 3, 8, 8), dtype=np.float32))
        with pytest.raises(ValidationFailedError):
            await s.submit(_images(2), np.zeros(2, dtype=np.float32))
        assert await s.submit(np.zeros((0, 1, 8, 8), dtype=np.float32)) == []
        assert s.pending == 0

    run(sched, body)


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_observer_failure_does_not_break_serving(engine: SlowEngine, on_loop: dict[str, Any]) -> None:
    class Broken(RecordingObserver):
        def on_exits(self, stage: int, confidences: np.ndarray, macs: float, deadline_hit: bool) -> None:
            raise RuntimeError("metrics backend down")

    sched = Scheduler(engine, observer=Broken(), max_wait_ms=0, **on_loop)
    answers = run(sched, lambda s: s.submit(_images(2), EXIT_FIRST))
    assert [r.exit_index for r in answers] == [0, 0]


def test_on_the_loop_other_tasks_run_between_batches(engine: SlowEngine) -> None:
    """run_on_loop blocks the loop during a batch, so it must yield after each one (HTTP I/O, timers)."""
    engine.delays = {0: 0.02, 1: 0.02, 2: 0.02}
    sched = Scheduler(engine, max_batch_size=1, max_wait_ms=0, run_on_loop=True)
    ticks: list[int] = []

    async def body(s: Scheduler) -> None:
        async def ticker() -> None:
            while True:
                ticks.append(s.stats.stages[0].batches + s.stats.stages[1].batches + s.stats.stages[2].batches)
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(s.submit(_images(1, seed=i), NEVER) for i in range(3)))
        task.cancel()

    run(sched, body)
    assert sched.stats.stages[2].batches == 3
    assert len(set(ticks)) >= 9  # the ticker saw the count after (nearly) every one of the 9 batches


class Call(NamedTuple):
    """One stage call as the engine saw it."""

    stage: int
    on_loop: bool  # on the event loop's thread
    niceness: int  # of the calling thread


class CallRecordingEngine(SlowEngine):
    """Records every stage call (`Call`); a stage's delay counts in the seconds it reports (the
    scheduler predicts from them)."""

    loop_thread: int | None = None
    calls: list[Call]

    def run_stage_batch(self, k: int, state: StageBatch) -> StageOutput:
        niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.calls.append(Call(k, threading.get_ident() == self.loop_thread, niceness))
        out = super().run_stage_batch(k, state)
        return dataclasses.replace(out, seconds=out.seconds + self.delays.get(k, 0.0))


def test_hybrid_runs_short_batches_on_the_loop_and_long_ones_on_the_thread(
    manifest: Manifest, synthetic_artifact: Path
) -> None:
    """inline_max_ms: a stage whose measured time per row x batch rows stays under the limit runs on
    the loop; the slow stage (20 ms per batch, limit 5 ms) keeps the worker thread, and so does each
    stage's first batch, before anything was measured."""
    eng = CallRecordingEngine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    eng.delays, eng.failures, eng.calls = {1: 0.02}, {}, []
    sched = Scheduler(eng, max_batch_size=1, max_wait_ms=0, inline_max_ms=5.0)

    async def body(s: Scheduler) -> None:
        eng.loop_thread = threading.get_ident()
        for i in range(4):  # one at a time: every request is a batch of 1 at each stage
            await s.submit(_images(1, seed=i), NEVER)

    run(sched, body)
    on_loop = {k: [c.on_loop for c in eng.calls if c.stage == k] for k in range(E)}
    assert on_loop == {0: [False, True, True, True], 1: [False] * 4, 2: [False, True, True, True]}
    assert "up to 5 ms predicted" in sched.execution_summary()


def test_hybrid_limit_zero_is_the_thread_and_loop_mode_ignores_it(engine: SlowEngine) -> None:
    assert Scheduler(engine, inline_max_ms=0.0).execution_summary() == "on the ORT worker thread"
    assert Scheduler(engine, run_on_loop=True, inline_max_ms=5.0).inline_max_s == 0.0
    with pytest.raises(ValueError, match="inline_max_ms"):
        Scheduler(engine, inline_max_ms=float("nan"))


@pytest.mark.parametrize(("inline_ms", "nicer_by"), [(5.0, ORT_THREAD_NICENESS), (0.0, 0)])
def test_the_worker_thread_yields_the_cpu_to_the_loop_only_when_they_share_one(
    manifest: Manifest, synthetic_artifact: Path, inline_ms: float, nicer_by: int
) -> None:
    """With inline batches (one CPU) the ORT thread is nicer than the loop; with the plain thread
    (a second core for it) it keeps the loop's priority."""
    eng = CallRecordingEngine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    eng.delays, eng.failures, eng.calls = {}, {}, []
    sched = Scheduler(eng, max_batch_size=1, max_wait_ms=0, inline_max_ms=inline_ms)
    loop_niceness: list[int] = []

    async def body(s: Scheduler) -> None:
        eng.loop_thread = threading.get_ident()
        loop_niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        await s.submit(_images(1), NEVER)  # each stage's first batch goes to the thread

    run(sched, body)
    on_thread = {c.niceness for c in eng.calls if not c.on_loop}
    assert on_thread == {min(19, loop_niceness[0] + nicer_by)}
