"""Bounds on the work one image file may cost, checked before Pillow parses or decodes it.

Why: the pixel limit alone let small files cost minutes of CPU or gigabytes of memory. Neither
Pillow nor libjpeg bounds the number of progressive-JPEG scans (each one walks every block again),
Pillow parses PNG chunks, JPEG segments, GIF extensions and TIFF tag arrays in Python one by one,
and a 4096x4096 RGBA image a few hundred bytes long needs hundreds of megabytes to convert. These
checks read the container structure with bounded loops (C-speed `bytes.count` / `find` where the
format allows) and refuse files whose structure alone is over the limits, with a message that says
which limit. They run in the decode workers (service.core.decode_pool), like everything else about
a non-trivial file, so even the checks never hold the event loop.

The limits are far above what real encoders write (a progressive JPEG has about 10 scans, a PNG
a handful of ancillary chunks) and they are the same for every deployment: they are properties of
the formats, not of the traffic, so they are constants rather than settings.
"""

from __future__ import annotations

import struct

from service.core.errors import InvalidImageError, PayloadTooLargeError

#: Start-of-scan markers in one JPEG. libjpeg-turbo's own tools suggest a limit of this order
#: (djpeg -maxscans); a standard progressive file has ~10.
MAX_JPEG_SCANS = 100
#: Marker segments (APPn, COM, DQT, DHT, ...) before the first scan.
MAX_JPEG_SEGMENTS = 512
#: Chunks of one PNG (IDAT included: some encoders write one per row), and of those the ancillary
#: (text, colour profile, ...) ones, which Pillow reads and may inflate one by one.
MAX_PNG_CHUNKS = 65_536
MAX_PNG_ANCILLARY_CHUNKS = 256
#: GIF extension blocks (comments, application, graphic control) before the first image.
MAX_GIF_EXTENSIONS = 256
#: Values of one TIFF tag (StripOffsets and friends: Pillow reads each into a Python tuple).
MAX_TIFF_TAG_VALUES = 65_536

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DATA_CHUNKS = frozenset({b"IDAT", b"fdAT"})
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


def check_structure(data: bytes) -> None:
    """Refuse a file whose container structure is over a bound (InvalidImageError, HTTP 400).

    Unknown formats pass: Pillow identifies (or refuses) them, and the decode memory budget and the
    workers' time and memory caps bound whatever they cost.
    """
    if data[:2] == b"\xff\xd8":
        _check_jpeg(data)
    elif data[:8] == _PNG_SIGNATURE:
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        _check_tiff(data)


def _too_expensive(what: str) -> InvalidImageError:
    return InvalidImageError(f"image too expensive to decode: {what}")


def _check_jpeg(data: bytes) -> None:
    # 0xFF in entropy-coded data is always stuffed (FF 00), so FF DA is a real SOS marker.
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise _too_expensive(f"{scans} JPEG scans, the limit is {MAX_JPEG_SCANS}")
    position, segments = 2, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return  # not a marker: Pillow reports the damage
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image: headers are over
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _too_expensive(f"over {MAX_JPEG_SEGMENTS} JPEG marker segments before the image data")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers: no length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        position += 2 + length


def _check_png(data: bytes) -> None:
    position, chunks, ancillary = 8, 0, 0
    end = len(data)
    while position + 8 <= end:
        (length,) = struct.unpack_from(">I", data, position)
        kind = data[position + 4 : position + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _too_expensive(f"over {MAX_PNG_CHUNKS} PNG chunks")
        if kind not in _PNG_CRITICAL and kind not in _PNG_DATA_CHUNKS:
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                raise _too_expensive(f"over {MAX_PNG_ANCILLARY_CHUNKS} ancillary PNG chunks (text, profiles, ...)")
        if kind == b"IEND":
            return
        position += 12 + length


def _check_gif(data: bytes) -> None:
    if len(data) < 13:
        return
    flags = data[10]
    position = 13 + (3 * (2 ** ((flags & 0x07) + 1)) if flags & 0x80 else 0)
    extensions = 0
    while position < len(data) and data[position] == 0x21:  # extension introducer
        extensions += 1
        if extensions > MAX_GIF_EXTENSIONS:
            raise _too_expensive(f"over {MAX_GIF_EXTENSIONS} GIF extension blocks before the first image")
        position += 2  # introducer, label
        while position < len(data):  # data sub-blocks, ended by a zero-length one
            size = data[position]
            position += 1 + size
            if size == 0:
                break


_TIFF_FIELD_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


def _check_tiff(data: bytes) -> None:
    """The first directory's tag value counts (Pillow opens only the first image)."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return
    (offset,) = struct.unpack_from(order + "I", data, 4)
    if offset + 2 > len(data):
        return
    (entries,) = struct.unpack_from(order + "H", data, offset)
    for index in range(entries):
        at = offset + 2 + 12 * index
        if at + 12 > len(data):
            return
        tag, kind, count = struct.unpack_from(order + "HHI", data, at)
        if kind in _TIFF_FIELD_SIZE and count > _tiff_value_limit(kind):
            raise _too_expensive(f"TIFF tag {tag} has {count} values, the limit is {_tiff_value_limit(kind)}")


def _tiff_value_limit(kind: int) -> int:
    """ASCII and UNDEFINED tags are byte strings (read as one value); every other type is per value."""
    return 1 << 24 if kind in (2, 7) else MAX_TIFF_TAG_VALUES


#: Peak bytes per pixel that decoding one frame of each mode and converting it to the model's mode
#: takes (the decoded frame -- Pillow stores RGB as 4 bytes -- plus the conversions' intermediates
#: in service.core.preprocess: alpha compositing keeps three RGBA frames alive, 16/32-bit grey a
#: 32-bit working copy). Upper bounds of what tests/service/test_image_bounds.py measures.
_PEAK_BYTES_PER_PIXEL = {
    "1": 2,
    "L": 2,
    "RGB": 6,
    "YCbCr": 6,
    "CMYK": 10,
    "I;16": 10,
    "I;16L": 10,
    "I;16B": 10,
    "I;16N": 10,
    "I": 19,
    "F": 19,
}
#: Any other mode (RGBA, LA, P, PA, ...): the alpha-compositing path, the most expensive one.
_DEFAULT_PEAK_BYTES_PER_PIXEL = 21
#: libwebp decodes into a buffer of its own that Pillow then copies.
_FORMAT_EXTRA_BYTES_PER_PIXEL = {"WEBP": 13}


def decode_bytes(width: int, height: int, mode: str, image_format: str | None = None) -> int:
    """Peak memory (bytes) that decoding and converting one frame of this size, mode and format needs."""
    per_pixel = _PEAK_BYTES_PER_PIXEL.get(mode, _DEFAULT_PEAK_BYTES_PER_PIXEL)
    per_pixel += _FORMAT_EXTRA_BYTES_PER_PIXEL.get(image_format or "", 0)
    return width * height * per_pixel


def check_decode_budget(width: int, height: int, mode: str, image_format: str | None, max_bytes: int) -> None:
    """PayloadTooLargeError (413) when the decode would need more than `max_bytes` of memory."""
    need = decode_bytes(width, height, mode, image_format)
    if need > max_bytes:
        raise PayloadTooLargeError(
            f"image {width}x{height} in mode {mode} needs about {need / 2**20:.0f} MiB to decode, "
            f"over the limit of {max_bytes / 2**20:.0f} MiB"
        )
