"""Image byte fixtures for the HTTP tests (Pillow only, deterministic)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gray(size: tuple[int, int] = (8, 8), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8), mode="L")


def png(size: tuple[int, int] = (8, 8), seed: int = 0) -> bytes:
    return encode(gray(size, seed))


def rgb(size: tuple[int, int] = (8, 8), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small PNG whose header declares a huge image (all black: compresses to almost nothing)."""
    return encode(Image.new("1", (width, height)))


def animated_gif() -> bytes:
    first = Image.new("L", (8, 8), 255)
    second = Image.new("L", (8, 8), 0)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
