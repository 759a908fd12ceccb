"""The one table from a domain `error_type` to each protocol's status: HTTP status and gRPC code.

Why here, in the transport-free core: the REST adapter (`service.http.errors`) and the gRPC adapter
(`service.grpc`) must answer the same error with the same meaning, and neither may import the
other (import-linter: commands > (http | grpc) > core). The values are plain numbers and the gRPC
code *names* (`grpc.StatusCode[name]`), so the core imports no transport.

Choices:
  - too many images / a body or message over the limit -> 413 / RESOURCE_EXHAUSTED (a size limit;
    gRPC itself answers an oversized message with RESOURCE_EXHAUSTED)
  - a full queue -> 429 / RESOURCE_EXHAUSTED (with a retry hint)
  - a request the protocol cannot carry (unsupported media type, routing 405) -> 415 or 405 /
    INVALID_ARGUMENT or UNIMPLEMENTED
  - 504 (the server's request timeout) and 408 (a slow client) -> DEADLINE_EXCEEDED
"""

from __future__ import annotations

from typing import NamedTuple

from service.core.errors import ERROR_TYPES


class Status(NamedTuple):
    http: int
    grpc: str  # a grpc.StatusCode member name


#: error_type -> its status in every protocol. Every entry of ERROR_TYPES has exactly one row.
STATUS: dict[str, Status] = {
    "invalid_image": Status(400, "INVALID_ARGUMENT"),
    "validation_error": Status(422, "INVALID_ARGUMENT"),
    "payload_too_large": Status(413, "RESOURCE_EXHAUSTED"),
    "too_many_images": Status(413, "RESOURCE_EXHAUSTED"),
    "unsupported_media_type": Status(415, "INVALID_ARGUMENT"),
    "not_found": Status(404, "NOT_FOUND"),
    "method_not_allowed": Status(405, "UNIMPLEMENTED"),
    "unauthorized": Status(401, "UNAUTHENTICATED"),
    "forbidden": Status(403, "PERMISSION_DENIED"),
    "over_capacity": Status(429, "RESOURCE_EXHAUSTED"),
    "not_ready": Status(503, "UNAVAILABLE"),
    "deadline_exceeded": Status(504, "DEADLINE_EXCEEDED"),
    "headers_too_large": Status(431, "RESOURCE_EXHAUSTED"),  # answered by service.http.connection
    "request_timeout": Status(408, "DEADLINE_EXCEEDED"),  # likewise: head or body not received in time
    "internal_error": Status(500, "INTERNAL"),
}
assert set(STATUS) == set(ERROR_TYPES), "every error_type needs a status in every protocol"

#: error_type -> HTTP status (the REST view of the table).
HTTP_STATUS: dict[str, int] = {error_type: s.http for error_type, s in STATUS.items()}


def status_of(error_type: str) -> Status:
    """The row of `error_type`; an unknown type is an internal error."""
    return STATUS.get(error_type, STATUS["internal_error"])
