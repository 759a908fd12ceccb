"""service.core.preprocess: every documented conversion, and every bad input is a domain error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.core.artifact import Preprocessing
from service.core.errors import InvalidImageError, PayloadTooLargeError, ValidationFailedError
from service.core.preprocess import Limits, Preprocessor
from tests.service.http import images

GRAY = Preprocessing(height=8, width=8, channels=1, color_mode="L", mean=[0.5], std=[0.25])
RGB = Preprocessing(height=8, width=8, channels=3, color_mode="RGB", mean=[0.5] * 3, std=[0.25] * 3)


def pre(spec: Preprocessing = GRAY, max_pixels: int = 1_000_000) -> Preprocessor:
    return Preprocessor(spec, Limits(max_image_pixels=max_pixels))


def expected(gray_uint8: np.ndarray) -> np.ndarray:
    return ((gray_uint8.astype(np.float32) / 255.0 - 0.5) / 0.25)[None]


def test_png_gray_matches_the_manifest_formula() -> None:
    image = images.gray()
    out = decode(pre(), images.encode(image))
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(np.asarray(image)), rtol=1e-6, atol=1e-6)


def pillow_decode(p: Preprocessor, data: bytes) -> np.ndarray:
    return p.to_tensor(p.open(data))


def decode(p: Preprocessor, data: bytes) -> np.ndarray:
    """One image file as the request path decodes it, synchronously: libspng for a plain PNG in
    the model's mode, else Pillow. float32 (C, H, W)."""
    fast = p.decode_plain_png(data)
    return fast if fast is not None else pillow_decode(p, data)


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["L", "RGB"])
@pytest.mark.parametrize("size", [(8, 8), (28, 20), (256, 256)])
@pytest.mark.parametrize("save", [{}, {"optimize": True}, {"compress_level": 0}], ids=["default", "optimize", "stored"])
def test_plain_png_is_decoded_by_libspng_to_pillows_exact_values(
    spec: Preprocessing, size: tuple[int, int], save: dict[str, object]
) -> None:
    image = images.gray(size, seed=3) if spec is GRAY else images.rgb(size, seed=3)
    data = images.encode(image, **save)
    p = pre(spec)
    fast = p.decode_plain_png(data)
    assert fast is not None, "a plain 8-bit PNG in the model's mode must take the libspng path"
    assert fast.dtype == np.float32 and fast.shape == (spec.channels, 8, 8)
    np.testing.assert_array_equal(fast, pillow_decode(p, data))
    batch = np.full((2, spec.channels, 8, 8), np.nan, dtype=np.float32)
    written = p.decode_plain_png(data, out=batch[1])
    assert written is not None and np.shares_memory(written, batch)
    np.testing.assert_array_equal(batch[1], fast)  # written in place, the other row untouched
    assert np.isnan(batch[0]).all()


def _interlaced(data: bytes) -> bytes:
    return data[:28] + b"\x01" + data[29:]


@pytest.mark.parametrize(
    ("spec", "data"),
    [
        (GRAY, images.encode(images.rgb())),  # needs RGB -> L
        (RGB, images.png()),  # needs L -> RGB
        (GRAY, images.encode(images.gray().convert("RGBA"))),
        (GRAY, images.encode(images.gray().convert("P"))),
        (GRAY, images.encode(Image.fromarray(np.full((8, 8), 300, np.uint16)))),
        (GRAY, _interlaced(images.png())),
        (GRAY, images.encode(images.gray(), save_all=True, append_images=[images.gray(seed=1)])),  # APNG
        (GRAY, images.png(size=(257, 256))),  # over INLINE_DECODE_PIXELS: decoded off the loop
        (GRAY, images.png(size=(64, 64))[:60]),  # truncated: Pillow words the error
        (GRAY, images.png()[:-20] + b"\x00" * 20),  # zlib checksum and IEND damaged: Pillow refuses it
        (GRAY, images.png()[:-12]),  # no IEND
        (GRAY, images.encode(images.gray(), "JPEG")),
        (GRAY, b"\x89PNG\r\n\x1a\n"),
        (GRAY, b""),
    ],
    ids=["rgb-for-L", "L-for-rgb", "rgba", "palette", "16-bit", "interlaced", "apng", "large", "truncated",
         "bad-end", "no-iend", "jpeg", "signature-only", "empty"],
)  # fmt: skip
def test_other_images_take_the_pillow_path(spec: Preprocessing, data: bytes) -> None:
    assert pre(spec).decode_plain_png(data) is None


def test_plain_png_over_the_pixel_limit_is_refused_by_the_pillow_path() -> None:
    data = images.png(size=(20, 20))
    assert pre(max_pixels=399).decode_plain_png(data) is None
    with pytest.raises(PayloadTooLargeError, match="400 pixels"):
        decode(pre(max_pixels=399), data)


def test_resize_uses_the_manifest_size() -> None:
    out = decode(pre(), images.png(size=(28, 20)))
    assert out.shape == (1, 8, 8)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P", "CMYK", "I;16", "I", "1", "RGB", "F"])
def test_modes_are_converted(mode: str) -> None:
    base = images.rgb()
    if mode == "PA":
        image = base.convert("P").convert("PA")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "PA") else "PNG"
    data = images.encode(image, fmt) if mode != "PA" else images.encode(image.convert("RGBA"))
    for spec in (GRAY, RGB):
        out = decode(pre(spec), data)
        assert out.shape == (spec.channels, 8, 8)
        assert np.isfinite(out).all()


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.full((8, 8), 65535, dtype=np.uint16)
    out = decode(pre(), images.encode(Image.fromarray(values)))
    np.testing.assert_allclose(out, expected(np.full((8, 8), 255, np.uint8)), atol=1e-5)


def test_transparent_pixels_become_black() -> None:
    clear = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    out = decode(pre(), images.encode(clear))
    np.testing.assert_allclose(out, expected(np.zeros((8, 8), np.uint8)), atol=1e-6)


def test_animated_gif_uses_the_first_frame() -> None:
    out = decode(pre(), images.animated_gif())
    np.testing.assert_allclose(out, expected(np.full((8, 8), 255, np.uint8)), atol=1e-5)


def test_jpeg_and_webp_and_bmp() -> None:
    for fmt in ("JPEG", "WEBP", "BMP", "GIF"):
        assert decode(pre(RGB), images.encode(images.rgb(size=(64, 48)), fmt)).shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImageError),
        (b"definitely not an image", InvalidImageError),
        (images.png(size=(64, 64))[:60], InvalidImageError),
    ],
)
def test_bad_bytes(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(pre(), data)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    with pytest.raises(PayloadTooLargeError, match="pixels"):
        decode(pre(max_pixels=10_000), images.bomb_png(2_000, 2_000))


def test_uint8_hwc_matches_the_bytes_path() -> None:
    image = images.rgb()
    via_bytes = decode(pre(RGB), images.encode(image))
    via_tensor = pre(RGB).from_uint8_hwc(np.asarray(image)[None])
    np.testing.assert_allclose(via_tensor[0], via_bytes, atol=1e-5)
    gray_bytes = decode(pre(GRAY), images.encode(image))
    gray_tensor = pre(GRAY).from_uint8_hwc(np.asarray(image))
    # Pillow rounds luma to uint8; the vectorised path keeps it in float: within half a grey level.
    np.testing.assert_allclose(gray_tensor[0], gray_bytes, atol=0.5 / 255 / 0.25 + 1e-5)


def test_uint8_hwc_resizes_and_rejects_bad_shapes() -> None:
    assert pre().from_uint8_hwc(np.zeros((2, 16, 12, 1), np.uint8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValidationFailedError):
        pre().from_uint8_hwc(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValidationFailedError):
        pre().from_uint8_hwc(np.zeros((1, 8, 8, 2), np.uint8))


def test_chw_batch_checks() -> None:
    p = pre()
    assert p.check_chw_batch(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 1, 8, 8)
    with pytest.raises(ValidationFailedError, match="NCHW"):
        p.check_chw_batch(np.zeros((3, 8, 8, 1), np.float32))
    bad = np.zeros((1, 1, 8, 8), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValidationFailedError, match="NaN"):
        p.check_chw_batch(bad)
