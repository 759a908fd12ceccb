"""Transport-free domain errors, each with a stable `error_type`.

The engine, scheduler, preprocessing and budget code raise these; one table in the HTTP layer
maps `error_type` to a status code, and the same closed set labels the error metric.
"""

from __future__ import annotations

import math
from typing import ClassVar


class BoostServeError(Exception):
    error_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImageError(BoostServeError):
    """The bytes are not a decodable image, or the image cannot be converted to the model's mode."""

    error_type = "invalid_image"


class ValidationFailedError(BoostServeError):
    """A request field is out of range or inconsistent (budgets, top_k, tensor shapes ...)."""

    error_type = "validation_error"


class InvalidBudgetError(ValidationFailedError):
    error_type = "validation_error"


class PayloadTooLargeError(BoostServeError):
    error_type = "payload_too_large"


class TooManyImagesError(BoostServeError):
    error_type = "too_many_images"


class UnsupportedMediaTypeError(BoostServeError):
    error_type = "unsupported_media_type"


class NotFoundError(BoostServeError):
    error_type = "not_found"


class UnauthorizedError(BoostServeError):
    """No or a wrong credential; `www_authenticate` is the challenge the client should answer."""

    error_type = "unauthorized"

    def __init__(self, message: str, www_authenticate: str = 'Bearer realm="boostserve"') -> None:
        super().__init__(message)
        self.www_authenticate = www_authenticate


class ForbiddenError(BoostServeError):
    error_type = "forbidden"


class OverCapacityError(BoostServeError):
    """The queues are full; the client should retry after `retry_after` seconds."""

    error_type = "over_capacity"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def retry_after_s(self) -> int:
        """`retry_after` as a Retry-After header (or gRPC metadata) carries it: whole seconds, at least 1."""
        return max(1, math.ceil(self.retry_after))


class NotReadyError(BoostServeError):
    """Models not loaded or warmed up yet, or the server is shutting down."""

    error_type = "not_ready"


class DeadlineExceededError(BoostServeError):
    """The server's safety net (request_timeout_s) fired, or the engine-only path's deadline passed before
    exit 1 ran; the scheduler answers a client's own deadline from exit 1 instead (anytime semantics)."""

    error_type = "deadline_exceeded"


class StageFailedError(BoostServeError):
    """An ONNX Runtime stage failed at run time; only the requests in that batch are affected."""

    error_type = "internal_error"


ERROR_TYPES: frozenset[str] = frozenset(
    {
        "invalid_image",
        "validation_error",
        "payload_too_large",
        "too_many_images",
        "unsupported_media_type",
        "not_found",
        "method_not_allowed",
        "unauthorized",
        "forbidden",
        "over_capacity",
        "not_ready",
        "deadline_exceeded",
        "headers_too_large",
        "request_timeout",
        "internal_error",
    }
)
