"""The exit rule (service.core.exit_rule): confidence, exit test, last exit; and that the engine, the
scheduler and the policies all apply it (a tie exits everywhere)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from service.core import exit_rule as R
from service.core import policies as P
from service.core.artifact import CalibrationData, load_manifest
from service.core.engine import CPU, Engine
from service.core.scheduler import Scheduler
from tests.fixtures.synthetic_artifact import random_images


def test_softmax_is_stable_float32_and_leaves_the_logits() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=np.float32)
    before = logits.copy()
    p = R.softmax(logits)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(p[1], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_array_equal(logits, before)
    conf = R.max_softmax(logits)
    assert conf.dtype == np.float32 and conf.shape == (2,)
    np.testing.assert_array_equal(conf, R.confidence(p))


def test_max_softmax_is_row_independent() -> None:
    """A row's confidence does not depend on the batch around it (calibration batches, serving
    does not): the same bits alone, in a batch of 1000 and at any position."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1000, 10)) * 4).astype(np.float32)
    batch = R.max_softmax(logits)
    alone = np.concatenate([R.max_softmax(logits[i : i + 1]) for i in range(1000)])
    np.testing.assert_array_equal(batch, alone)


def test_exits_ties_exit_nan_never() -> None:
    conf = np.array([0.5, 0.5, 0.5, 0.5, np.nan], dtype=np.float32)
    thr = np.array([0.5, np.nextafter(np.float32(0.5), np.float32(1)), np.nan, -np.inf, -np.inf], dtype=np.float32)
    assert R.exits(conf, thr).tolist() == [True, False, False, True, False]
    assert R.exits(conf[:1], R.ALWAYS_EXIT).tolist() == [True]
    assert R.exits(conf[:1], R.NEVER_EXIT).tolist() == [False]


def test_exits_compares_in_float32() -> None:
    """0.9 as a float64 threshold is above float32(0.9); the tie must still exit."""
    conf = np.array([0.9], dtype=np.float32)
    assert float(conf[0]) < 0.9
    assert R.exits(conf, 0.9).tolist() == [True]
    assert R.exits(conf, np.array([0.9])).tolist() == [True]


def test_force_last_exit_lists_and_arrays() -> None:
    values = [0.5, 0.7, 0.9]
    assert R.force_last_exit(values) is values and values == [0.5, 0.7, R.ALWAYS_EXIT]
    table = np.full((2, 3), 0.5, dtype=np.float32)
    R.force_last_exit(table)
    assert np.isneginf(table[:, -1]).all() and (table[:, :-1] == 0.5).all()


def test_exit_indices_first_exit_taken_last_always() -> None:
    conf = np.array([[0.9, 0.2, 0.5, np.nan], [0.1, 0.8, 0.1, 0.9], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    # T[-1] = +inf is ignored: the last exit answers whatever it says.
    assert R.exit_indices(conf, [0.5, 0.8, math.inf]).tolist() == [0, 1, 0, 1]
    assert R.exit_indices(conf, [math.inf, math.inf, math.inf]).tolist() == [2, 2, 2, 2]


# --------------------------------------------------------------------------------------------------
# every user of the rule: a confidence exactly on its threshold exits
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(synthetic_artifact: Path) -> Engine:
    return Engine(load_manifest(synthetic_artifact), synthetic_artifact, providers=[CPU])


def _tie_thresholds(engine: Engine, images: np.ndarray) -> np.ndarray:
    """(B, E) per image: its own stage-1 confidence at exit 1 (a tie), never exit in between."""
    conf0 = R.max_softmax(engine.run_all_stages(images)[0])  # (B,)
    thr = np.full((len(images), engine.num_stages), np.inf, dtype=np.float32)
    thr[:, 0] = conf0
    return thr


def test_engine_tie_exits(engine: Engine) -> None:
    images = random_images(16, channels=1, height=8, width=8, seed=21)
    thr = _tie_thresholds(engine, images)
    assert [r.exit_index for r in engine.classify(images, thr)] == [0] * 16
    above = thr.copy()
    above[:, 0] = np.nextafter(thr[:, 0], np.float32(np.inf))
    assert {r.exit_index for r in engine.classify(images, above)} == {engine.num_stages - 1}


def test_scheduler_tie_exits(engine: Engine) -> None:
    images = random_images(16, channels=1, height=8, width=8, seed=22)
    thr = _tie_thresholds(engine, images)

    async def serve() -> tuple[list[int], list[int]]:
        scheduler = Scheduler(engine, max_batch_size=8, max_wait_ms=1.0)
        await scheduler.start()
        try:
            together = await scheduler.submit(images, thr)
            alone = await asyncio.gather(*(scheduler.submit(images[i : i + 1], thr[i]) for i in range(16)))
        finally:
            await scheduler.stop()
        return [r.exit_index for r in together], [rs[0].exit_index for rs in alone]

    together, alone = asyncio.run(serve())
    assert together == [0] * 16 and alone == [0] * 16


def test_policies_tie_exits() -> None:
    conf = np.array([[0.5, 0.25], [0.9, 0.9]], dtype=np.float32)
    cal = CalibrationData(conf, np.ones_like(conf, dtype=bool), np.array([1.0, 2.0]))
    assert P.evaluate_thresholds(cal, [0.5, 0.0]).exit_fractions == (0.5, 0.5)
    assert P.explicit(cal, [0.25, None]).exit_fractions == (1.0, 0.0)
