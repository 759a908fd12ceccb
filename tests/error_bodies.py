"""The exact error body each route family must answer (see service.http.errors), for every test.

v1 and the other non-OIP routes: {"error": {"type": ..., "message": ...}}; the Open Inference
Protocol routes under /v2: {"error": "<message>", "error_type": ...} (tritonclient needs a string).
"""

from __future__ import annotations

import json
from typing import Any

from service.core.errors import ERROR_TYPES
from service.http.errors import is_oip_path as is_oip  # which routes speak OIP: the service's own rule


def error_problem(path: str, payload: Any) -> str | None:
    """None when `payload` is exactly the error body of `path`'s family; else what is wrong."""
    if not isinstance(payload, dict):
        return f"body is not a JSON object: {str(payload)[:160]}"
    if is_oip(path):
        if set(payload) != {"error", "error_type"}:
            return f"OIP error body must have exactly 'error' and 'error_type': {str(payload)[:160]}"
        error_type, message = payload["error_type"], payload["error"]
    else:
        inner = payload.get("error")
        if set(payload) != {"error"} or not isinstance(inner, dict) or set(inner) != {"type", "message"}:
            return f"envelope must be {{'error': {{'type', 'message'}}}}: {str(payload)[:160]}"
        error_type, message = inner["type"], inner["message"]
    if error_type not in ERROR_TYPES:
        return f"error type {error_type!r} not in ERROR_TYPES"
    if not isinstance(message, str) or not message:
        return "error message missing or not a string"
    return None


def error_fields(path: str, payload: Any) -> tuple[str, str]:
    """(error_type, message) of a well-formed error body; AssertionError otherwise."""
    problem = error_problem(path, payload)
    assert problem is None, problem
    if is_oip(path):
        return payload["error_type"], payload["error"]
    return payload["error"]["type"], payload["error"]["message"]


def error_type_of(path: str, body: bytes) -> str | None:
    """The error type in a raw body, or None when it is not a well-formed error body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if error_problem(path, payload) is not None:
        return None
    return error_fields(path, payload)[0]
