"""One pure-ASGI middleware for what every request needs: request id, body limit, metrics, 500s.

Why pure ASGI and one class: BaseHTTPMiddleware costs a task and a stream copy per request (we
budget <= 1.5 ms of server overhead for a 28x28 PNG), and the concerns share state (the status
the metrics record is the status the client got, the request id the 500 body quotes is the one in
the header and in the log).

  - X-Request-ID: the client's if it is sane (1-128 chars of [A-Za-z0-9._:-]), else a new one (32
    hex digits: a random prefix per middleware instance + a counter, unique without a uuid4 and
    its getrandom syscall per request); on every response; stored in `request.state.request_id`.
  - body limit: Content-Length over the limit is refused before reading; a chunked body is
    counted while it streams and refused the moment it passes the limit (never read unbounded).
    Before that 413 the rest of the body is read and discarded, up to LINGER_MAX_BYTES and
    LINGER_S (nginx's lingering close): closing with unread data makes the kernel send RST, and a
    client that writes its whole body before reading (urllib) got a reset instead of the 413.
  - metrics: latency and count by route *template* (unknown paths -> "other").
  - unexpected exceptions: logged with traceback and request id, answered with the generic 500
    envelope (Starlette's ServerErrorMiddleware sits outside user middleware and would answer
    without our headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import INTERNAL_MESSAGE, NOT_READY_RETRY_AFTER_S, error_body
from service.http.logging_setup import log_access
from service.http.metrics import Metrics

log = logging.getLogger("boostserve.http")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
OTHER_ROUTE = "other"


#: Lingering read before a 413: at most this many bytes of the refused body are read and thrown
#: away, for at most this long (a slow or endless client cannot hold the connection longer; past
#: either bound the 413 goes out and the connection closes, possibly with a reset). A declared
#: remainder above LINGER_MAX_BYTES is not read at all: it would end in a reset anyway.
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024
LINGER_S: Final = 2.0


class _BodyTooLarge(Exception):
    pass


class _BodiesOverBudget(Exception):
    pass


@dataclass
class BodyBudget:
    """Request-body bytes held by all requests in progress, shared by every middleware instance of an
    app (FastAPI's and the fast path's front door).

    Why: each body stays in memory until its request is answered, and nothing bounded their sum: 100
    clients each sending 9.5 MB and then stalling held ~1 GB until their timeouts. Over `limit`, a
    request whose body is still arriving is refused (429) unless it is the only one holding a body
    (so one body up to max_body_bytes always fits).
    """

    limit: int
    held: int = 0
    #: Refused requests whose rest of body is being read and thrown away right now (see _linger).
    lingering: int = 0


#: Refused requests lingering at once; beyond this a refusal is answered without reading the rest
#: of its body (a client writing its whole body first may then see a reset). Why a bound: 93
#: refused clients lingering together took ~500 MB of resident memory (the allocator keeps what
#: the read churn touched), which is the exhaustion the refusal was meant to prevent.
MAX_LINGERING: Final = 8


async def _linger(receive: Receive, scope: Scope, remaining: int | None, budget: BodyBudget | None = None) -> None:
    """Read and discard the rest of a refused body, within LINGER_MAX_BYTES and LINGER_S.

    remaining: the declared bytes still unread (None for a chunked body). A client that sent
    `Expect: 100-continue` has not sent the body, and reading would invite it: no lingering.
    """
    if remaining is not None and remaining > LINGER_MAX_BYTES:
        return
    if any(name == b"expect" for name, _ in scope.get("headers", [])):
        return
    if budget is not None and budget.lingering >= MAX_LINGERING:
        return
    if budget is not None:
        budget.lingering += 1
    drained = 0
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while drained <= LINGER_MAX_BYTES:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
    finally:
        if budget is not None:
            budget.lingering -= 1


def request_ids() -> Callable[[], str]:
    """A source of request ids: a random 20-hex-digit prefix per source, then a counter (32 hex digits)."""
    prefix = uuid.uuid4().hex[:20]
    counter = itertools.count()

    def new_request_id() -> str:
        return f"{prefix}{next(counter) & 0xFFFFFFFFFFFF:012x}"

    return new_request_id


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else OTHER_ROUTE


class RequestMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, body_budget: BodyBudget | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_budget = body_budget
        self._new_request_id = request_ids()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = client_request_id(scope.get("headers", ())) or self._new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status_holder = [500]
        started = [False]
        exceeded = [False]
        replaced = [False]
        limit = self.max_body_bytes

        def start_message(message: Message) -> Message:
            """Record the status; the response carries our X-Request-ID (and only ours)."""
            started[0] = True
            status_holder[0] = int(message["status"])
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
            headers.append(id_header)
            return {**message, "headers": headers}

        async def send_wrapper(message: Message) -> None:
            if replaced[0]:
                return  # the inner app's response was swapped for our 413; drop the rest of it
            if message["type"] == "http.response.start":
                if exceeded[0] and not started[0]:
                    # The body passed the limit but something (FastAPI's own body parsing) turned
                    # that into another response: the client gets the 413 instead.
                    replaced[0] = True
                    await reply_over_limit()
                    return
                message = start_message(message)
            await send(message)

        async def send_wrapper_raw(message: Message) -> None:
            await send(start_message(message) if message["type"] == "http.response.start" else message)

        declared = _content_length(scope)
        received = [0]

        async def reply_over_limit() -> None:
            await _linger(receive, scope, None if declared is None else declared - received[0], self.body_budget)
            message = f"request body is over the limit of {limit} bytes"
            await self._reply_error(send_wrapper_raw, scope, 413, "payload_too_large", message)

        if declared is not None and declared > limit:
            await _linger(receive, scope, declared, self.body_budget)
            await self._reply_error(
                send_wrapper_raw,
                scope,
                413,
                "payload_too_large",
                f"request body is {declared} bytes, over the limit of {limit}",
            )
            self._finish(scope, start, status_holder[0], request_id)
            return

        budget = self.body_budget

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received[0] += size
                if received[0] > limit:
                    exceeded[0] = True
                    raise _BodyTooLarge
                if budget is not None:
                    budget.held += size
                    if message.get("more_body", False) and budget.held > budget.limit and budget.held > received[0]:
                        raise _BodiesOverBudget  # someone else holds bodies too
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            if not started[0]:
                await reply_over_limit()
        except _BodiesOverBudget:
            assert budget is not None
            budget.held -= received[0]
            received[0] = 0  # released now: the lingering read below keeps nothing
            if not started[0]:
                await _linger(receive, scope, None, budget)
                await self._reply_error(
                    send_wrapper_raw,
                    scope,
                    429,
                    "over_capacity",
                    f"request bodies in progress are over the limit of {budget.limit} bytes; retry later",
                    headers=[(b"retry-after", b"1")],
                )
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful-shutdown timeout
            # (shutdown_grace_s) ends; unanswered, they would get uvicorn's plain-text 500. They get
            # the documented 503 not_ready envelope (Retry-After) instead; the cancellation goes on.
            if not started[0]:
                with contextlib.suppress(Exception):
                    await self._reply_error(
                        send_wrapper_raw,
                        scope,
                        503,
                        "not_ready",
                        "the server is shutting down and could not finish this request in time; retry",
                        headers=[(b"retry-after", str(NOT_READY_RETRY_AFTER_S).encode())],
                    )
            raise
        except Exception:
            log.exception("unhandled error (request id %s) on %s %s", request_id, scope["method"], scope["path"])
            if not started[0]:
                await self._reply_error(
                    send_wrapper, scope, 500, "internal_error", INTERNAL_MESSAGE.format(request_id=request_id)
                )
        finally:
            if budget is not None:
                budget.held -= received[0]
            self._finish(scope, start, status_holder[0], request_id)

    async def _reply_error(
        self,
        send: Send,
        scope: Scope,
        status: int,
        error_type: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.metrics.count_error(error_type)
        body = json.dumps(error_body(error_type, message, scope.get("path", ""))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope: Scope, start: float, status: int, request_id: str) -> None:
        route = route_template(scope)
        # Never the body or query values that could carry image data: method, template, status.
        target = route if route != OTHER_ROUTE else scope["path"][:200]
        record_request(self.metrics, scope["method"], route, target, status, time.perf_counter() - start, request_id)


def record_request(
    metrics: Metrics, method: str, route: str, target: str, status: int, elapsed: float, request_id: str
) -> None:
    """One answered HTTP request in the request metrics and the access log: the middleware's, and the
    protocol's head refusals (service.http.early_refusal), which never reach it."""
    metrics.observe_request(route, method, status, elapsed)
    log_access(method, target, status, elapsed, request_id, route)


#: Scope key: time.monotonic() when the protocol had the request's head (service.http.connection).
ARRIVED_AT: Final = "boostserve.arrived_at"


def arrived_at(scope: Scope) -> float | None:
    """When the request's head was parsed, if the protocol stamped it (None under another server).

    Why: the core measures an answered request's time for SLO mode, and a request can wait for the
    busy event loop between its head and its handler's first step; that wait is part of what the
    client sees, so it counts from here."""
    value = scope.get(ARRIVED_AT)
    return value if isinstance(value, float) else None


def client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's X-Request-ID (from a request's lower-cased headers) when it is sane, else None."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SANE_ID.match(candidate) else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install(app: Any, *, metrics: Metrics, max_body_bytes: int, body_budget: BodyBudget | None = None) -> None:
    """Add the middleware to a FastAPI/Starlette app."""
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=max_body_bytes, body_budget=body_budget)
