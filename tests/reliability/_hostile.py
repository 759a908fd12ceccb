"""Hostile image generators from the hardening issue: each builds the input that froze, starved or
exhausted the server before decode isolation, so the regression tests (and `boostserve bench`'s
attack scenario) can build the same bytes themselves.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

_SOS = b"\xff\xda"
_EOI = b"\xff\xd9"


def progressive_scan_bomb(side: int = 256, copies: int = 2000) -> bytes:
    """A grey progressive JPEG whose last AC-refinement scan is repeated `copies` times.

    Neither Pillow nor libjpeg bounds the number of scans, and every repeat makes the decoder walk
    every block again: a small file costs seconds to minutes of CPU.
    """
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rindex(_SOS)
    end = data.rindex(_EOI)
    return data[:end] + data[last_scan:end] * copies + _EOI


def scan_count(data: bytes) -> int:
    return data.count(_SOS)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png(width: int, height: int, color_type: int, raw_rows: bytes, extra: bytes = b"", bit_depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def png_many_chunks(count: int = 200_000, side: int = 28) -> bytes:
    """An RGB PNG with `count` empty ancillary chunks before its pixels (Pillow parses each in Python)."""
    rows = b"".join(b"\x00" + bytes(side * 3) for _ in range(side))
    return _png(side, side, 2, rows, _png_chunk(b"tEXt", b"") * count)


def png_iccp_repeats(count: int = 40, inflated: int = 1 << 20) -> bytes:
    """An RGB PNG with `count` iCCP chunks, each inflating to `inflated` bytes."""
    profile = b"p\x00\x00" + zlib.compress(bytes(inflated), 9)
    rows = b"".join(b"\x00" + bytes(28 * 3) for _ in range(28))
    return _png(28, 28, 2, rows, _png_chunk(b"iCCP", profile) * count)


def png_16bit_gray(side: int = 4096) -> bytes:
    """A constant I;16 PNG: tiny file, large decode (16-bit samples, converted to 8-bit grey)."""
    rows = b"".join(b"\x00" + bytes(side * 2) for _ in range(side))
    return _png(side, side, 0, rows, bit_depth=16)


def jpeg_many_app_markers(count: int = 500_000) -> bytes:
    """A valid 28x28 JPEG with `count` empty APP1 segments after SOI."""
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 10).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xe1\x00\x02" * count + data[2:]


def gif_many_comments(count: int = 500_000) -> bytes:
    """A 28x28 GIF with `count` empty comment extensions before its image."""
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 10).save(buffer, "GIF")
    data = buffer.getvalue()
    # Header (6) + logical screen descriptor (7) + global colour table (3 * 2^(n+1) when present).
    flags = data[10]
    start = 13 + (3 * (2 ** ((flags & 0x07) + 1)) if flags & 0x80 else 0)
    return data[:start] + b"\x21\xfe\x00" * count + data[start:]


def tiff_many_strips(strips: int = 400_000) -> bytes:
    """A little-endian grey TIFF whose StripOffsets/StripByteCounts have `strips` entries."""
    height = strips
    width = 1
    entries = [
        (256, 4, 1, width),  # ImageWidth LONG
        (257, 4, 1, height),  # ImageLength LONG
        (258, 3, 1, 8),  # BitsPerSample SHORT
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # Photometric BlackIsZero
        (273, 4, strips, 0),  # StripOffsets (filled below)
        (278, 4, 1, 1),  # RowsPerStrip
        (279, 4, strips, 0),  # StripByteCounts (filled below)
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    offsets_at = ifd_offset + ifd_size
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = offsets_at
        elif tag == 279:
            value = counts_at
        out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0)
    out += np.arange(pixels_at, pixels_at + strips, dtype="<u4").tobytes()
    out += np.ones(strips, dtype="<u4").tobytes()
    out += bytes(strips)
    return bytes(out)


def webp_memory_bomb(side: int = 4096) -> bytes:
    """A lossless RGBA WebP of one colour: a few hundred bytes, `side`² RGBA pixels to decode."""
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 20, 30, 128)).save(buffer, "WEBP", lossless=True, quality=0, method=0)
    return buffer.getvalue()
