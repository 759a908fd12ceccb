"""Fashion-MNIST test images for the engine and HTTP suites, read with gzip + numpy only.

Why not `models.data`: that module needs torch, and the bench must run in the serving
environment. Images are kept as uint8 (n, H, W) so that both preprocessing (engine suite) and
PNG encoding (HTTP suite) start from the same pixels the calibration was computed on.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@dataclass(frozen=True)
class TestSet:
    """Raw test images (n, H, W) uint8 and their integer labels (n,)."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> TestSet:
        if n is None or n >= len(self):
            return self
        return TestSet(self.images[:n], self.labels[:n], self.source)


def load_test_set(data_dir: Path = DEFAULT_DATA_DIR, limit: int | None = None) -> TestSet:
    """The Fashion-MNIST test split (10,000 images), in file order (the order calibration used)."""
    images_path = data_dir / TEST_IMAGES
    labels_path = data_dir / TEST_LABELS
    if not images_path.is_file() or not labels_path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST test files not found in {data_dir} (expected {TEST_IMAGES} and {TEST_LABELS}); "
            "pass --data DIR"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{data_dir}: {images.shape[0]} images but {labels.shape[0]} labels")
    return TestSet(images, labels, str(data_dir)).head(limit)


def synthetic_test_set(n: int, height: int, width: int, num_classes: int, seed: int = 0) -> TestSet:
    """Random uint8 images with random labels: for the synthetic artifact (tests, dry runs)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return TestSet(images, labels, f"synthetic(seed={seed})")


def preprocess(
    images: np.ndarray,
    *,
    height: int,
    width: int,
    channels: int,
    mean: list[float],
    std: list[float],
    input_scale: float = 1.0 / 255.0,
    resize: str = "bilinear",
) -> np.ndarray:
    """uint8 (n, h, w) grayscale -> float32 (n, C, H, W) normalised as the manifest says.

    Mirrors the serving preprocessing (decode -> color mode -> resize -> scale -> normalise) so the
    engine suite feeds the same tensors an HTTP request would produce; Pillow only when a resize
    or an RGB conversion is needed (the embedded Fashion-MNIST model needs neither).
    """
    n, h, w = images.shape
    pixels: np.ndarray
    if (h, w) == (height, width) and channels == 1:
        pixels = images[:, None, :, :].astype(np.float32)
    else:
        from PIL import Image

        resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "bicubic": Image.Resampling.BICUBIC,
        }[resize]
        mode = "L" if channels == 1 else "RGB"
        out = np.empty((n, channels, height, width), dtype=np.float32)
        for i in range(n):
            img = Image.fromarray(images[i]).convert(mode)
            if img.size != (width, height):
                img = img.resize((width, height), resample)
            arr = np.asarray(img, dtype=np.float32)
            out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        pixels = out
    scaled = pixels * np.float32(input_scale)
    m = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, channels, 1, 1)
    return np.ascontiguousarray((scaled - m) / s, dtype=np.float32)


def encode_png(images: np.ndarray) -> list[bytes]:
    """PNG bytes of each uint8 (H, W) image: the HTTP bodies, encoded once before any timing."""
    from PIL import Image

    bodies: list[bytes] = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies
