"""Tiny configs and generated dataset fixtures (everything small enough for a CPU test run)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import CompactConfig, ModelConfig, MSDNetConfig, TrainingConfig


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny_compact(num_classes: int = 4, image_size: int = 12, in_channels: int = 1) -> ModelConfig:
    return ModelConfig(
        name="tiny-compact",
        arch="compact",
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=(0.5,) * in_channels,
        std=(0.25,) * in_channels,
        compact=CompactConfig(stem_channels=4, widths=(4, 8, 8), blocks=(1, 1, 1), strides=(1, 2, 1)),
        training=TrainingConfig(
            epochs=4,
            batch_size=16,
            lr=0.05,
            schedule="cosine",
            milestones=(),
            augment="none",
            weight_decay=0.0,
        ),
    )


def tiny_msdnet(n_blocks: int = 3) -> ModelConfig:
    return ModelConfig(
        name="tiny-msdnet",
        arch="msdnet",
        num_classes=5,
        in_channels=3,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        msdnet=MSDNetConfig(n_blocks=n_blocks, step=1, base=2, n_channels=4, growth_rate=4, head_channels=8),
    )


@pytest.fixture
def compact_config() -> ModelConfig:
    return tiny_compact()


@pytest.fixture
def msdnet_config() -> ModelConfig:
    return tiny_msdnet()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def separable_images(n: int, classes: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class decides which horizontal band is bright: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, channels, size, size))
    band = size // classes
    for i, y in enumerate(labels):
        images[i, :, y * band : (y + 1) * band, :] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fmnist"
    d.mkdir()
    xtr, ytr = separable_images(240, 4, 12, 1, seed=1)
    xte, yte = separable_images(60, 4, 12, 1, seed=2)
    _write_idx(d / "train-images-idx3-ubyte.gz", xtr[:, 0])
    _write_idx(d / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", xte[:, 0])
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", yte)
    return d


def _pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the original batches are protocol-2 pickles


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    root = tmp_path / "c10"
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _pickle(
            d / f"data_batch_{i}",
            {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 10, 1, 2, 3]},
        )
    _pickle(d / "test_batch", {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 9]})
    _pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return root


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    _pickle(
        d / "train",
        {
            b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
            b"fine_labels": list(range(12)),
            b"coarse_labels": [0] * 12,
        },
    )
    _pickle(
        d / "test",
        {
            b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8),
            b"fine_labels": [0, 1, 2, 3, 99],
            b"coarse_labels": [0] * 5,
        },
    )
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return d


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (d / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / split / cls / f"{i}.png")
    return d
