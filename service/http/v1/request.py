"""`POST /v1/classify` wire formats -> `ClassifyRequest`: raw image body, multipart, JSON + base64.

Why its own module: the FastAPI route and the fast path (`service.http.v1.fast_path`) read the same
requests and must answer them identically, so both call these functions and nothing else of v1.
Knob values are not parsed here: they go to the core as received (query text or JSON values), and
`service.core.budget` parses them with the same rules for every protocol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.core.classify import ClassifyRequest
from service.core.errors import (
    PayloadTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)
from service.core.knobs import BUDGET_FIELD_KNOBS, KNOB_BY_NAME, KNOBS, Knob
from service.core.preprocess import EncodedImages
from service.http.v1.render import TOP_K

#: v1's own knobs, parsed by the core like the others (their values come back in the result's extras).
V1_KNOBS: tuple[Knob, ...] = (TOP_K,)
QUERY = "query parameter"
FIELD = "field"

#: Members of the JSON body besides the knobs.
JSON_IMAGE_FIELDS = ("image", "images")
#: Members of the JSON body's `budget` object.
BUDGET_FIELDS = tuple(k.name for k in BUDGET_FIELD_KNOBS)
#: Top-level knobs of the JSON body (the budget knobs go inside `budget`).
JSON_KNOBS = tuple(k.name for k in (*KNOBS, *V1_KNOBS) if k.role == "request")

RAW_IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/x-portable-anymap",
        "image/x-portable-graymap",
        "application/octet-stream",
    }
)


#: The multipart Content-Type /v1/classify reads (`file` parts).
MULTIPART_TYPE = "multipart/form-data"


def normalize_media_type(header: str) -> str:
    return header.split(";")[0].strip().lower()


def is_json_type(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def json_body(body: bytes) -> Any:
    """The parsed JSON body; invalid JSON is a 422 saying so."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailedError(f"the request body is not valid JSON ({exc})") from exc


def is_raw_image_type(kind: str) -> bool:
    """A Content-Type that /v1/classify reads as one raw image body."""
    return kind in RAW_IMAGE_TYPES or kind.startswith("image/")


def query_options(query_string: bytes) -> dict[str, str]:
    """The query string as knobs; a name given twice is a 422 (which one would win is a guess)."""
    text = query_string.decode("latin-1")
    if "%" in text or "+" in text:
        pairs = parse_qsl(text, keep_blank_values=True)
    else:  # skip parse_qsl's per-item unquote when there is nothing to unquote (the common case)
        pairs = [(n, v) for n, _, v in (item.partition("=") for item in text.split("&") if item)]
    options: dict[str, str] = {}
    for name, value in pairs:
        if name in options:
            raise ValidationFailedError(f"query parameter {name!r} is given more than once")
        options[name] = value
    return options


def raw_request(body: bytes, query: Mapping[str, str]) -> ClassifyRequest:
    """A raw image body (one image) with its knobs in the query string."""
    return ClassifyRequest(EncodedImages([body]), query, QUERY, V1_KNOBS)


def json_request(body: bytes, query: Mapping[str, str]) -> ClassifyRequest:
    """JSON: `image` or `images` (base64), `budget` {one knob, policy}, `top_k`, `early_exit`, `deadline_ms`.

    Knobs may also come in the query string, but each knob in one place only.
    """
    payload = json_body(body)
    if not isinstance(payload, dict):
        raise ValidationFailedError("the JSON body must be an object with `image` or `images`")
    accepted = (*JSON_IMAGE_FIELDS, "budget", *JSON_KNOBS)
    for name in payload:
        if name not in accepted:
            raise ValidationFailedError(f"unknown field {name!r}; accepted: {', '.join(accepted)}")
    options: dict[str, Any] = {k: v for k, v in payload.items() if k in JSON_KNOBS}
    budget = payload.get("budget")
    if budget is not None:
        if not isinstance(budget, dict):
            raise ValidationFailedError('budget must be an object such as {"max_accuracy_drop": 0.01}')
        for name in budget:
            if name not in BUDGET_FIELDS:
                raise ValidationFailedError(f"unknown budget field {name!r}; accepted: {', '.join(BUDGET_FIELDS)}")
        options.update(budget)
    for name in query:
        if name in options:
            raise ValidationFailedError(f"{name} is given both in the JSON body and in the query: give it once")
    options.update(query)
    return ClassifyRequest(EncodedImages(_base64_images(payload), base64=True), options, FIELD, V1_KNOBS)


def _base64_images(payload: Mapping[str, Any]) -> list[str]:
    image, images = payload.get("image"), payload.get("images")
    if image is not None and images is not None:
        raise ValidationFailedError("give either `image` or `images`, not both")
    if image is not None:
        if not isinstance(image, str):
            raise ValidationFailedError("image must be a base64 string")
        return [image]
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValidationFailedError("images must be a list of base64 strings")
    return images


def files_request(blobs: list[bytes], query: Mapping[str, str]) -> ClassifyRequest:
    """The images of a multipart form's `file` parts, in order, with the query string's knobs."""
    return ClassifyRequest(EncodedImages(blobs), query, QUERY, V1_KNOBS)


#: The Content-Type of a plain form: the media type and a boundary of the characters clients pick
#: (curl, browsers, requests, httpx), optionally quoted, and no other parameter.
_PLAIN_FORM_TYPE = re.compile(rb'(?i:multipart/form-data); ?boundary=("?)([0-9A-Za-z_.+\-]{1,70})\1')
#: The head of a plain `file` part: Content-Disposition with `name="file"` and a filename (no quote,
#: backslash or control character in it: nothing to unescape), optionally a Content-Type, the blank line.
_PLAIN_FILE_HEAD = re.compile(
    rb'(?i:content-disposition): form-data; name="file"; filename="[^"\\\x00-\x1f\x7f]*"'
    rb"(?:\r\n(?i:content-type): [!-~][ -~]*)?\r\n\r\n"
)


def plain_form_files(body: bytes, content_type: bytes, max_files: int) -> list[bytes] | None:
    """The `file` parts of a plain multipart form in one pass over the body, or None.

    Why: Starlette's form parser (python-multipart callbacks, a SpooledTemporaryFile and an
    UploadFile per part, FormData) cost more than the rest of a small image's request together.
    A form is plain when it is exactly what clients send for `-F file=@...`: the body starts with
    the first boundary, every part is a `file` upload whose head `_PLAIN_FILE_HEAD` matches, each
    part ends at the first CRLF + boundary, the last boundary closes it (one optional CRLF after),
    and there are 1..max_files parts. For such a body python-multipart yields the same parts, so
    the answer cannot differ (tests/service/http/test_fast_path.py sends forms both ways).
    Anything else, from an unknown field to a stray byte, returns None and is parsed by
    `multipart_request` (Starlette), whose answers and error messages stay the reference.
    """
    kind = _PLAIN_FORM_TYPE.fullmatch(content_type)
    if kind is None:
        return None
    delimiter = b"\r\n--" + kind.group(2)
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    blobs: list[bytes] = []
    at = len(delimiter)  # just past the first boundary line's CRLF
    while True:
        head = _PLAIN_FILE_HEAD.match(body, at)
        if head is None or len(blobs) == max_files:
            return None
        end = body.find(delimiter, head.end())
        if end < 0:
            return None
        blobs.append(body[head.end() : end])
        at = end + len(delimiter)
        after = body[at : at + 2]
        if after == b"--":
            return blobs if body[at + 2 :] in (b"", b"\r\n") else None
        if after != b"\r\n":
            return None
        at += 2


async def multipart_request(
    request: Request, query: Mapping[str, str], max_images: int, max_part: int
) -> ClassifyRequest:
    """multipart/form-data with one or more `file` parts; knobs in the query string.

    Starlette's parser: the reference for every form, and the only parser of forms that
    `plain_form_files` does not take.
    """
    form = await _read_form(request, max_images, max_part)
    try:
        names = {name for name, _ in form.multi_items()}
        if names - {"file"}:
            extra = sorted(names - {"file"})[0]
            raise ValidationFailedError(f"unknown multipart field {extra!r}; accepted: file (put knobs in the query)")
        parts = form.getlist("file")
        uploads = [p for p in parts if not isinstance(p, str)]
        if len(uploads) != len(parts):
            raise ValidationFailedError("multipart `file` fields must be file uploads")
        blobs = [await upload.read() for upload in uploads]
    finally:
        await form.close()
    return files_request(blobs, query)


async def _read_form(request: Request, max_images: int, max_part: int) -> FormData:
    """Parse multipart with our limits; Starlette's parser errors (a bare 400) become ours."""
    try:
        return await request.form(max_files=max_images, max_fields=64, max_part_size=max_part)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "too many files" in detail.lower():
            raise TooManyImagesError(f"more than {max_images} files in one request, the limit is {max_images}") from exc
        if "maximum size" in detail.lower():
            raise PayloadTooLargeError(f"a multipart part is over the limit: {detail}") from exc
        raise ValidationFailedError(f"malformed multipart body: {detail}") from exc


def unsupported_media_type(kind: str) -> UnsupportedMediaTypeError:
    if not kind:
        return UnsupportedMediaTypeError(
            "missing Content-Type: send multipart/form-data, application/json or an image type such as image/png"
        )
    return UnsupportedMediaTypeError(
        f"unsupported Content-Type {kind!r}: send multipart/form-data (`file` parts), application/json "
        "(base64 `image`/`images`) or a raw image body (image/png, image/jpeg, image/webp, image/gif, "
        "image/bmp, application/octet-stream)"
    )


def knob(name: str) -> Knob:
    """A knob of the v1 vocabulary by name (for the OpenAPI text)."""
    return TOP_K if name == TOP_K.name else KNOB_BY_NAME[name]
