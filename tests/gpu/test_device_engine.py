"""The engine's IO-binding path on the device (`make gpu-check`; docs/gpu.md).

Deselected by default (marker `gpu`); runs on CUDA, or on the CPU binding path with
BOOSTSERVE_GPU_TEST_DEVICE=cpu (tests/gpu/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.gpu_check import LABEL_TIE_MARGIN
from service.core.engine import CPU, CUDA, Engine
from service.core.exit_rule import confidence, softmax
from tests.fixtures.binding_checks import check_device_resident_between_stages, check_survivor_compaction

pytestmark = pytest.mark.gpu


def test_sessions_really_run_on_the_device(engine: Engine, device: str) -> None:
    """session.get_providers() of every stage, read back by the engine: no silent CPU fallback."""
    assert engine.uses_binding
    if device == "cuda":
        assert engine.uses_cuda and engine.providers[0] == CUDA, engine.providers
        assert engine.binding_device == "cuda"
    else:
        assert engine.providers == [CPU] and engine.binding_device == "cpu"


def test_features_stay_on_the_device_when_nobody_exits(engine: Engine, images: np.ndarray) -> None:
    for batch in (1, 64, 256):
        check_device_resident_between_stages(engine, images[:batch])


def test_binding_equals_plain_runs_on_the_same_device(
    engine: Engine, plain_on_device: Engine, images: np.ndarray
) -> None:
    for got, want in zip(engine.run_all_stages(images), plain_on_device.run_all_stages(images), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(got.argmax(axis=-1), want.argmax(axis=-1))


def test_survivor_compaction(engine: Engine, plain_on_device: Engine, images: np.ndarray) -> None:
    """Images leave at every exit; each stage runs on the survivors alone, answers as the plain path."""
    check_survivor_compaction(engine, plain_on_device, images, exact=False, atol=1e-4)
    check_survivor_compaction(engine, plain_on_device, images[:37], exact=False, atol=1e-4)


def test_labels_equal_the_cpu_on_fixed_images(engine: Engine, cpu_engine: Engine, images: np.ndarray) -> None:
    """Every exit's label equals the CPU engine's, except where the CPU's top-2 logits are within
    LABEL_TIE_MARGIN (rounding of another device's kernels may flip a near tie)."""
    for k, (dev, ref) in enumerate(zip(engine.run_all_stages(images), cpu_engine.run_all_stages(images), strict=True)):
        top2 = np.sort(ref, axis=-1)[:, -2:]  # (n, 2)
        clear = (top2[:, 1] - top2[:, 0]) >= LABEL_TIE_MARGIN
        differ = dev.argmax(axis=-1) != ref.argmax(axis=-1)
        assert not (differ & clear).any(), f"exit {k + 1}: labels differ at {np.flatnonzero(differ & clear)}"
        assert clear.mean() > 0.9  # the comparison is not vacuous
        np.testing.assert_allclose(confidence(softmax(dev)), confidence(softmax(ref)), rtol=0, atol=1e-2)
