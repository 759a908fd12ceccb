"""The shipped int8 artifact (service/embedded_model_int8): what its calibration says is what it serves.

Like tests/test_calibration_parity.py for the fp32 model: held-out images reproduced from the
manifest's provenance, served one request each through the batching scheduler (so stage batches of
any size and survivor compaction), must give confidences bit for bit equal to calibration.npz (the int8
kernels must not depend on the batch an image lands in), and the int8 labels must agree with the fp32
model's on those images at the rate the export recorded. Skipped without the dataset.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.core.artifact import CalibrationData, Manifest, load_manifest
from service.core.engine import CPU, Engine
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT
from service.core.scheduler import Scheduler
from service.http.settings import EMBEDDED_FP32_MODEL_DIR, EMBEDDED_INT8_MODEL_DIR, EMBEDDED_MODEL_DIR
from tests.fixtures.heldout import heldout_of

INT8_DIR = EMBEDDED_INT8_MODEL_DIR
FIRST = 256  # held-out images served per exit

pytestmark = pytest.mark.skipif(not (INT8_DIR / "manifest.json").is_file(), reason="no shipped int8 artifact")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(INT8_DIR)


@pytest.fixture(scope="module")
def heldout(manifest: Manifest) -> tuple[np.ndarray, CalibrationData]:
    return heldout_of(INT8_DIR, manifest)


def test_shipped_int8_is_quantized_and_recorded(manifest: Manifest) -> None:
    assert "int8" in manifest.precisions
    recorded = manifest.provenance.model_dump()["quantization"]
    assert recorded["precisions"] == manifest.precisions
    assert recorded["calibration_images"]["split"].startswith("train")
    assert recorded["source"]["version"] == load_manifest(EMBEDDED_FP32_MODEL_DIR).version
    assert all(p["label_agreement"] >= 0.97 for p in recorded["parity_vs_fp32"])


def test_int8_served_confidences_equal_calibration_bitwise(
    manifest: Manifest, heldout: tuple[np.ndarray, CalibrationData]
) -> None:
    images, cal = heldout
    x = images[:FIRST]
    engine = Engine(manifest, INT8_DIR, providers=[CPU])

    async def serve(thresholds: np.ndarray) -> list[tuple[int, float]]:
        scheduler = Scheduler(engine, max_batch_size=32, max_wait_ms=2.0)
        await scheduler.start()
        try:
            answers = await asyncio.gather(*(scheduler.submit(x[i : i + 1], thresholds) for i in range(FIRST)))
        finally:
            await scheduler.stop()
        return [(r[0].exit_index, r[0].confidence) for r in answers]

    for k in range(engine.num_stages):
        thresholds = np.array([NEVER_EXIT] * k + [ALWAYS_EXIT] * (engine.num_stages - k), dtype=np.float32)
        served = asyncio.run(serve(thresholds))
        assert {e for e, _ in served} == {k}
        np.testing.assert_array_equal(np.array([c for _, c in served], dtype=np.float32), cal.confidence[k, :FIRST])


def test_int8_labels_agree_with_fp32(manifest: Manifest, heldout: tuple[np.ndarray, CalibrationData]) -> None:
    images, _ = heldout
    x = images[:1000]
    served = Engine(manifest, INT8_DIR, providers=[CPU]).run_all_stages(x)
    fp32 = Engine(load_manifest(EMBEDDED_FP32_MODEL_DIR), EMBEDDED_FP32_MODEL_DIR, providers=[CPU])
    reference = fp32.run_all_stages(x)
    for a, b in zip(served, reference, strict=True):
        assert float((a.argmax(-1) == b.argmax(-1)).mean()) >= 0.97


def test_the_served_default_is_the_int8_version() -> None:
    """`boostserve serve` with no --artifacts serves int8 (as accurate or more at equal measured cost)."""
    from service.http.settings import Settings

    assert EMBEDDED_MODEL_DIR == INT8_DIR != EMBEDDED_FP32_MODEL_DIR
    assert Settings().artifacts_dir == INT8_DIR
