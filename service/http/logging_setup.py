"""Logging for `boostserve serve`: plain text for people, one JSON object per line for collectors.

Why here and not uvicorn's log config: the same formatter must cover our loggers
(`boostserve.*`, access lines with request id, route template, status, duration) and uvicorn's,
so a log pipeline sees one format. Access lines never contain bodies, image data or query values:
the middleware logs the route template, not the URL.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", **extra fields, "exc_info"?} per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key != "color_message":
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(request_id_suffix)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_id_suffix = f" [request_id={request_id}]" if request_id else ""
        return super().format(record)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Route the root, uvicorn and boostserve loggers to stderr with one formatter (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    numeric = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_boostserve", False):
            root.removeHandler(existing)
    handler._boostserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(numeric)
    # Our access log replaces uvicorn's (which prints the raw URL, query string included).
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("boostserve").setLevel(numeric)


def uvicorn_log_config() -> dict[str, Any]:
    """Tell uvicorn not to install its own handlers (configure_logging already did)."""
    return {"version": 1, "disable_existing_loggers": False}
