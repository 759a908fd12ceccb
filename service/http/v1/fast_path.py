"""The hot path: `POST /v1/classify` with a raw image body, answered without FastAPI's machinery.

Why: for a 28x28 PNG the model work is ~0.2 ms, and a py-spy profile of the server at 64 clients
put 37 % of its Python time in FastAPI/Starlette (route matching, the request/response wrapper
task, solving eight query parameters and a dependency per request) — the biggest single cost of
a request. Raw-body classify is the form high-rate clients use (no multipart, no base64), so it
gets a direct ASGI handler that does the same work through the same core function
(`service.http.v1.routes.classify_to_json`).

Correctness by construction, not by re-implementation: the decision is made from the headers and
the query string alone, *before* the body is read, and the fast path takes a request only when
every query parameter is in a narrow, unambiguous form (plain integers and decimals, `true` /
`false`, each name once). Anything else — other content types, unknown or repeated parameters,
values FastAPI would have to validate or reject — goes to the FastAPI route untouched, which gives
the canonical answer and the canonical 422. Domain errors raised in the core (bad image, bad
budget, over capacity, deadline) are rendered by the same `service.http.errors.error_response`.

`service.http.app.BoostServeApp` asks `options(scope)` first thing and sends eligible requests through
`service.http.middleware.RequestMiddleware` straight to this handler, so request ids, the body limit,
metrics (`route` label `/v1/classify`) and the last-resort 500 are the same for both paths, while
the layers FastAPI puts around every app (Starlette's ServerErrorMiddleware, FastAPI's telemetry
and body-size middlewares: ~7 % of a fast-path request's CPU, and nothing they do applies to it)
are skipped. One consequence: FastAPI's built-in OpenTelemetry tracing does not see these requests
(BOOSTSERVE_FAST_PATH=false routes them through FastAPI again).
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from service.core.errors import BoostServeError, NotReadyError
from service.http.errors import error_response
from service.http.v1 import routes as api_v1
from service.http.v1.routes import classify_to_json, is_raw_image_type, normalize_media_type, parse_thresholds

CLASSIFY_PATH = "/v1/classify"
#: Scope key carrying the parsed query from `options` to the handler.
OPTIONS_KEY = "boostserve.fast_path.options"

_INT = re.compile(r"^[0-9]{1,9}$")
_DECIMAL = re.compile(r"^(?:[0-9]{1,15}(?:\.[0-9]{0,15})?|\.[0-9]{1,15})(?:[eE][-+]?[0-9]{1,3})?$")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _int_in(text: str, low: int, high: int) -> int | None:
    if not _INT.match(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def _decimal(text: str) -> float | None:
    return float(text) if _DECIMAL.match(text) else None


def split_query(text: str) -> list[tuple[str, str]]:
    """`parse_qsl(text, keep_blank_values=True)`, skipping its per-item unquote when there is
    nothing to unquote (the common case; unquote showed in the server profile)."""
    if "%" in text or "+" in text:
        return parse_qsl(text, keep_blank_values=True)
    return [(n, v) for n, _, v in (item.partition("=") for item in text.split("&") if item)]


def parse_simple_query(query_string: bytes) -> dict[str, Any] | None:
    """The classify options, or None when FastAPI should parse (and maybe reject) the query.

    Returns {"budget": {...five budget fields...}, "top_k", "early_exit", "deadline_ms"} with the
    same values and constraints as the route's Query(...) declarations.
    """
    pairs = split_query(query_string.decode("latin-1"))
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in seen:
            return None
        seen[name] = value
    budget: dict[str, Any] = {
        "max_exit": None,
        "budget_macs": None,
        "max_accuracy_drop": None,
        "thresholds": None,
        "policy": None,
    }
    out: dict[str, Any] = {"budget": budget, "top_k": None, "early_exit": None, "deadline_ms": None}
    for name, value in seen.items():
        if name == "max_exit":
            budget["max_exit"] = _int_in(value, 1, 999_999_999)
            if budget["max_exit"] is None:
                return None
        elif name == "top_k":
            out["top_k"] = _int_in(value, 1, 1000)
            if out["top_k"] is None:
                return None
        elif name in ("budget_macs", "deadline_ms", "max_accuracy_drop"):
            number = _decimal(value)
            if (
                number is None
                or (name == "budget_macs" and not number > 0)
                or (name == "deadline_ms" and not 0 < number <= 600_000)
                or (name == "max_accuracy_drop" and not 0 <= number <= 1)
            ):
                return None
            (budget if name != "deadline_ms" else out)[name] = number
        elif name == "early_exit":
            if value.lower() not in _BOOLS:
                return None
            out["early_exit"] = _BOOLS[value.lower()]
        elif name == "policy":
            budget["policy"] = value
        elif name == "thresholds":
            budget["thresholds"] = value  # parsed in the handler: its errors are domain errors
        else:
            return None
    return out


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
            return normalize_media_type(value.decode("latin-1"))
    return ""


class RawClassifyFastPath:
    """ASGI handler for eligible raw-image classify requests: `options(scope)` decides, the call serves."""

    def __init__(self) -> None:
        self._route: Any = None
        # query string -> parsed options (None: FastAPI's); clients repeat a handful of queries.
        self._parsed: dict[bytes, dict[str, Any] | None] = {}

    def options(self, scope: Scope) -> dict[str, Any] | None:
        """The parsed query if this request is for the fast path, else None (FastAPI serves it)."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CLASSIFY_PATH:
            return None
        if not is_raw_image_type(_content_type(scope)):
            return None
        query = scope.get("query_string", b"")
        try:
            return self._parsed[query]
        except KeyError:
            pass
        if len(self._parsed) >= 256:
            self._parsed.clear()
        parsed = self._parsed[query] = parse_simple_query(query)
        return parsed

    def _classify_route(self) -> Any:
        """The route object, set on the scope so metrics and logs label the request alike."""
        if self._route is None:
            for route in api_v1.router.routes:
                if getattr(route, "path", None) == CLASSIFY_PATH and "POST" in getattr(route, "methods", ()):
                    self._route = route
        return self._route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        options = scope[OPTIONS_KEY]
        start = time.perf_counter()
        scope["route"] = self._classify_route()
        try:
            runtime = getattr(scope["app"].state, "runtime", None)
            if runtime is None:
                raise NotReadyError("the model is still loading")
            budget = options["budget"]  # shared by every request with this query: not mutated
            if budget["thresholds"] is not None:
                budget = {**budget, "thresholds": parse_thresholds(budget["thresholds"])}
            blob = await _read_body(receive)
            body = await classify_to_json(
                runtime, [blob], budget, options["top_k"], options["early_exit"], options["deadline_ms"], start
            )
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
