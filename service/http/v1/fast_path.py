"""The hot path: `POST /v1/classify` with a raw image or multipart body, answered without FastAPI.

Why: for a 28x28 PNG the model work is ~0.2 ms, and FastAPI/Starlette (route matching, the
request/response wrapper task, dependencies) was the biggest single cost of such a request in the
server's profile. Raw bodies are what high-rate clients send; multipart (`curl -F file=@...`, a
browser form) is what the README shows and most clients send, and it paid Starlette's form parser
on top (half the raw path's req/s, issue 17). Both get this direct ASGI handler.

Same answers by construction: the handler builds its `ClassifyRequest` with the same functions as
the FastAPI route (`service.http.v1.request`: `raw_request`; for multipart `files_request` over the
parts `plain_form_files` reads, and for every other form `multipart_request`, the route's own
Starlette parser), the core parses the knobs (and refuses unknown ones) for both, the same renderer
writes the answer and domain errors are rendered by the same `service.http.errors.error_response`.
A multipart body is read whole and admitted (`ClassifyService.check_capacity`: 429/503) before it
is parsed, as on the route. So the decision needs only the method, path and Content-Type.

`service.http.app.BoostServeApp` asks `takes(scope)` first thing and sends eligible requests through
`service.http.middleware.RequestMiddleware` straight to this handler, so request ids, the body
limit and the body budget, metrics (`route` label `/v1/classify`) and the last-resort 500 are the
same for both paths, while the layers FastAPI puts around every app (Starlette's
ServerErrorMiddleware, FastAPI's telemetry and body-size middlewares) are skipped. One
consequence: FastAPI's built-in OpenTelemetry tracing does not see these requests
(BOOSTSERVE_FAST_PATH=false routes them through FastAPI again).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from service.core.classify import ClassifyRequest, ClassifyService
from service.core.errors import BoostServeError, NotReadyError
from service.http.errors import error_response
from service.http.middleware import arrived_at
from service.http.v1 import request as wire
from service.http.v1.render import render_classify

CLASSIFY_PATH = "/v1/classify"


async def _read_body(receive: Receive) -> bytes:
    """The request body, as Starlette's `Request.body()` reads it (a small upload is one message)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _content_type(scope: Scope) -> bytes:
    """The first Content-Type header as sent (Starlette's `request.headers[...]` reads the first too)."""
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return bytes(value)
    return b""


def _replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands out the body already read, once, then the connection's own messages."""
    pending = [body]

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


class ClassifyFastPath:
    """ASGI handler for raw-image and multipart classify requests: `takes(scope)` decides, the call serves."""

    def __init__(self, route: Any) -> None:
        #: The FastAPI route object, set on the scope so metrics and logs label the request alike.
        self.route = route
        # query string -> knobs; clients repeat a handful of queries.
        self._queries: dict[bytes, dict[str, str]] = {}

    @staticmethod
    def takes(scope: Scope) -> bool:
        """True for `POST /v1/classify` with a raw image or multipart Content-Type (FastAPI serves the rest)."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CLASSIFY_PATH:
            return False
        kind = wire.normalize_media_type(_content_type(scope).decode("latin-1"))
        return kind == wire.MULTIPART_TYPE or wire.is_raw_image_type(kind)

    def _query(self, query_string: bytes) -> dict[str, str]:
        hit = self._queries.get(query_string)
        if hit is None:
            hit = wire.query_options(query_string)  # errors are raised, never memoised
            if len(self._queries) >= 256:
                self._queries.clear()
            self._queries[query_string] = hit
        return hit

    @staticmethod
    async def _multipart(
        scope: Scope,
        receive: Receive,
        service: ClassifyService,
        body: bytes,
        content_type: bytes,
        query: dict[str, str],
    ) -> ClassifyRequest:
        """The route's multipart steps: admitted once the body is read, then parsed (plain forms here)."""
        service.check_capacity()  # refused before the form is parsed
        settings = scope["app"].state.settings
        blobs = wire.plain_form_files(body, content_type, settings.max_images_per_request)
        if blobs is not None:
            return wire.files_request(blobs, query)
        request = Request(scope, _replayed(body, receive))
        return await wire.multipart_request(request, query, settings.max_images_per_request, settings.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        scope["route"] = self.route
        try:
            service = getattr(scope["app"].state, "service", None)
            if service is None:
                raise NotReadyError("the model is still loading")
            query = self._query(scope.get("query_string", b""))
            body = await _read_body(receive)
            content_type = _content_type(scope)
            if wire.normalize_media_type(content_type.decode("latin-1")) == wire.MULTIPART_TYPE:
                request = await self._multipart(scope, receive, service, body, content_type, query)
            else:
                request = wire.raw_request(body, query)
            result = await service.classify(request, arrived_at(scope))
            latency_ms = (time.perf_counter() - start) * 1000.0
            body = render_classify(service, result, latency_ms)
        except BoostServeError as exc:
            await error_response(Request(scope, receive), exc)(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
