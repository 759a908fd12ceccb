"""The one table from domain `error_type` to HTTP status, and the exception handlers that use it.

Why one table: the engine, scheduler, preprocessing and budget code raise transport-free errors
(`service.core.errors`); the table of their statuses is `service.core.status` (HTTP and gRPC
columns), and this module is the only HTTP code that applies it, so v1, v2,
FastAPI's own validation errors and routing 404/405 all answer with the same status for the same
`error_type` (which also labels `boostserve_errors_total`). The body has one of two shapes:

    v1 and everything else:  {"error": {"type": "<error_type>", "message": "<human readable>"}}
    /v2/... (OIP routes):    {"error": "<human readable>", "error_type": "<error_type>"}

Why two: the Open Inference Protocol fixes `{"error": "<message>"}` for its routes, and OIP clients
rely on it — tritonclient formats `body["error"]` as a string and crashes on an object — so the v2
routes speak the protocol, adding our stable `error_type` as an extra member (OIP clients ignore
it, our dashboards and scripts can still branch on it). Everywhere else keeps the richer envelope.

Choices documented here:
  - too many images in one request -> 413 (it is a size limit, like the body limit)
  - v2 tensor problems (shape, datatype, NaN/Inf, wrong length) -> 422 validation_error
  - PUT /v1/budget with a missing or wrong token -> 401 (the message and the WWW-Authenticate
    challenge say which), with no token configured on the server -> 403
  - 500 never echoes the exception: a generic message plus the request id, traceback in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from service.core.errors import (
    BoostServeError,
    NotReadyError,
    OverCapacityError,
    UnauthorizedError,
)
from service.core.status import HTTP_STATUS

log = logging.getLogger("boostserve.http")

#: error_type -> HTTP status: the HTTP column of the one protocol-neutral table (service.core.status,
#: shared with the gRPC adapter).
STATUS_BY_ERROR_TYPE: dict[str, int] = HTTP_STATUS

#: For routing errors raised by Starlette (no domain error behind them).
_ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "over_capacity",
    503: "not_ready",
    504: "deadline_exceeded",
}

#: Seconds a client should wait after a 503 during startup/shutdown.
NOT_READY_RETRY_AFTER_S = 1

INTERNAL_MESSAGE = "internal server error; quote request id {request_id} when reporting it"


def status_for(error_type: str) -> int:
    return STATUS_BY_ERROR_TYPE.get(error_type, 500)


def is_oip_path(path: str) -> bool:
    """True for the Open Inference Protocol routes, which answer errors in the protocol's shape."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(error_type: str, message: str, path: str = "") -> dict[str, Any]:
    """The error body for a request to `path`: the OIP shape under /v2, our envelope elsewhere."""
    if is_oip_path(path):
        return {"error": message, "error_type": error_type}
    return {"error": {"type": error_type, "message": message}}


def raw_response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete HTTP/1.1 response written by the protocol itself: status line, `headers`, then
    Content-Length and `body` (service.http.connection's 431/408, the head gate's 429s)."""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return STATUS_LINE[status] + lines + b"content-length: %d\r\n\r\n" % len(body) + body


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "-")


def _count(request: Request, error_type: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_error(error_type)


def error_response(request: Request, exc: BoostServeError) -> JSONResponse:
    """Render a domain error: status from the table, Retry-After / WWW-Authenticate where due."""
    error_type = exc.error_type if exc.error_type in STATUS_BY_ERROR_TYPE else "internal_error"
    status = status_for(error_type)
    headers: dict[str, str] = {}
    message = exc.message
    if isinstance(exc, OverCapacityError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, NotReadyError):
        headers["Retry-After"] = str(NOT_READY_RETRY_AFTER_S)
    elif isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = exc.www_authenticate
    if status >= 500 and error_type == "internal_error":
        log.error("internal error (request id %s): %s", request_id_of(request), exc.message, exc_info=exc)
        message = INTERNAL_MESSAGE.format(request_id=request_id_of(request))
    _count(request, error_type)
    return JSONResponse(error_body(error_type, message, request.url.path), status_code=status, headers=headers)


async def _domain_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BoostServeError)
    return error_response(request, exc)


def _format_validation(exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":  # loc is (body, byte offset): say what it means
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON{f' ({detail})' if detail else ''}")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, "validation_error")
    body = error_body("validation_error", _format_validation(exc), request.url.path)
    return JSONResponse(body, status_code=422)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _ERROR_TYPE_BY_STATUS.get(exc.status_code, "internal_error")
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    _count(request, error_type)
    headers = dict(exc.headers or {})
    body = error_body(error_type, message, request.url.path)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are turned into 500 by service.http.middleware."""
    app.add_exception_handler(BoostServeError, _domain_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
