"""Shadow work in the scheduler: after the answer, never in a request batch, only when idle, counted.

Each test drives its own event loop with asyncio.run. No timing bounds: ordering is shown with
events (a gated stage) and with what the engine double saw when it was called.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.artifact import Manifest, load_manifest
from service.core.engine import CPU, Engine, StageBatch, StageOutput
from service.core.scheduler import Scheduler
from service.core.scheduler.shadow import SHADOW_BATCH, ShadowItem, ShadowQueues
from tests.fixtures.synthetic_artifact import random_images

E = 3
EXIT_FIRST = np.array([0.0, 0.0, 0.0], dtype=np.float32)
NEVER = np.array([np.inf, np.inf, np.inf], dtype=np.float32)
EXECUTION = [pytest.param(False, id="thread"), pytest.param(True, id="loop")]
TAG = object()  # the thresholds in force, as ClassifyService would pass them


class RecordingEngine(Engine):
    """The real engine; records every stage call (stage, rows, request rows queued at that moment),
    and can hold every call at stage >= `hold_from` on a gate."""

    scheduler: Scheduler | None = None
    calls: list[tuple[int, int, int]]
    unanswered: list[tuple[int, int]]
    hold_from: int | None = None
    gate: threading.Event
    holding: threading.Event
    fail_from: int | None = None

    def run_stage_batch(self, k: int, state: StageBatch) -> StageOutput:
        queued = -1 if self.scheduler is None else sum(self.scheduler.queue_depths())
        self.calls.append((k, state.size, queued))
        # Images admitted and not yet answered, read at the call itself: the scheduler answers a
        # request (releasing its admission) right before it resolves the caller's future.
        self.unanswered.append((k, -1 if self.scheduler is None else self.scheduler.pending))
        if self.hold_from is not None and k >= self.hold_from:
            self.holding.set()
            assert self.gate.wait(timeout=30), "the test never released the gate"
        if self.fail_from is not None and k >= self.fail_from:
            raise RuntimeError("simulated ORT failure")
        return super().run_stage_batch(k, state)


class Sink:
    def __init__(self) -> None:
        self.shadow: list[tuple[int, list[bool], object]] = []
        self.eligible: dict[int, int] = {}
        self.shed: dict[int, int] = {}

    def on_eligible_exits(self, stage: int, count: int, tag: object) -> None:
        self.eligible[stage] = self.eligible.get(stage, 0) + count

    def on_shadow(self, stage: int, disagree: np.ndarray, tag: object) -> None:
        self.shadow.append((stage, [bool(v) for v in disagree], tag))

    def on_shadow_shed(self, stage: int, count: int) -> None:
        self.shed[stage] = self.shed.get(stage, 0) + count

    @property
    def samples(self) -> int:
        return sum(len(d) for _, d, _ in self.shadow)


@pytest.fixture(scope="module")
def manifest(synthetic_artifact: Path) -> Manifest:
    return load_manifest(synthetic_artifact)


@pytest.fixture()
def engine(manifest: Manifest, synthetic_artifact: Path) -> RecordingEngine:
    eng = RecordingEngine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    eng.calls, eng.unanswered, eng.gate, eng.holding = [], [], threading.Event(), threading.Event()
    return eng


def _images(n: int, seed: int = 7) -> np.ndarray:
    return random_images(n, channels=1, height=8, width=8, seed=seed)


async def _until(cond: Any) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def _scheduler(engine: RecordingEngine, sink: Sink, on_loop: bool, fraction: float = 1.0, **kw: Any) -> Scheduler:
    kw.setdefault("max_batch_size", 8)
    sched = Scheduler(engine, max_wait_ms=0, run_on_loop=on_loop, shadow_fraction=fraction, shadow_sink=sink, **kw)
    engine.scheduler = sched
    return sched


def test_the_sampled_request_is_answered_while_its_shadow_work_is_held(engine: RecordingEngine) -> None:
    """The required property: a slow (here: blocked) remaining stage adds nothing to the sampled
    request. Its answer comes back while its own shadow batch is held inside stage 2."""
    engine.hold_from = 1  # every row exits at stage 1, so any stage-2 call is shadow work
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=False)
    x = _images(3)

    async def main() -> tuple[list[Any], bool]:
        await sched.start()
        try:
            answers = await sched.submit(x, EXIT_FIRST, shadow=TAG)  # returns although stage 2 is blocked
            await _until(engine.holding.is_set)  # ... and the shadow batch really is in stage 2
            held_when_answered = sink.samples == 0
            engine.gate.set()
            await _until(lambda: sink.samples == 3)
            return answers, held_when_answered
        finally:
            engine.gate.set()
            await sched.stop(drain=True, timeout=5)

    answers, held = asyncio.run(main())
    assert held
    assert [r.exit_index for r in answers] == [0, 0, 0]
    np.testing.assert_array_equal(np.stack([r.logits for r in answers]), engine.run_all_stages(x)[0])


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_no_shadow_stage_runs_before_the_sampled_request_has_its_answer(engine: RecordingEngine, on_loop: bool) -> None:
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop)

    async def main() -> None:
        await sched.start()
        try:
            await sched.submit(_images(4), EXIT_FIRST, shadow=TAG)
            await _until(lambda: sink.samples == 4)
        finally:
            await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    # Observed at each stage call, not when the awaiting test resumes: in thread mode the worker may
    # start the shadow batch between the answer and the caller's next turn (that is allowed).
    deeper = [unanswered for k, unanswered in engine.unanswered if k > 0]
    assert deeper and all(unanswered == 0 for unanswered in deeper), engine.unanswered
    assert [k for k, _, _ in engine.calls] == [0, 1, 2]  # one request batch, then the shadow's stages 2 and 3


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_shadow_never_changes_an_answer_and_compares_with_the_full_network(
    engine: RecordingEngine, on_loop: bool
) -> None:
    rng = np.random.default_rng(3)
    requests = [(_images(n, seed=10 + n), rng.uniform(0.2, 0.9, size=(n, E)).astype(np.float32)) for n in (1, 6, 3, 8)]
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop)

    async def main() -> list[list[Any]]:
        await sched.start()
        try:
            answers = list(await asyncio.gather(*(sched.submit(x, t, shadow=TAG) for x, t in requests)))
            early = sum(1 for a in answers for r in a if r.exit_index < E - 1)
            await _until(lambda: sink.samples == early)
            return answers
        finally:
            await sched.stop(drain=True, timeout=5)

    answers = asyncio.run(main())
    want_disagree: dict[int, list[bool]] = {}
    for (x, t), got in zip(requests, answers, strict=True):
        want = engine.classify(x, t)
        assert [r.exit_index for r in got] == [r.exit_index for r in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.logits, w.logits, rtol=1e-5, atol=1e-6)
        logits = engine.run_all_stages(x)
        for i, r in enumerate(got):
            if r.exit_index < E - 1:
                differs = int(logits[r.exit_index][i].argmax()) != int(logits[-1][i].argmax())
                want_disagree.setdefault(r.exit_index, []).append(differs)
    got_disagree: dict[int, list[bool]] = {}
    for stage, flags, tag in sink.shadow:
        assert tag is TAG
        got_disagree.setdefault(stage, []).extend(flags)
    assert {k: sorted(v) for k, v in got_disagree.items()} == {k: sorted(v) for k, v in want_disagree.items()}
    exits = [r.exit_index for a in answers for r in a]
    assert sink.eligible == {k: exits.count(k) for k in set(exits)}  # every exit of an eligible request
    assert not sink.shed


def _spy_shadow(sched: Scheduler) -> list[int]:
    """Record the request rows queued each time the dispatcher starts a shadow batch."""
    seen: list[int] = []
    original = sched._run_shadow

    async def spy() -> None:
        seen.append(sum(sched.queue_depths()))
        await original()

    sched._run_shadow = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_shadow_batches_run_only_when_no_request_row_waits_and_never_join_one(
    engine: RecordingEngine, on_loop: bool
) -> None:
    """Request batches hold exactly the request rows (as without shadow work); every shadow batch
    started with every request queue empty and held at most SHADOW_BATCH rows."""
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop)
    started = _spy_shadow(sched)
    thr = np.stack([EXIT_FIRST, NEVER, EXIT_FIRST, NEVER])

    async def main() -> None:
        await sched.start()
        try:
            for wave in range(3):
                await asyncio.gather(*(sched.submit(_images(4, seed=wave * 10 + i), thr, shadow=TAG) for i in range(5)))
            await _until(lambda: sink.samples == 3 * 5 * 2)
        finally:
            await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    request_rows = [s.items for s in sched.stats.stages]
    assert request_rows == [60, 30, 30]  # the request batches: exactly the work without shadow
    calls_per_stage = [sum(n for k, n, _ in engine.calls if k == stage) for stage in range(E)]
    assert [c - r for c, r in zip(calls_per_stage, request_rows, strict=True)] == [0, 30, 30]
    shadow_calls = len(engine.calls) - sum(s.batches for s in sched.stats.stages)
    assert shadow_calls == len(started) > 0 and set(started) == {0}
    assert all(n <= SHADOW_BATCH for n in (n for (_, n, _) in engine.calls[-shadow_calls:]))


def test_a_request_row_waiting_for_a_fuller_batch_keeps_shadow_work_waiting(engine: RecordingEngine) -> None:
    """Stage 1 holds a partial batch (waiting max_batch_wait for more rows): the worker is idle, yet
    that is not spare capacity, since the batch may fill and must then run at once."""
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=True, max_batch_size=8)
    sched.settings = type(sched.settings)(max_batch_size=8, max_wait=60.0, merge_wait=60.0)
    started = _spy_shadow(sched)

    async def main() -> None:
        await sched.start()
        full = asyncio.create_task(sched.submit(_images(8, seed=1), EXIT_FIRST, shadow=TAG))
        waiting = asyncio.create_task(sched.submit(_images(1, seed=2), EXIT_FIRST, shadow=TAG))
        await full  # a full batch: ran at once; its 8 samples are queued, the 9th row waits for company
        for _ in range(50):
            await asyncio.sleep(0)
        assert started == [] and not waiting.done()
        await sched.stop(drain=True, timeout=5)  # closing: the partial batch runs, the shadow is dropped
        await waiting

    asyncio.run(main())
    assert started == [] and sink.samples == 0 and sum(sink.shed.values()) == 9


@pytest.mark.parametrize("on_loop", EXECUTION)
def test_only_eligible_early_exiting_requests_are_sampled(engine: RecordingEngine, on_loop: bool) -> None:
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop)

    async def main() -> None:
        await sched.start()
        try:
            await sched.submit(_images(3, seed=1), EXIT_FIRST)  # own budget: no tag
            await sched.submit(_images(3, seed=2), EXIT_FIRST, shadow=TAG, early_exit=False)  # every stage anyway
            await sched.submit(_images(3, seed=3), NEVER, shadow=TAG)  # answered by the full network
            for _ in range(20):
                await asyncio.sleep(0)
        finally:
            await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    assert sink.samples == 0 and sink.eligible == {2: 3}
    assert [s.items for s in sched.stats.stages] == [9, 6, 6]
    assert len(engine.calls) == 7  # request batches only: 3 at stage 1, 2 + 2 deeper


def test_fraction_zero_takes_no_sample_and_a_fraction_samples_about_that_share(engine: RecordingEngine) -> None:
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=True, fraction=0.25, shadow_seed=5)

    async def main() -> None:
        await sched.start()
        try:
            for i in range(40):
                await sched.submit(_images(8, seed=i), EXIT_FIRST, shadow=TAG)
            await _until(lambda: sink.eligible.get(0, 0) == 320 and not sched._shadow.rows)
        finally:
            await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    # Binomial(320, 0.25): mean 80, sd 7.7; the seed is fixed, so this is a deterministic check of the draw
    assert 50 <= sink.samples <= 110
    off = Scheduler(engine, shadow_fraction=0.0, shadow_sink=sink)
    assert off.shadow_sink is None
    with pytest.raises(ValueError, match="shadow_fraction"):
        Scheduler(engine, shadow_fraction=1.5)


def test_full_shadow_queues_shed(engine: RecordingEngine) -> None:
    """One request of 24 rows, batches of 8: shadow work waits for all three request batches, the
    first 8 samples fill the bound, the other 16 are shed."""
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=False)
    sched._shadow.capacity = 8

    async def main() -> None:
        await sched.start()
        try:
            await sched.submit(_images(24, seed=1), EXIT_FIRST, shadow=TAG)
            await _until(lambda: sink.samples == 8)
        finally:
            await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    assert sink.shed == {0: 16} and sink.samples == 8


def test_shutdown_drops_queued_shadow_work(engine: RecordingEngine) -> None:
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=True)

    async def main() -> None:
        await sched.start()
        await sched.submit(_images(5, seed=1), EXIT_FIRST, shadow=TAG)  # answered; its shadow is queued
        await sched.stop(drain=True, timeout=5)

    asyncio.run(main())
    assert sink.shed == {0: 5} and sink.samples == 0
    assert [k for k, _, _ in engine.calls] == [0]


def test_a_failing_shadow_batch_sheds_its_rows_and_fails_no_request(engine: RecordingEngine) -> None:
    engine.fail_from = 2  # only shadow work reaches stage 3 here
    sink = Sink()
    sched = _scheduler(engine, sink, on_loop=True)

    async def main() -> list[Any]:
        await sched.start()
        try:
            first = await sched.submit(_images(2, seed=1), EXIT_FIRST, shadow=TAG)
            await _until(lambda: sink.shed.get(0, 0) == 2)
            second = await sched.submit(_images(2, seed=2), EXIT_FIRST, shadow=TAG)
            return [*first, *second]
        finally:
            await sched.stop(drain=True, timeout=5)

    answers = asyncio.run(main())
    assert [r.exit_index for r in answers] == [0] * 4 and sink.samples == 0


def test_shadow_queues_bound_split_and_order() -> None:
    queues = ShadowQueues(3, capacity=20, batch=4)
    state = StageBatch.from_arrays({"x": np.arange(10, dtype=np.float32)[:, None]})
    item = ShadowItem(0, np.arange(10), state, TAG)
    assert queues.offer(1, item) == 0 and queues.rows == 10
    assert queues.offer(2, ShadowItem(1, np.arange(3), state.take(slice(0, 3)), TAG)) == 0
    assert queues.offer(1, item) == 10  # 13 + 10 > 20: shed whole
    stage, items = queues.take()  # type: ignore[misc]
    assert stage == 2 and [len(i.labels) for i in items] == [3]  # deepest first
    sizes = []
    while (taken := queues.take()) is not None:
        sizes.append(sum(len(i.labels) for i in taken[1]))
    assert sizes == [4, 4, 2] and max(sizes) <= 4 and queues.rows == 0
    assert SHADOW_BATCH <= 8
