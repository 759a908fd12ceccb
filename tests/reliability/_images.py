"""A bad-image corpus generated in memory (Pillow + raw bytes), plus a few valid images.

Nothing here touches the service: each builder returns the bytes a client would send. The
expected answer of each case lives in the test (tests/reliability/test_bad_images.py), so the
corpus can be reused by the fuzz and overload runs.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

#: A byte string that must never appear in logs; embedded in images sent during the log test.
CANARY = b"BOOSTSERVE-CANARY-9f4c2e7a1b"


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **params)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **params)
    return buf.getvalue()


def gray_image(size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8), mode="L")


def rgb_image(size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def valid_png(size: tuple[int, int] = (28, 28), seed: int = 0) -> bytes:
    return png_bytes(gray_image(size, seed))


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(width: int = 100_000, height: int = 100_000, *, with_data: bool = True) -> bytes:
    """A PNG that declares width x height (8-bit gray) with valid CRCs but carries almost no data.

    A decoder that trusts the header would allocate width*height bytes (10 GB for 100k x 100k).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no filter/interlace
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if with_data:
        # One compressed row of zeros; the rest of the image is missing (truncated stream).
        out += _chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1), 9))
    return out + _chunk(b"IEND", b"")


def png_zlib_bomb(side: int = 6000) -> bytes:
    """A *complete* side x side all-black grayscale PNG: ~36 MP decoded from a few tens of KB."""
    raw = (b"\x00" + b"\x00" * side) * side  # filter byte + row
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def cmyk_jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    return jpeg_bytes(rgb_image(size, seed=3).convert("CMYK"), quality=90)


def png_16bit(size: tuple[int, int] = (32, 32)) -> bytes:
    arr = np.random.default_rng(4).integers(0, 65536, size=(size[1], size[0]), dtype=np.uint16)
    image = Image.fromarray(arr.astype(np.uint16))  # mode "I;16"
    data = png_bytes(image)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I"), "expected a 16-bit PNG"
    return data


def palette_alpha_png(size: tuple[int, int] = (32, 32)) -> bytes:
    image = rgb_image(size, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = png_bytes(image, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    return data


def rgba_png(size: tuple[int, int] = (32, 32)) -> bytes:
    rgba = rgb_image(size, seed=6).convert("RGBA")
    rgba.putalpha(128)
    return png_bytes(rgba)


def animated_gif(frames: int = 5, size: tuple[int, int] = (32, 32)) -> bytes:
    images = [gray_image(size, seed=10 + i).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    data = buf.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == frames
    return data


def one_by_one_png() -> bytes:
    return png_bytes(Image.new("L", (1, 1), color=200))


def large_png(side: int = 3000) -> bytes:
    """A big but legal image (side x side, under the default pixel limit); compresses well."""
    return png_bytes(Image.new("L", (side, side), color=90), compress_level=9)


def canary_png(size: tuple[int, int] = (28, 28)) -> bytes:
    """A valid PNG whose bytes contain CANARY in clear (tEXt chunk) — for the no-image-data-in-logs test."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", CANARY.decode())
    data = png_bytes(gray_image(size, seed=7), pnginfo=info)
    assert CANARY in data
    return data
