"""The engine's IO-binding path on the CPU provider: the CUDA path's wiring, tested in every CI run.

ONNX Runtime binds CPU OrtValues the way it binds CUDA ones, so `Engine(io_binding=True)` on CPU
runs the code a GPU runs: outputs kept as OrtValues and bound into the next stage, survivors
gathered on the host after an exit. On CPU both paths run the same kernels: answers must be equal
bit for bit to the plain `session.run` path.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.core.artifact import load_calibration, load_manifest
from service.core.engine import CPU, Engine
from service.core.exit_rule import confidence, softmax
from service.core.scheduler import Scheduler
from tests.fixtures.binding_checks import (
    assert_same_answers,
    check_device_resident_between_stages,
    check_survivor_compaction,
    gap_thresholds,
)
from tests.fixtures.synthetic_artifact import random_images

EMBEDDED = Path(__file__).resolve().parents[2] / "service" / "embedded_model"
SAMPLE = Path(__file__).resolve().parents[2] / "bench" / "fmnist_test_head.npz"


def _pair(root: Path) -> tuple[Engine, Engine]:
    manifest = load_manifest(root)
    return (
        Engine(manifest, root, providers=[CPU], io_binding=True),
        Engine(manifest, root, providers=[CPU]),
    )


@pytest.fixture(scope="module")
def synthetic(synthetic_artifact: Path) -> tuple[Engine, Engine]:
    return _pair(synthetic_artifact)


@pytest.fixture(scope="module")
def embedded() -> tuple[Engine, Engine]:
    return _pair(EMBEDDED)


@pytest.fixture(scope="module")
def sample_images(embedded: tuple[Engine, Engine]) -> np.ndarray:
    """(256, 1, 28, 28): the first test images, preprocessed as the bench does (bench.gpu_check)."""
    from bench.common import load_artifact
    from bench.gpu_check import load_images, preprocessed

    test, _ = load_images(None, 256)
    return preprocessed(load_artifact(EMBEDDED), test)


def test_binding_is_off_by_default_on_cpu_and_on_when_asked(synthetic: tuple[Engine, Engine]) -> None:
    bound, plain = synthetic
    assert bound.uses_binding and bound.binding_device == "cpu" and not bound.uses_cuda
    assert not plain.uses_binding


def test_run_all_stages_equals_the_plain_path_bitwise(synthetic: tuple[Engine, Engine]) -> None:
    bound, plain = synthetic
    x = random_images(23, seed=11)
    for got, want in zip(bound.run_all_stages(x), plain.run_all_stages(x), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_outputs_stay_ortvalues_between_stages(synthetic: tuple[Engine, Engine]) -> None:
    check_device_resident_between_stages(synthetic[0], random_images(9, seed=2))


def test_plain_path_counts_host_inputs_only(synthetic: tuple[Engine, Engine]) -> None:
    plain = synthetic[1]
    before = plain.stage_stats()
    plain.run_all_stages(random_images(4, seed=1))
    after = plain.stage_stats()
    assert all(a.ortvalue_inputs == b.ortvalue_inputs for a, b in zip(after, before, strict=True))
    assert [a.array_inputs - b.array_inputs for a, b in zip(after, before, strict=True)] == [1, 2, 2]


def test_survivor_compaction_matches_the_plain_path(synthetic: tuple[Engine, Engine]) -> None:
    bound, plain = synthetic
    check_survivor_compaction(bound, plain, random_images(64, seed=5), exact=True)


def test_cascade_artifact_carries_the_image_through_the_binding_path(synthetic_artifact_rgb_cascade: Path) -> None:
    bound, plain = _pair(synthetic_artifact_rgb_cascade)
    x = random_images(40, channels=3, seed=8)
    for got, want in zip(bound.run_all_stages(x), plain.run_all_stages(x), strict=True):
        np.testing.assert_array_equal(got, want)
    check_survivor_compaction(bound, plain, x, exact=True)


def test_embedded_model_on_real_images(embedded: tuple[Engine, Engine], sample_images: np.ndarray) -> None:
    """The shipped model: the binding path's answers equal the plain path's, at every exit and
    after compaction, and its confidences are calibration.npz's within float32 rounding."""
    bound, plain = embedded
    x = sample_images
    got, want = bound.run_all_stages(x), plain.run_all_stages(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    stored = load_calibration(EMBEDDED, bound.manifest, "test").confidence[:, : len(x)]  # (E, n)
    np.testing.assert_allclose(np.stack([confidence(softmax(f)) for f in got]), stored, rtol=0, atol=1e-5)
    check_device_resident_between_stages(bound, x[:32])
    check_survivor_compaction(bound, plain, x, exact=True)


def test_gap_thresholds_sit_between_confidences() -> None:
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((50, 4)).astype(np.float32) * 3 for _ in range(3)]
    thresholds = gap_thresholds(logits)
    assert thresholds.shape == (3,) and thresholds[-1] == 0.0
    for f, t in zip(logits[:-1], thresholds[:-1], strict=True):
        conf = confidence(softmax(f))
        above, below = conf[conf > t], conf[conf < t]
        assert len(above) >= 12 and len(below) >= 12 and not (conf == t).any()


def test_scheduler_over_a_binding_engine_answers_like_the_plain_engine(synthetic: tuple[Engine, Engine]) -> None:
    """Cross-request batches merge (concat) and split (take) states holding OrtValues."""
    bound, plain = synthetic
    rng = np.random.default_rng(4)
    requests = [(random_images(n, seed=n), rng.uniform(0.3, 0.8, size=(n, 3)).astype(np.float32)) for n in (1, 6, 3)]
    scheduler = Scheduler(bound, max_batch_size=8, max_wait_ms=20)

    async def main() -> list[list[object]]:
        await scheduler.start()
        try:
            return list(await asyncio.gather(*(scheduler.submit(x, t) for x, t in requests)))
        finally:
            await scheduler.stop(drain=True, timeout=5)

    answers = asyncio.run(main())
    for (x, t), got in zip(requests, answers, strict=True):
        assert_same_answers(got, plain.classify(x, t), exact=False, atol=1e-6)  # type: ignore[arg-type]
