"""Fixtures of the `gpu` tests: the engine on the device under test, and its references.

BOOSTSERVE_GPU_TEST_DEVICE picks the device: `cuda` (default; what `make gpu-check` runs on a GPU
machine) or `cpu` (the same tests through the CPU binding path: the script's `--cpu-only` dry run,
which CI runs). Without a CUDA build of ONNX Runtime the cuda tests skip; with one whose sessions
fall back to CPU (no GPU, a CUDA library missing) they skip too, naming the providers in use: the
check's `providers` step is what fails loudly then, and its summary counts a skipped test as a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from service.core.artifact import load_manifest
from service.core.engine import CPU, CUDA, Engine

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "service" / "embedded_model"
EXAMPLES = ROOT / "examples" / "images"
DEVICE_ENV = "BOOSTSERVE_GPU_TEST_DEVICE"
#: How many of the shipped test images (from image 0); the script's CPU dry run takes fewer.
IMAGES_ENV = "BOOSTSERVE_GPU_TEST_IMAGES"


@pytest.fixture(scope="session")
def device() -> str:
    name = os.environ.get(DEVICE_ENV, "cuda")
    if name not in ("cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_ENV} must be cuda or cpu, got {name!r}")
    if name == "cuda":
        import onnxruntime as ort

        if CUDA not in ort.get_available_providers():
            pytest.skip(f"this onnxruntime build has no {CUDA} (install the gpu extra on a GPU machine)")
    return name


@pytest.fixture(scope="session")
def engine(device: str) -> Engine:
    """The engine under test: CUDA with IO binding (its default there), or CPU with io_binding=True."""
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    engine = Engine(load_manifest(EMBEDDED), EMBEDDED, providers=providers, io_binding=True)
    if device == "cuda" and not engine.uses_cuda:
        pytest.skip(f"ONNX Runtime fell back from CUDA: the sessions run on {engine.providers}")
    return engine


@pytest.fixture(scope="session")
def plain_on_device(engine: Engine) -> Engine:
    """Same device, plain session.run: same kernels, so answers agree within a batch's rounding."""
    return Engine(engine.manifest, EMBEDDED, providers=engine.requested_providers, io_binding=False)


@pytest.fixture(scope="session")
def cpu_engine(engine: Engine) -> Engine:
    return Engine(engine.manifest, EMBEDDED, providers=[CPU])


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """(n + 10, 1, 28, 28): the first n shipped test images (n = 512 unless IMAGES_ENV says), then
    the 10 example PNGs."""
    from PIL import Image

    from bench.common import load_artifact
    from bench.data import preprocess
    from bench.gpu_check import load_images, preprocessed

    artifact = load_artifact(EMBEDDED)
    test, _ = load_images(None, int(os.environ.get(IMAGES_ENV, "512")))
    names = sorted(json.loads((EXAMPLES / "labels.json").read_text()))
    pngs = np.stack([np.asarray(Image.open(EXAMPLES / n).convert("L")) for n in names])  # (10, 28, 28)
    spec = artifact.manifest.preprocessing
    examples = preprocess(
        pngs, height=spec.height, width=spec.width, channels=spec.channels, mean=list(spec.mean), std=list(spec.std)
    )
    return np.concatenate([preprocessed(artifact, test), examples])
