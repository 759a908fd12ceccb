"""Structural bounds and the decode memory estimate (service.core.image_bounds), on the hostile
inputs of the hardening issue and on ordinary files that must pass."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.core.errors import InvalidImageError, PayloadTooLargeError
from service.core.image_bounds import check_decode_budget, check_structure, decode_bytes
from tests.reliability import _hostile as hostile

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: hostile.progressive_scan_bomb(256, 100_000), "100006 JPEG scans, the limit is 100"),
        (lambda: hostile.progressive_scan_bomb(4096, 2000), "2006 JPEG scans, the limit is 100"),
        (lambda: hostile.jpeg_many_app_markers(100_000), "over 512 JPEG marker segments before the image data"),
        (lambda: hostile.png_many_chunks(100_000), "over 256 ancillary PNG chunks (text, profiles, ...)"),
        (lambda: hostile.png_iccp_repeats(300), "over 256 ancillary PNG chunks (text, profiles, ...)"),
        (lambda: hostile.gif_many_comments(100_000), "over 256 GIF extension blocks before the first image"),
        (lambda: hostile.tiff_many_strips(100_000), "TIFF tag 273 has 100000 values, the limit is 65536"),
    ],
    ids=["jpeg-scans-256", "jpeg-scans-4096", "jpeg-app", "png-chunks", "png-iccp", "gif-comments", "tiff-strips"],
)
def test_hostile_structure_is_refused_with_the_limit_it_broke(build: object, message: str) -> None:
    with pytest.raises(InvalidImageError) as refused:
        check_structure(build())  # type: ignore[operator]
    assert refused.value.message == f"image too expensive to decode: {message}"


def _encoded(fmt: str, mode: str = "RGB", **params: object) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        _encoded("JPEG"),
        _encoded("JPEG", progressive=True),
        _encoded("JPEG", "L", progressive=True, optimize=True),
        _encoded("PNG"),
        _encoded("PNG", "RGBA"),
        _encoded("GIF", "P"),
        _encoded("TIFF"),
        _encoded("TIFF", "L", compression="tiff_lzw"),
        _encoded("WEBP"),
        _encoded("BMP"),
        hostile.progressive_scan_bomb(64, 90),  # many scans, but within the bound
        b"not an image at all",
        b"",
    ],
    ids=[
        "jpeg",
        "jpeg-prog",
        "jpeg-prog-L",
        "png",
        "png-rgba",
        "gif",
        "tiff",
        "tiff-lzw",
        "webp",
        "bmp",
        "90-scans",
        "junk",
        "empty",
    ],
)
def test_ordinary_files_pass(data: bytes) -> None:
    check_structure(data)


def test_the_budget_refuses_with_the_estimate_and_the_limit() -> None:
    with pytest.raises(PayloadTooLargeError) as refused:
        check_decode_budget(4096, 4096, "RGBA", "WEBP", 256 << 20)
    assert refused.value.message == (
        "image 4096x4096 in mode RGBA needs about 544 MiB to decode, over the limit of 256 MiB"
    )
    check_decode_budget(4096, 4096, "RGB", "PNG", 256 << 20)  # 96 MiB: a photo-sized PNG is fine


_PEAK = textwrap.dedent(
    """
    import io, resource, sys
    from service.core.artifact import load_manifest
    from service.core.preprocess import Limits, Preprocessor
    from service.http.settings import EMBEDDED_MODEL_DIR
    data = open(sys.argv[1], "rb").read()
    p = Preprocessor(load_manifest(EMBEDDED_MODEL_DIR, verify=False).preprocessing, Limits(1 << 30, 1 << 40))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    p.decode_file(data)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    """
)


def _image(mode: str, side: int) -> Image.Image:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
    if mode in ("I", "F"):
        values = rng.integers(0, 65535, (side, side), dtype=np.int32)
        return Image.fromarray(values if mode == "I" else values.astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("CMYK", "TIFF"),
        ("RGBA", "WEBP"),
        ("RGB", "WEBP"),
    ],
)
def test_the_estimate_bounds_the_measured_peak(tmp_path: Path, mode: str, fmt: str) -> None:
    """Decoded in a fresh process, whose peak resident memory grows by at most the estimate."""
    side = 1536
    path = tmp_path / f"image.{fmt.lower()}"
    params = {"lossless": True} if fmt == "WEBP" else {}
    _image(mode, side).save(path, fmt, **params)
    opened = Image.open(path)
    measured = int(
        subprocess.run(
            [sys.executable, "-c", _PEAK, str(path)], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    estimate = decode_bytes(side, side, opened.mode, opened.format)
    assert measured <= estimate, f"{mode} {fmt}: peak {measured / side / side:.1f} B/px over the estimate"
