"""`EarlyRefusal`: while SLO mode sheds, a classify request is refused at its head, before any ASGI work.

Why: a refusal that costs nearly as much as an answer is no protection. The ASGI 429 (uvicorn's
request task and cycle, our middleware, the fast path's body read, the core's option parsing) cost
about two thirds of a whole answered request at the cheapest operating point, so under overload
every 429 took the CPU that would have served the next request, and served req/s fell as offered
load rose (receive livelock: Mogul & Ramakrishnan, USENIX ATC 1996). The protocol
(`service.http.connection`) asks this gate once a request head is complete; a refusal is written
straight to the socket and the body is discarded as it arrives, so shedding costs little more than
parsing the request head.

The decision is the core's own: the service's `shed_check` (SLO mode's rule, `service.core.live`)
asked for one image, exactly as admission asks it. So there is one rule, and the 429 a client gets
here is the one admission gives (envelope, message, Retry-After), with an X-Request-ID as on every
answer (the client's own when it is sane, as the middleware keeps it, else a generated one), counted
in the same request and error metrics. Only
classify requests are gated (`POST /v1/classify` and the Open Inference Protocol infer routes);
probes, metrics and the admin API never are. One consequence (docs/http-api.md): while shedding, a
classify request is refused before its body is read, so an invalid one gets the 429, not its 4xx.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.responses import JSONResponse

from service.core.errors import OverCapacityError
from service.http.errors import error_body, raw_response, status_for
from service.http.metrics import Metrics
from service.http.middleware import client_request_id, record_request

__all__ = ["EarlyRefusal", "gated_route", "service_shed_check"]

_V2_INFER = re.compile(rb"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
_V2_ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

#: The service's admission shed check (`ClassifyService.shed_check`); None while nothing sheds.
ShedCheckSource = Callable[[], Callable[[int], None] | None]


def gated_route(method: bytes, path: bytes) -> str | None:
    """The route template (metrics label) of a request the gate may refuse; None for one it never does."""
    if method != b"POST":
        return None
    if path == b"/v1/classify":
        return "/v1/classify"
    match = _V2_INFER.match(path)
    if match is None:
        return None
    return _V2_ROUTES[1] if match.group(1) else _V2_ROUTES[0]


class EarlyRefusal:
    """Called by the protocol with a complete request head: the whole response to write, or None."""

    def __init__(self, shed_check: ShedCheckSource, metrics: Metrics, request_id: Callable[[], str]) -> None:
        self._shed_check = shed_check
        self._metrics = metrics
        self._request_id = request_id
        self._bodies: dict[tuple[str, str], bytes] = {}  # (route, message) -> JSON body

    def __call__(
        self,
        method: bytes,
        url: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        keep_alive: bool,
        default_headers: Sequence[tuple[bytes, bytes]],
    ) -> bytes | None:
        check = self._shed_check()
        if check is None:
            return None
        route = gated_route(method, url.partition(b"?")[0])
        if route is None:
            return None
        start = time.perf_counter()
        try:
            check(1)
        except OverCapacityError as exc:
            refusal = exc
        else:
            return None
        request_id = client_request_id(headers) or self._request_id()
        status = status_for(refusal.error_type)
        head = [
            *default_headers,
            (b"content-type", b"application/json"),
            (b"retry-after", b"%d" % refusal.retry_after_s),
            (b"x-request-id", request_id.encode("latin-1")),
        ]
        if not keep_alive:
            head.append((b"connection", b"close"))
        response = raw_response(status, head, self._body(route, refusal))
        self._metrics.count_error(refusal.error_type)
        record_request(self._metrics, "POST", route, route, status, time.perf_counter() - start, request_id)
        return response

    def _body(self, route: str, refusal: OverCapacityError) -> bytes:
        key = (route, refusal.message)
        body = self._bodies.get(key)
        if body is None:  # rendered as service.http.errors.error_response renders it
            body = bytes(JSONResponse(error_body(refusal.error_type, refusal.message, route)).body)
            if len(self._bodies) >= 64:
                self._bodies.clear()
            self._bodies[key] = body
        return body


def service_shed_check(state: Any) -> ShedCheckSource:
    """The shed check of the service in `state.service` (an app's state): None until it has started."""

    def source() -> Callable[[int], None] | None:
        service = getattr(state, "service", None)
        return None if service is None else service.shed_check

    return source
