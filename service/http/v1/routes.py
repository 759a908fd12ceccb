"""v1 JSON API: `POST /v1/classify` and `GET/PUT /v1/budget`.

Routes are thin: `service.http.v1.request` turns the wire format (multipart, raw body, JSON +
base64, query strings) into a `ClassifyRequest`, the core classifies it, `service.http.v1.render`
writes the answer. The knobs are declared to OpenAPI from the core's knob table, not as FastAPI
`Query(...)` parameters, so FastAPI never parses them: the core does, with the same rules and
messages for every protocol.

POST /v1/classify reads its body itself (not through a FastAPI body parameter) because one route
accepts three encodings chosen by Content-Type, and because body-limit errors must reach the
client as 413 rather than FastAPI's generic "error parsing the body" 400.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from service.core.budget_source import BUDGET_UPDATE_KNOBS, parse_budget_update
from service.core.errors import UnsupportedMediaTypeError
from service.core.knobs import BUDGET_KNOBS, KNOBS
from service.http.deps import ServiceDep, require_admin, service_of
from service.http.middleware import arrived_at
from service.http.schemas import ERROR_RESPONSES, ClassifyResponse, ErrorResponse, GlobalBudgetInfo
from service.http.v1 import request as wire
from service.http.v1.render import render_classify

router = APIRouter()


def _query_parameters() -> list[dict[str, Any]]:
    """The knob table as OpenAPI query parameters."""
    return [
        {"name": k.name, "in": "query", "required": False, "description": k.description, "schema": k.json_schema()}
        for k in (*KNOBS, *wire.V1_KNOBS)
    ]


_CLASSIFY_OPENAPI: dict[str, Any] = {
    "parameters": _query_parameters(),
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
    },
}


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_CLASSIFY_OPENAPI,
    summary="Classify one or more images, early-exiting per image",
    description="Each image leaves the network at the first exit whose confidence reaches its "
    "threshold; the thresholds come from the global budget unless the request names one of "
    f"{', '.join(f'`{k.name}`' for k in BUDGET_KNOBS)} (JSON `budget` object, or query parameters). "
    "`early_exit=false` runs every stage (A/B comparison). Unknown parameters and fields are a 422.",
)
async def classify(request: Request, service: ServiceDep) -> Response:
    start = time.perf_counter()
    query = wire.query_options(request.scope.get("query_string", b""))
    kind = wire.normalize_media_type(request.headers.get("content-type", ""))
    if wire.is_json_type(kind):
        body = await request.body()
        service.check_capacity()  # refused before the JSON and base64 are parsed
        classify_request = wire.json_request(body, query)
    elif kind == wire.MULTIPART_TYPE:
        settings = request.app.state.settings
        await request.body()  # read (and kept for the parser) first: a refusal must not reset the client
        service.check_capacity()
        classify_request = await wire.multipart_request(
            request, query, settings.max_images_per_request, settings.max_body_bytes
        )
    elif wire.is_raw_image_type(kind):
        classify_request = wire.raw_request(await request.body(), query)
    else:
        raise wire.unsupported_media_type(kind)
    result = await service.classify(classify_request, arrived_at(request.scope))
    latency_ms = (time.perf_counter() - start) * 1000.0
    body = render_classify(service, result, latency_ms)
    return Response(content=body, media_type="application/json")


_BUDGET_UPDATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "a new global budget (one knob, with its policy) and/or the global early-exit switch",
    "properties": {k.name: k.json_schema() for k in BUDGET_UPDATE_KNOBS},
    "examples": [{"max_accuracy_drop": 0.02}, {"budget_macs": 5000000, "policy": "reference"}, {"early_exit": False}],
}


@router.get(
    "/v1/budget",
    response_model=GlobalBudgetInfo,
    responses={503: ERROR_RESPONSES[503]},
    summary="The global budget and the thresholds in force",
)
async def get_budget(request: Request, service: ServiceDep) -> GlobalBudgetInfo:
    return _global_budget(request, service.budget_info(service.live.current))


def _global_budget(request: Request, info: dict[str, Any]) -> GlobalBudgetInfo:
    return GlobalBudgetInfo(**info, source=request.app.state.budget_source.to_json())


@router.put(
    "/v1/budget",
    response_model=GlobalBudgetInfo,
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
        403: {"model": ErrorResponse, "description": "no admin token configured: budget changes disabled"},
        422: ERROR_RESPONSES[422],
        503: ERROR_RESPONSES[503],
    },
    summary="Change the global budget at runtime (bearer token)",
    dependencies=[Depends(require_admin)],
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _BUDGET_UPDATE_SCHEMA}}}
    },
)
async def put_budget(request: Request) -> GlobalBudgetInfo:
    service = service_of(request)
    kind = wire.normalize_media_type(request.headers.get("content-type", ""))
    if not wire.is_json_type(kind):
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {kind or 'none'!r}: send application/json")
    options = parse_budget_update(wire.json_body(await request.body()))
    budget_file = request.app.state.budget_file
    if budget_file is not None:  # written through to the file: every replica follows, restarts keep it
        resolved = await budget_file.put(options)
    else:  # this replica only, until restart (documented in docs/http-api.md)
        resolved = await service.set_global_budget(options.budget, options.early_exit)
        source = request.app.state.budget_source
        source.kind, source.updated_at, source.error = "put", time.time(), None
    return _global_budget(request, service.budget_info(resolved))
