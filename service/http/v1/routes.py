"""v1 JSON API (classify, budget) and the operational probes (livez, readyz, metrics).

Routes are thin: they turn HTTP shapes (multipart, raw body, JSON + base64, query strings)
into bytes + a budget override, and `service.core.classify.Runtime` does the rest.

POST /v1/classify reads its body itself (not through a FastAPI body parameter) because one route
accepts three encodings chosen by Content-Type, and because body-limit errors must reach the
client as 413 rather than FastAPI's generic "error parsing the body" 400.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.classify import Runtime
from service.core.errors import (
    ForbiddenError,
    InvalidImageError,
    NotReadyError,
    PayloadTooLargeError,
    TooManyImagesError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)
from service.http.metrics import CONTENT_TYPE
from service.http.schemas import (
    ERROR_RESPONSES,
    BudgetFields,
    BudgetInfo,
    ClassifyJSON,
    ClassifyResponse,
    ErrorResponse,
    Status,
)
from service.http.v1.render import classify_response_json, image_results

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

router = APIRouter()
probes = APIRouter()


# ---------------------------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------------------------


def runtime_of(request: Request) -> Runtime:
    """The loaded model; 503 while it is still loading."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReadyError("the model is still loading")
    return runtime


async def get_runtime(request: Request) -> Runtime:
    """Dependency form of `runtime_of`. Async on purpose: FastAPI runs sync dependencies in the
    threadpool, a thread hop per request that cost ~0.5 ms (measured) for a dictionary lookup."""
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer token for budget changes, compared in constant time.

    No token configured -> 403 (the endpoint is disabled, no token can help); missing or wrong
    token -> 401 with WWW-Authenticate (the same answer for both, so it leaks nothing).
    """
    configured = request.app.state.settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise ForbiddenError("changing the budget is disabled: the server has no admin token (BOOSTSERVE_ADMIN_TOKEN)")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        exc = UnauthorizedError("missing bearer token: send 'Authorization: Bearer <admin token>'")
        exc.www_authenticate = 'Bearer realm="boostserve"'  # type: ignore[attr-defined]
        raise exc
    if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
        exc = UnauthorizedError("invalid bearer token")
        exc.www_authenticate = 'Bearer realm="boostserve", error="invalid_token"'  # type: ignore[attr-defined]
        raise exc


# ---------------------------------------------------------------------------------------------
# request parsing helpers
# ---------------------------------------------------------------------------------------------


def parse_thresholds(text: str) -> list[float | None]:
    """'0.9,0.8,0' -> [0.9, 0.8, 0.0]; 'inf' / 'null' / '' mean never exit there."""
    out: list[float | None] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if item in ("", "inf", "+inf", "null", "none"):
            out.append(None)
            continue
        try:
            value = float(item)
        except ValueError as exc:
            raise ValidationFailedError(f"thresholds: {raw.strip()!r} is not a number") from exc
        if not math.isfinite(value):
            raise ValidationFailedError(f"thresholds: {raw.strip()!r} is not a finite number")
        out.append(value)
    return out


def decode_base64(text: str, index: int) -> bytes:
    """Standard or URL-safe base64, with or without padding or a data: URI prefix."""
    payload = text.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image {index} is not valid base64: {exc}") from exc


async def read_form(request: Request, runtime: Runtime) -> FormData:
    """Parse multipart with our limits; Starlette's parser errors (a bare 400) become ours."""
    limit = runtime.settings.max_images_per_request
    try:
        return await request.form(max_files=limit, max_fields=64, max_part_size=runtime.settings.max_body_bytes)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "too many files" in detail.lower():
            raise TooManyImagesError(f"more than {limit} files in one request, the limit is {limit}") from exc
        if "maximum size" in detail.lower():
            raise PayloadTooLargeError(f"a multipart part is over the limit: {detail}") from exc
        raise ValidationFailedError(f"malformed multipart body: {detail}") from exc


def media_type(request: Request) -> str:
    return normalize_media_type(request.headers.get("content-type", ""))


def normalize_media_type(header: str) -> str:
    return header.split(";")[0].strip().lower()


def is_raw_image_type(kind: str) -> bool:
    """A Content-Type that /v1/classify reads as one raw image body."""
    return kind in RAW_IMAGE_TYPES or kind.startswith("image/")


# ---------------------------------------------------------------------------------------------
# routes
# ---------------------------------------------------------------------------------------------

_CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One of: multipart/form-data with one or more `file` parts; a raw image body "
        "(image/png, image/jpeg, image/webp, image/gif, image/bmp, application/octet-stream); or JSON.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyJSON"}},
        },
    }
}


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_CLASSIFY_BODY,
    summary="Classify one or more images, early-exiting per image",
    description="Each image leaves the network at the first exit whose confidence reaches its "
    "threshold; the thresholds come from the global budget unless the request gives one of "
    "`budget_macs`, `max_accuracy_drop`, `max_exit`, `thresholds` (JSON `budget` object, or query "
    "parameters for multipart/raw bodies). `early_exit=false` runs every stage (A/B comparison).",
)
async def classify(
    request: Request,
    runtime: RuntimeDep,
    max_exit: Annotated[int | None, Query(ge=1, description="1-based last exit allowed")] = None,
    budget_macs: Annotated[float | None, Query(gt=0, description="average MACs per image")] = None,
    max_accuracy_drop: Annotated[float | None, Query(ge=0, le=1, description="accepted accuracy loss")] = None,
    thresholds: Annotated[
        str | None, Query(description="comma-separated per-exit thresholds, 'inf' = never exit there")
    ] = None,
    policy: Annotated[str | None, Query(description="threshold policy for budget_macs")] = None,
    top_k: Annotated[int | None, Query(ge=1, le=1000)] = None,
    early_exit: Annotated[bool | None, Query(description="false: run every stage")] = None,
    deadline_ms: Annotated[float | None, Query(gt=0, le=600_000)] = None,
) -> Response:
    start = time.perf_counter()
    query_budget: dict[str, Any] = {
        "max_exit": max_exit,
        "budget_macs": budget_macs,
        "max_accuracy_drop": max_accuracy_drop,
        "thresholds": parse_thresholds(thresholds) if thresholds is not None else None,
        "policy": policy,
    }
    kind = media_type(request)
    encoded: list[str] | None = None  # JSON: base64 strings, decoded once the options are valid
    blobs: list[bytes] = []
    if kind == "application/json" or kind.endswith("+json"):
        body = await request.body()
        try:
            payload = ClassifyJSON.model_validate_json(body)
        except ValidationError as exc:
            raise ValidationFailedError(_pydantic_message(exc)) from exc
        if payload.image is not None and payload.images is not None:
            raise ValidationFailedError("give either `image` or `images`, not both")
        encoded = [payload.image] if payload.image is not None else list(payload.images or [])
        runtime.check_count(len(encoded))
        if payload.budget is not None:
            if any(v is not None for v in query_budget.values()):
                raise ValidationFailedError("give the budget either in the JSON body or in the query, not both")
            query_budget = payload.budget.given()
        if "top_k" in payload.model_fields_set or top_k is None:
            top_k = payload.top_k
        early_exit = payload.early_exit if payload.early_exit is not None else early_exit
        deadline_ms = payload.deadline_ms if payload.deadline_ms is not None else deadline_ms
    elif kind == "multipart/form-data":
        form = await read_form(request, runtime)
        try:
            parts = form.getlist("file")
            uploads = [p for p in parts if not isinstance(p, str)]
            if len(uploads) != len(parts):
                raise ValidationFailedError("multipart `file` fields must be file uploads")
            runtime.check_count(len(uploads))
            blobs = [await upload.read() for upload in uploads]
        finally:
            await form.close()
    elif is_raw_image_type(kind):
        blobs = [await request.body()]
    elif not kind:
        raise UnsupportedMediaTypeError(
            "missing Content-Type: send multipart/form-data, application/json or an image type such as image/png"
        )
    else:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Type {kind!r}: send multipart/form-data (`file` parts), application/json "
            "(base64 `image`/`images`) or a raw image body (image/png, image/jpeg, image/webp, image/gif, "
            "image/bmp, application/octet-stream)"
        )

    body = await classify_to_json(runtime, blobs, query_budget, top_k, early_exit, deadline_ms, start, encoded=encoded)
    return Response(content=body, media_type="application/json")


async def classify_to_json(
    runtime: Runtime,
    blobs: list[bytes],
    budget_fields: dict[str, Any],
    top_k: int | None,
    early_exit: bool | None,
    deadline_ms: float | None,
    start: float,
    encoded: list[str] | None = None,
) -> bytes:
    """The classify work after request parsing, shared by this route and `service.http.v1.fast_path`.

    Options before pixels: a bad budget is reported without decoding anything. Serialised here,
    by `service.http.v1.render` (plain dicts, the `ClassifyResponse` shape); response_model stays
    declared for /docs.
    """
    resolved, budget_json = runtime.resolve_fields(budget_fields, early_exit)
    if encoded is not None:
        blobs = [decode_base64(text, i) for i, text in enumerate(encoded)]
    images = await runtime.preprocess(blobs)
    answers = await runtime.classify(images, resolved, deadline_ms)
    manifest = runtime.manifest
    results = image_results(
        answers, manifest.classes, manifest.num_stages, manifest.full_macs, 5 if top_k is None else top_k
    )
    latency_ms = (time.perf_counter() - start) * 1000.0
    return classify_response_json(results, latency_ms, manifest.name, manifest.version, budget_json)


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class BudgetUpdate(BudgetFields):
    """PUT /v1/budget body: a new global budget and/or the global early-exit switch."""

    early_exit: bool | None = None


@router.get(
    "/v1/budget",
    response_model=BudgetInfo,
    responses={503: ERROR_RESPONSES[503]},
    summary="The global budget and the thresholds in force",
)
async def get_budget(runtime: RuntimeDep) -> BudgetInfo:
    return BudgetInfo(**runtime.budget_info(runtime.global_budget))


@router.put(
    "/v1/budget",
    response_model=BudgetInfo,
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
        403: {"model": ErrorResponse, "description": "no admin token configured: budget changes disabled"},
        422: ERROR_RESPONSES[422],
        503: ERROR_RESPONSES[503],
    },
    summary="Change the global budget at runtime (bearer token)",
    dependencies=[Depends(require_admin)],
)
async def put_budget(
    runtime: RuntimeDep,
    update: Annotated[
        BudgetUpdate,
        Body(examples=[{"max_accuracy_drop": 0.02}, {"budget_macs": 1.5e6, "policy": "budgeted_batch"}]),
    ],
) -> BudgetInfo:
    fields = update.model_dump(exclude_none=True)
    new_early_exit = fields.pop("early_exit", None)
    budget = runtime.parse_budget(fields)
    if budget is None and new_early_exit is None:
        raise ValidationFailedError(
            "give one of budget_macs, max_accuracy_drop, max_exit, thresholds (and/or early_exit)"
        )
    if budget is not None:
        await runtime.set_global_budget(budget)
    if new_early_exit is not None:
        runtime.set_global_early_exit(bool(new_early_exit))
    return BudgetInfo(**runtime.budget_info(runtime.global_budget))


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------


@probes.get("/livez", response_model=Status, summary="Liveness: the process answers HTTP")
async def livez() -> Status:
    return Status(status="ok")


@probes.get(
    "/readyz",
    response_model=Status,
    responses={503: ERROR_RESPONSES[503]},
    summary="Readiness: models loaded and warmed up, not shutting down",
)
async def readyz(request: Request) -> Status:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready or runtime.closing:
        raise NotReadyError("not ready: " + ("shutting down" if runtime and runtime.closing else "loading model"))
    return Status(status="ready")


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(content=registry.render(), media_type=CONTENT_TYPE)
