"""Image bytes / uint8 tensors -> validated float32 (C, H, W) per the manifest's Preprocessing.

Pipeline (must match what the model saw in training, see export/ and models/data):
  decode (Pillow) -> first frame -> alpha composited on black -> color_mode -> resize to
  (width, height) with the manifest's filter -> x * input_scale -> (x - mean) / std.

Documented conversions:
  - animated images (GIF, APNG, WebP): the first frame is classified.
  - alpha (RGBA, LA, PA, P with transparency, RGBa, La): composited on *black*. Fashion-MNIST is
    white-on-black, so a transparent background is background; a cut-out on transparency then
    looks like a training image.
  - palette (P), bilevel (1), CMYK, YCbCr, LAB, HSV: converted by Pillow to L / RGB.
  - 16/32-bit integer grayscale (I;16*, I): scaled by 255/65535 (values clipped to [0, 65535]).
  - float grayscale (F): taken as 0..255 and clipped.
  - RGB -> L uses Pillow's ITU-R 601-2 luma (the same weights as the uint8 tensor path); L -> RGB
    replicates the channel.
Limits (size and pixel count) are checked from the header *before* any pixel is decoded, so a
decompression bomb costs nothing. Every failure is a domain error (4xx), never a 500.

Decode placement (docs/reliability.md): small plain PNGs (8-bit, already in the model's colour
mode, not interlaced or animated, at most `INLINE_DECODE_PIXELS`, a bounded size and chunk count)
are decoded by libspng (`pyspng`) on the event loop: the same pixels (tested against Pillow), at a
third of Pillow's CPU, and a thread or process hop would cost more than the decode. Every other
file goes to the decode workers (service.core.decode_pool) -- Pillow's header parsing included,
since hostile metadata is slow to parse -- where `decode_file` first applies the structural
bounds of service.core.image_bounds and the decode memory budget, then the Pillow path above.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio
import numpy as np
import pyspng
from PIL import Image, ImageFile, UnidentifiedImageError

from service.core.artifact import Preprocessing
from service.core.errors import BoostServeError, InvalidImageError, PayloadTooLargeError, ValidationFailedError
from service.core.image_bounds import check_decode_budget, check_structure

if TYPE_CHECKING:
    from service.core.decode_pool import DecodePool, OnTimeout

# Truncated files are errors, not silently grey-padded images.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: ITU-R 601-2 luma, as Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Plain PNGs up to this many pixels are decoded on the event loop (libspng): a hop to a decode
#: worker costs more than the decode. Everything else goes to the decode workers.
INLINE_DECODE_PIXELS = 256 * 256
#: Chunks a PNG may have and still take the inline path (IHDR, IDATs, IEND and a few ancillary
#: ones); more goes to the workers, whose own bounds decide.
INLINE_PNG_CHUNKS = 64

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The IEND chunk every complete PNG ends with (length 0, type, constant CRC).
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
#: IHDR colour type whose 8-bit samples are already the model's colour mode (0 grey, 2 RGB).
_PNG_COLOR_TYPE = {"L": 0, "RGB": 2}


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    #: Peak memory one decode may need (service.core.image_bounds.decode_bytes); 413 above.
    max_decode_bytes: int = 256 << 20


@dataclass(frozen=True)
class EncodedImages:
    """Image files as the client sent them (PNG, JPEG, ...), or their base64 text (v1 JSON)."""

    blobs: Sequence[bytes] | Sequence[str]
    base64: bool = False

    def __len__(self) -> int:
        return len(self.blobs)


@dataclass(frozen=True)
class PixelTensor:
    """A batch of pixels: raw uint8 (B, H, W, C), or already preprocessed float32 (B, C, H, W)."""

    array: np.ndarray
    layout: Literal["uint8_hwc", "float_chw"]

    def __len__(self) -> int:
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1


ImageInput = EncodedImages | PixelTensor


class Preprocessor:
    """Precomputed normalisation for one manifest; thread-safe (no mutable state)."""

    def __init__(self, spec: Preprocessing, limits: Limits, pool: DecodePool | None = None) -> None:
        self.spec = spec
        self.limits = limits
        #: Where files that are not small plain PNGs decode; None (offline tools, unit tests): the
        #: threadpool, with the same bounds but no time cap.
        self.pool = pool
        self.shape = (spec.channels, spec.height, spec.width)
        self._resample = _RESAMPLE[spec.resize]
        std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
        # x * input_scale then (x - mean) / std, fused into one multiply-add.
        self._scale = (np.float32(spec.input_scale) / std).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)

    # -- the one entry point ----------------------------------------------------------------------
    async def prepare(
        self, images: ImageInput, timeout: Callable[[], float | None] | None = None, on_timeout: OnTimeout | None = None
    ) -> np.ndarray:
        """Any request's images -> float32 (B, C, H, W) for the engine.

        Decode placement: small plain PNGs on the event loop, everything else in the decode
        workers. `timeout()` is the request's remaining time (read per image), `on_timeout` the
        error a decode that outlives it answers (see DecodePool.decode).
        """
        if isinstance(images, PixelTensor):
            if images.layout == "uint8_hwc":
                return self.from_uint8_hwc(images.array)
            return self.check_chw_batch(images.array)
        blobs: Sequence[bytes | str] = images.blobs
        out = np.empty((len(blobs), *self.shape), dtype=np.float32)  # (B, C, H, W)
        for i, blob in enumerate(blobs):
            try:
                data = decode_base64(blob) if images.base64 else blob
                assert isinstance(data, bytes)
                if self.decode_plain_png(data, out=out[i]) is not None:
                    continue
                if not data:
                    raise InvalidImageError("empty image: the upload has zero bytes")
                if self.pool is None:
                    out[i] = await anyio.to_thread.run_sync(self.decode_file, data)
                else:
                    out[i] = await self.pool.decode(data, None if timeout is None else timeout(), on_timeout)
            except BoostServeError as exc:
                if len(blobs) > 1:
                    exc.message = f"image {i}: {exc.message}"
                    exc.args = (exc.message,)
                raise
        return out

    # -- bytes ---------------------------------------------------------------------------------
    def decode_file(self, data: bytes) -> np.ndarray:
        """Any image file -> float32 (C, H, W), within the structural and memory bounds (the
        decode workers run this; so do the offline tools)."""
        check_structure(data)
        image = self.open(data)
        width, height = self.decoded_size(image)
        check_decode_budget(width, height, image.mode, image.format, self.limits.max_decode_bytes)
        return self.to_tensor(image)

    def decoded_size(self, image: Image.Image) -> tuple[int, int]:
        """The size the decoder will produce: JPEGs decode at 1/2..1/8 scale (`to_tensor`'s draft),
        by the rule Pillow's `JpegImageFile.draft` applies."""
        width, height = image.size
        if image.format == "JPEG":
            scale = min(width // self.spec.width, height // self.spec.height)
            for factor in (8, 4, 2):
                if scale >= factor:
                    return -(-width // factor), -(-height // factor)
        return width, height

    def open(self, data: bytes) -> Image.Image:
        """Parse the header only; enforce the pixel limit before decoding. Cheap."""
        if not data:
            raise InvalidImageError("empty image: the upload has zero bytes")
        try:
            with warnings.catch_warnings():
                # Our own limit (below) is the policy; Pillow's hard error (2x its warning
                # threshold, ~179 Mpx) stays as a second line of defence.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise PayloadTooLargeError(
                f"image has too many pixels, over the limit of {self.limits.max_image_pixels}: {exc}"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidImageError("not an image Pillow can decode (PNG, JPEG, WebP, GIF, BMP, TIFF...)") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidImageError(f"cannot read image header: {exc}") from exc
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImageError(f"image has an empty size {width}x{height}")
        if width * height > self.limits.max_image_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {self.limits.max_image_pixels}"
            )
        return image

    def decode_plain_png(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray | None:
        """float32 (C, H, W) of a small plain PNG via libspng, written into `out` when given (a row
        of the request's batch: no temporary); None: use `open` + `to_tensor`.

        Plain = 8-bit samples in the model's colour mode (no palette, alpha or 16-bit conversion),
        not interlaced, no animation chunk, at most INLINE_DECODE_PIXELS and the pixel limit — read
        from the IHDR chunk, which PNG requires first, before any pixel is decoded — and ending
        with IEND: libspng decodes a file cut inside its zlib checksum that Pillow calls broken, so
        truncated files go to Pillow and are refused as before.
        """
        if len(data) < 45 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or not data.endswith(_PNG_END):
            return None
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        channels = 1 if self.spec.color_mode == "L" else 3
        if (
            data[24] != 8  # bit depth
            or data[25] != _PNG_COLOR_TYPE.get(self.spec.color_mode)
            or data[28] != 0  # interlace method
            or not 0 < width * height <= min(INLINE_DECODE_PIXELS, self.limits.max_image_pixels)
            # Deflate never grows data by more than ~0.1 %: a bigger file is padded with chunks.
            or len(data) > (width * channels + 1) * height * 1.01 + 4096
            or not _plain_chunks(data)
        ):
            return None
        try:
            pixels = pyspng.load(data)  # (H, W) grey or (H, W, 3) RGB, uint8
        except RuntimeError:  # corrupt or truncated: Pillow gives the error message
            return None
        if pixels.shape[:2] != (height, width) or pixels.dtype != np.uint8:
            return None
        if (width, height) != (self.spec.width, self.spec.height):
            size = (self.spec.width, self.spec.height)
            pixels = np.asarray(Image.fromarray(pixels).resize(size, self._resample))
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return self._normalize(chw, out)

    @staticmethod
    def pixels(image: Image.Image) -> int:
        return int(image.size[0] * image.size[1])

    def to_tensor(self, image: Image.Image) -> np.ndarray:
        """Decode (first frame), convert, resize, normalise -> float32 (C, H, W)."""
        spec = self.spec
        try:
            if getattr(image, "is_animated", False):
                image.seek(0)
            if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
                # Let libjpeg downscale by 1/2..1/8 while decoding: big photos decode much faster.
                image.draft(spec.color_mode, (spec.width, spec.height))
            image.load()
            converted = self._convert(image)
            if converted.size != (spec.width, spec.height):
                converted = converted.resize((spec.width, spec.height), self._resample)
            array = np.asarray(converted, dtype=np.float32)
        except (InvalidImageError, PayloadTooLargeError):
            raise
        except Image.DecompressionBombError as exc:
            raise PayloadTooLargeError(f"image has too many pixels: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
            raise InvalidImageError(f"cannot decode image (truncated or corrupt?): {exc}") from exc
        chw = array[None, :, :] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
        return self._normalize(chw)

    def _convert(self, image: Image.Image) -> Image.Image:
        target = self.spec.color_mode
        mode = image.mode
        if mode == target:
            return image
        if mode.startswith("I;16") or mode == "I":
            # round(x * 255 / 65535) in integers: x * 255 / 65535 is never k + 0.5 (65535 is odd),
            # so floor((510 x + 65535) / 131070) is the same value, without float64 copies of a
            # 16 Mpx image (service.core.image_bounds prices the uint32 working copy).
            raw = np.asarray(image)
            work = np.clip(raw, 0, 65535).astype(np.uint32) if mode == "I" else raw.astype(np.uint32)
            work *= 510
            work += 65535
            work //= 131070
            gray = Image.fromarray(work.astype(np.uint8), mode="L")
            return gray if target == "L" else gray.convert("RGB")
        if mode == "F":
            raw = np.asarray(image, dtype=np.float32)
            gray = Image.fromarray(np.clip(np.nan_to_num(raw), 0, 255).astype(np.uint8), mode="L")
            return gray if target == "L" else gray.convert("RGB")
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            mode = image.mode
        elif mode in ("RGBa", "La", "PA"):
            image = image.convert("RGBA")
            mode = "RGBA"
        if mode in _ALPHA_MODES:
            rgba = image.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, rgba).convert("RGB")
        return image.convert(target)

    def _normalize(self, chw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x * scale + offset as float32 (C, H, W), in `out` when given."""
        if out is None:
            out = np.empty(chw.shape, dtype=np.float32)
        np.multiply(chw, self._scale, out=out)
        out += self._offset
        return out

    # -- tensors (Open Inference Protocol) ----------------------------------------------------------
    def from_uint8_hwc(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) or (H, W, C) images -> float32 (B, C, H, W), vectorised.

        C may be 1, 3 or 4 (alpha composited on black); channels are converted to the model's
        (RGB -> L by ITU-R 601 luma, L -> RGB by replication). Images whose H, W differ from the
        model's are resized one by one with the manifest's filter.
        """
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4:
            raise ValidationFailedError(f"uint8 image tensor must be [B,H,W,C] or [H,W,C], got {list(batch.shape)}")
        b, h, w, c = batch.shape
        if b == 0 or h == 0 or w == 0:
            raise ValidationFailedError(f"uint8 image tensor has an empty axis: {list(batch.shape)}")
        if c not in (1, 3, 4):
            raise ValidationFailedError(f"uint8 image tensor needs 1, 3 or 4 channels (last axis), got {c}")
        if h * w > self.limits.max_image_pixels:
            raise PayloadTooLargeError(
                f"image is {w}x{h} = {w * h} pixels, over the limit of {self.limits.max_image_pixels}"
            )
        x = batch.astype(np.float32)
        if c == 4:
            x = x[..., :3] * (x[..., 3:4] / 255.0)
            c = 3
        if self.spec.channels == 1 and c == 3:
            x = (x @ _LUMA)[..., None]
        elif self.spec.channels == 3 and c == 1:
            x = np.repeat(x, 3, axis=-1)
        if (h, w) != (self.spec.height, self.spec.width):
            x = np.stack([self._resize_float(img) for img in x])
        chw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out = chw * self._scale[None]
        out += self._offset[None]
        return out.astype(np.float32, copy=False)

    def _resize_float(self, hwc: np.ndarray) -> np.ndarray:
        size = (self.spec.width, self.spec.height)
        planes = [
            np.asarray(Image.fromarray(hwc[..., i].astype(np.float32), mode="F").resize(size, self._resample))
            for i in range(hwc.shape[-1])
        ]
        return np.stack(planes, axis=-1)

    def check_chw_batch(self, batch: np.ndarray) -> np.ndarray:
        """Validate an already preprocessed float32 (B, C, H, W) tensor (v2 FP32 input)."""
        if batch.ndim == 3:
            batch = batch[None]
        expected = self.shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValidationFailedError(
                f"FP32 input must be [B,{expected[0]},{expected[1]},{expected[2]}] (NCHW, preprocessed), "
                f"got {list(batch.shape)}"
            )
        if batch.shape[0] == 0:
            raise ValidationFailedError("FP32 input has an empty batch")
        if not np.isfinite(batch).all():
            raise ValidationFailedError("FP32 input contains NaN or Inf")
        return np.ascontiguousarray(batch, dtype=np.float32)


def _plain_chunks(data: bytes) -> bool:
    """At most INLINE_PNG_CHUNKS chunks before IEND, none of them APNG's acTL (one bounded walk
    over the chunk headers answers both)."""
    position = 8
    for _ in range(INLINE_PNG_CHUNKS):
        if position + 8 > len(data):
            return False
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"IEND":
            return True
        if kind == b"acTL":
            return False
        position += 12 + length
    return False


def decode_base64(text: bytes | str) -> bytes:
    """Standard or URL-safe base64, with or without padding or a data: URI prefix."""
    payload = text.decode("latin-1") if isinstance(text, bytes) else text
    payload = payload.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"not valid base64: {exc}") from exc
