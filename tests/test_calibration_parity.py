"""Serving and calibration agree bit for bit on the fp32 embedded model (service.core.exit_rule).

The int8 version, the served default, has the same check in tests/export/test_quantize_embedded.py.

The held-out images are reproduced from the manifest's provenance (Fashion-MNIST at DATA, the
recorded split seed) and served through the engine and the scheduler: their confidences must equal
calibration.npz's heldout_confidence exactly, and every image exits where the policies predict
from those arrays -- including the images whose confidence *is* a calibrated threshold (ties exit).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.core import policies as P
from service.core.artifact import CalibrationData, Manifest, load_manifest
from service.core.engine import CPU, Engine
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT, exit_indices
from service.core.scheduler import Scheduler
from service.http.settings import EMBEDDED_FP32_MODEL_DIR as EMBEDDED_MODEL_DIR
from tests.fixtures.heldout import heldout_of

FIRST = 512  # held-out images served per check (the whole split is 5000)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def heldout(manifest: Manifest) -> tuple[np.ndarray, CalibrationData]:
    """(5000, 1, 28, 28) held-out images in calibration order, and the stored held-out arrays."""
    return heldout_of(EMBEDDED_MODEL_DIR, manifest)


@pytest.fixture(scope="module")
def engine(manifest: Manifest) -> Engine:
    return Engine(manifest, EMBEDDED_MODEL_DIR, providers=[CPU])


def _serve(engine: Engine, images: np.ndarray, thresholds: np.ndarray) -> list[tuple[int, float]]:
    """(exit index, confidence) per image, one request per image through the batching scheduler."""

    async def run() -> list[tuple[int, float]]:
        scheduler = Scheduler(engine, max_batch_size=32, max_wait_ms=2.0)
        await scheduler.start()
        try:
            answers = await asyncio.gather(
                *(scheduler.submit(images[i : i + 1], thresholds[i]) for i in range(len(images)))
            )
        finally:
            await scheduler.stop()
        return [(r[0].exit_index, r[0].confidence) for r in answers]

    return asyncio.run(run())


def test_served_confidences_equal_calibration_bitwise(
    engine: Engine, heldout: tuple[np.ndarray, CalibrationData]
) -> None:
    images, cal = heldout
    x = images[:FIRST]
    for k in range(engine.num_stages):  # max_exit k + 1: every image answers at exit k
        thresholds = np.array([NEVER_EXIT] * k + [ALWAYS_EXIT] * (engine.num_stages - k), dtype=np.float32)
        served = _serve(engine, x, np.broadcast_to(thresholds, (FIRST, engine.num_stages)))
        assert {e for e, _ in served} == {k}
        np.testing.assert_array_equal(np.array([c for _, c in served], dtype=np.float32), cal.confidence[k, :FIRST])
        direct = np.array([r.confidence for r in engine.classify(x, thresholds)], dtype=np.float32)
        np.testing.assert_array_equal(direct, cal.confidence[k, :FIRST])


def test_images_on_a_calibrated_threshold_exit_there(
    engine: Engine, heldout: tuple[np.ndarray, CalibrationData]
) -> None:
    """budget_macs thresholds are held-out confidences (max_accuracy_drop's are points of a path fixed
    in code, so they rarely are): the images that sit exactly on them must exit there when served (a
    `>` instead of `>=` anywhere on the serving side fails this)."""
    images, cal = heldout
    macs = cal.cumulative_macs
    result = P.budget_macs(cal, float(macs[0] + macs[-1]) / 4, "optimal")
    thresholds = result.as_array()  # (E,)
    on_threshold = np.flatnonzero((cal.confidence[:-1] == thresholds[:-1, None]).any(axis=0))
    assert on_threshold.size > 0, "no held-out image sits on a threshold: the tie case is not exercised"
    chosen = np.union1d(on_threshold, np.arange(FIRST))
    predicted = exit_indices(cal.confidence[:, chosen], thresholds)  # (m,) where the policy says
    served = _serve(engine, images[chosen], np.broadcast_to(thresholds, (chosen.size, engine.num_stages)))
    np.testing.assert_array_equal(np.array([e for e, _ in served]), predicted)
    # The tie images in particular: each exits at (or before) the exit whose threshold it equals.
    ties = np.isin(chosen, on_threshold)
    first_tie = np.argmax(cal.confidence[:-1, chosen[ties]] == thresholds[:-1, None], axis=0)
    assert (np.array([e for e, _ in served])[ties] <= first_tie).all()
    # And P.evaluate_thresholds counts the same exits on the full split.
    fractions = np.bincount(exit_indices(cal.confidence, thresholds), minlength=cal.num_exits) / cal.num_samples
    assert result.exit_fractions == tuple(float(f) for f in fractions)
