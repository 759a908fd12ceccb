"""Response models of the HTTP API and the JSON schemas of its request bodies (what /docs shows).

Request bodies are parsed by the adapters and the core's knob table, not by pydantic models, so
their schemas are generated from that table here and cannot drift from what the server accepts.
The v2 (Open Inference Protocol) shapes are in `service.http.v2.schemas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.core.knobs import BUDGET_FIELD_KNOBS, Knob

# ---------------------------------------------------------------------------------------------
# common
# ---------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="stable error_type (closed set, see service.core.errors)", examples=["invalid_image"])
    message: str = Field(examples=["not an image Pillow can decode (PNG, JPEG, WebP, GIF, BMP, TIFF...)"])


class ErrorResponse(BaseModel):
    """The error envelope of every route outside /v2 (v1, health, metrics, routing and validation errors)."""

    error: ErrorDetail


class OipErrorResponse(BaseModel):
    """The error body of the /v2 routes: the Open Inference Protocol's shape plus our error_type."""

    error: str = Field(description="human-readable message (the OIP `error` member)", examples=["unknown model 'x'"])
    error_type: str = Field(description="stable error_type (closed set, service.core.errors)", examples=["not_found"])


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid image (not an image, truncated, undecodable)"},
    413: {"model": ErrorResponse, "description": "body, image pixels or image count over the limit"},
    415: {"model": ErrorResponse, "description": "unsupported content type"},
    422: {"model": ErrorResponse, "description": "invalid field, budget or tensor"},
    429: {"model": ErrorResponse, "description": "over capacity; retry after the Retry-After header"},
    503: {"model": ErrorResponse, "description": "not ready (loading, warming up or shutting down)"},
    504: {
        "model": ErrorResponse,
        "description": "the server's request timeout passed (a client's deadline_ms is "
        "answered by exit 1 with deadline_hit, never a 504)",
    },
}

#: The same statuses documented with the OIP error body, for the /v2 routes.
OIP_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {**spec, "model": OipErrorResponse} for status, spec in ERROR_RESPONSES.items()
}


class BudgetInfo(BaseModel):
    """A budget and the thresholds it resolved to, with what calibration expects of them."""

    budget: dict[str, Any] = Field(description="the budget as given", examples=[{"max_accuracy_drop": 0.01}])
    effective_budget: dict[str, Any] | None = Field(
        default=None,
        description="the budget whose thresholds are in force when the server moved the global budget on live "
        "traffic (live MAC budget, drift tightening, SLO mode); null: the thresholds are the budget's own. "
        "A request's own budget is never moved",
        examples=[None],
    )
    degraded: bool = Field(
        default=False,
        description="true: answered at a cheaper point than the global budget because of overload (SLO mode, "
        "never past BOOSTSERVE_MAX_ACCURACY_DROP_UNDER_LOAD)",
        examples=[False],
    )
    thresholds: list[float | None] = Field(
        description="per-exit thresholds in force (null = never exit there; last = 0.0 always answers)",
        examples=[[0.93, 0.81, 0.72, 0.0]],
    )
    policy: str | None = Field(default=None, examples=["optimal"])
    expected_accuracy: float | None = Field(default=None, description="held-out accuracy under these thresholds")
    expected_macs: float | None = Field(default=None, description="expected MACs per image")
    expected_macs_fraction: float | None = Field(default=None, description="expected_macs / full network MACs")
    exit_fractions: list[float] | None = Field(default=None, description="expected share of images per exit")
    calibrated: bool = Field(description="false: the artifact has no calibration data, expectations unknown")
    early_exit: bool = Field(description="false: every stage runs (A/B mode)")


class BudgetSourceInfo(BaseModel):
    """Where the global budget in force came from (service.core.budget_source)."""

    kind: Literal["settings", "file", "put"] = Field(
        description="settings: BOOSTSERVE_DEFAULT_BUDGET; file: BOOSTSERVE_BUDGET_FILE; put: a PUT /v1/budget "
        "on this replica only (no budget file, or it could not be written), lost on restart"
    )
    file: str | None = Field(default=None, description="the budget file, when one is configured")
    sha256: str | None = Field(default=None, description="sha256 of the file content in force (kind file)")
    updated_at: float | None = Field(default=None, description="unix time the budget in force last changed")
    error: str | None = Field(
        default=None, description="the last budget-file problem (the file was ignored) or failed write-through"
    )


class GlobalBudgetInfo(BudgetInfo):
    """The global budget (GET and PUT /v1/budget answer this same shape)."""

    source: BudgetSourceInfo


# ---------------------------------------------------------------------------------------------
# v1
# ---------------------------------------------------------------------------------------------


def budget_fields_schema() -> dict[str, Any]:
    """JSON schema of a budget object (one budget knob, with its policy), from the core's knob table."""
    return {
        "title": "BudgetFields",
        "type": "object",
        "additionalProperties": False,
        "description": "override of the global budget: at most one budget knob, plus policy where it applies",
        "properties": {k.name: k.json_schema() for k in BUDGET_FIELD_KNOBS},
    }


def classify_json_schema(request_knobs: Sequence[Knob]) -> dict[str, Any]:
    """JSON schema of the JSON form of POST /v1/classify (base64 images plus knobs)."""
    return {
        "title": "ClassifyJSON",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "description": "one image, base64 (standard or URL-safe, data: URI ok)"},
            "images": {"type": "array", "items": {"type": "string"}, "description": "several images, base64"},
            "budget": {"$ref": "#/components/schemas/BudgetFields"},
            **{k.name: k.json_schema() for k in request_knobs},
        },
        "examples": [
            {"image": "iVBORw0KGgoAAAANSUhEUgAA...", "top_k": 3, "budget": {"max_accuracy_drop": 0.01}},
            {"images": ["iVBORw0...", "iVBORw0..."], "budget": {"max_exit": 2}, "deadline_ms": 50},
        ],
    }


class TopK(BaseModel):
    label: int = Field(examples=[9])
    class_name: str = Field(examples=["Ankle boot"])
    probability: float = Field(examples=[0.97])


class ImageResult(BaseModel):
    label: int = Field(description="predicted class index", examples=[9])
    class_name: str = Field(examples=["Ankle boot"])
    confidence: float = Field(description="max softmax at the exit taken", examples=[0.97])
    top_k: list[TopK]
    exit: int = Field(description="1-based stage that answered", examples=[1])
    exits_total: int = Field(examples=[4])
    macs: int = Field(description="MACs spent on this image", examples=[1_908_506])
    macs_fraction: float = Field(description="macs / MACs of the full network", examples=[0.05004])
    deadline_hit: bool = Field(description="true: answered early because the deadline passed", examples=[False])


class ClassifyResponse(BaseModel):
    results: list[ImageResult]
    latency_ms: float = Field(description="server time for the whole request")
    model_name: str
    model_version: str
    budget: BudgetInfo


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------


class Status(BaseModel):
    status: str = Field(examples=["ok"])
