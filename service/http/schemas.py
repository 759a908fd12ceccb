"""Pydantic request/response models of the HTTP API (what /docs shows).

v1 is our own JSON API; v2 follows the Open Inference Protocol (KServe v2 / Triton REST) JSON
exactly: field names, `id` echo, tensors as {name, shape, datatype, data}. Budget overrides are
validated by `service.core.budget.Budget` (exactly one of budget_macs, max_accuracy_drop, max_exit,
thresholds); the models here only carry them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    504: {"model": ErrorResponse, "description": "deadline passed before any exit answered"},
}

#: The same statuses documented with the OIP error body, for the /v2 routes.
OIP_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {**spec, "model": OipErrorResponse} for status, spec in ERROR_RESPONSES.items()
}


class BudgetFields(BaseModel):
    """A budget override: exactly one of the four, optionally with a policy."""

    model_config = ConfigDict(extra="forbid")

    budget_macs: float | None = Field(
        default=None, gt=0, description="average MACs per image the thresholds must fit", examples=[2.5e6]
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="accepted held-out accuracy loss vs. the last exit",
        examples=[0.01],
    )
    max_exit: int | None = Field(default=None, ge=1, description="1-based last exit allowed", examples=[2])
    thresholds: list[float | None] | None = Field(
        default=None,
        description="one confidence threshold per exit; null = never exit there; the last exit always answers",
        examples=[[0.9, 0.8, 0.0]],
    )
    policy: str | None = Field(default=None, description="threshold policy for budget_macs")

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class BudgetInfo(BaseModel):
    """A budget and the thresholds it resolved to, with what calibration expects of them."""

    budget: dict[str, Any] = Field(description="the budget as given", examples=[{"max_accuracy_drop": 0.01}])
    thresholds: list[float | None] = Field(
        description="per-exit thresholds in force (null = never exit there; last = 0.0 always answers)",
        examples=[[0.93, 0.81, 0.0]],
    )
    policy: str | None = Field(default=None, examples=["budgeted_batch"])
    expected_accuracy: float | None = Field(default=None, description="held-out accuracy under these thresholds")
    expected_macs: float | None = Field(default=None, description="expected MACs per image")
    expected_macs_fraction: float | None = Field(default=None, description="expected_macs / full network MACs")
    exit_fractions: list[float] | None = Field(default=None, description="expected share of images per exit")
    calibrated: bool = Field(description="false: the artifact has no calibration data, expectations unknown")
    early_exit: bool = Field(description="false: every stage runs (A/B mode)")


# ---------------------------------------------------------------------------------------------
# v1
# ---------------------------------------------------------------------------------------------


class ClassifyJSON(BaseModel):
    """JSON form of POST /v1/classify: base64 image(s) plus options."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "iVBORw0KGgoAAAANSUhEUgAA...", "top_k": 3, "budget": {"max_accuracy_drop": 0.01}},
                {"images": ["iVBORw0...", "iVBORw0..."], "budget": {"max_exit": 2}, "early_exit": True},
            ]
        },
    )

    image: str | None = Field(default=None, description="one image, base64 (standard or URL-safe, data: URI ok)")
    images: list[str] | None = Field(default=None, description="several images, base64")
    budget: BudgetFields | None = Field(default=None, description="override of the global budget")
    top_k: int = Field(default=5, ge=1, le=1000)
    early_exit: bool | None = Field(default=None, description="false: run every stage (A/B)")
    deadline_ms: float | None = Field(
        default=None, gt=0, le=600_000, description="answer with the best exit reached by then"
    )


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
    exits_total: int = Field(examples=[3])
    macs: int = Field(description="MACs spent on this image", examples=[1_200_000])
    macs_fraction: float = Field(description="macs / MACs of the full network", examples=[0.31])
    deadline_hit: bool = Field(description="true: answered early because the deadline passed")


class ClassifyResponse(BaseModel):
    results: list[ImageResult]
    latency_ms: float = Field(description="server time for the whole request")
    model_name: str
    model_version: str
    budget: BudgetInfo


# ---------------------------------------------------------------------------------------------
# v2: Open Inference Protocol
# ---------------------------------------------------------------------------------------------


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"max_exit": 2, "early_exit": True},
                    "inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [0] * 4}],
                    "outputs": [{"name": "label"}, {"name": "exit"}],
                }
            ]
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------


class Status(BaseModel):
    status: str = Field(examples=["ok"])
