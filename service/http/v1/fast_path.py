"""The hot path: `POST /v1/classify` with a raw image body, answered without FastAPI's machinery.

Why: for a 28x28 PNG the model work is ~0.2 ms, and FastAPI/Starlette (route matching, the
request/response wrapper task, dependencies) was the biggest single cost of such a request in the
server's profile. Raw-body classify is the form high-rate clients use (no multipart, no base64), so
it gets a direct ASGI handler.

Same answers by construction: the handler builds its `ClassifyRequest` with the same function as
the FastAPI route (`service.http.v1.request.raw_request`), the core parses the knobs (and refuses
unknown ones) for both, the same renderer writes the answer and domain errors are rendered by the
same `service.http.errors.error_response`. So the decision needs only the method, path and
Content-Type: every raw-image classify request can take this path.

`service.http.app.BoostServeApp` asks `takes(scope)` first thing and sends eligible requests through
`service.http.middleware.RequestMiddleware` straight to this handler, so request ids, the body
limit, metrics (`route` label `/v1/classify`) and the last-resort 500 are the same for both paths,
while the layers FastAPI puts around every app (Starlette's ServerErrorMiddleware, FastAPI's
telemetry and body-size middlewares) are skipped. One consequence: FastAPI's built-in
OpenTelemetry tracing does not see these requests (BOOSTSERVE_FAST_PATH=false routes them through
FastAPI again).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from service.core.errors import BoostServeError, NotReadyError
from service.http.errors import error_response
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


def _content_type(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return wire.normalize_media_type(value.decode("latin-1"))
    return ""


class RawClassifyFastPath:
    """ASGI handler for raw-image classify requests: `takes(scope)` decides, the call serves."""

    def __init__(self, route: Any) -> None:
        #: The FastAPI route object, set on the scope so metrics and logs label the request alike.
        self.route = route
        # query string -> knobs; clients repeat a handful of queries.
        self._queries: dict[bytes, dict[str, str]] = {}

    @staticmethod
    def takes(scope: Scope) -> bool:
        """True for `POST /v1/classify` with a raw image Content-Type (FastAPI serves the rest)."""
        return (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == CLASSIFY_PATH
            and wire.is_raw_image_type(_content_type(scope))
        )

    def _query(self, query_string: bytes) -> dict[str, str]:
        hit = self._queries.get(query_string)
        if hit is None:
            hit = wire.query_options(query_string)  # errors are raised, never memoised
            if len(self._queries) >= 256:
                self._queries.clear()
            self._queries[query_string] = hit
        return hit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        scope["route"] = self.route
        try:
            service = getattr(scope["app"].state, "service", None)
            if service is None:
                raise NotReadyError("the model is still loading")
            query = self._query(scope.get("query_string", b""))
            result = await service.classify(wire.raw_request(await _read_body(receive), query))
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
