"""Open Inference Protocol v2 (KServe v2 / Triton REST), JSON wire format.

Inputs (the model metadata publishes both; a request sends exactly one):
  - `input`  FP32  [-1, C, H, W]  already preprocessed (normalised) NCHW, as the stage graphs take it
  - `image`  UINT8 [-1, H, W, C]  raw pixels (also [H, W, C]); converted and normalised here
`data` may be flat (row-major) or nested, as the spec allows.

Outputs: `probabilities` FP32 [B, classes], `label` INT64 [B], `exit` INT64 [B] (1-based stage),
`macs` INT64 [B]; `outputs` in the request filters them. Request `parameters` carry the budget
(`budget_macs`, `max_accuracy_drop`, `max_exit`, `thresholds` as list or "0.9,0.8,0", `policy`),
`early_exit` and `deadline_ms`; response `parameters` echo what was used (scalars only, per spec).

Errors use the protocol's shape `{"error": "<message>"}` plus our `"error_type"` (see
service.http.errors; tritonclient needs `error` to be a string). Tensor problems
(unknown input, wrong datatype, shape/length mismatch, NaN/Inf) are 422 validation_error;
unknown model names are 404. The binary-data extension is not supported (JSON only).
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from pydantic import ValidationError

from boostserve import __version__
from service.core.classify import Runtime
from service.core.errors import NotFoundError, NotReadyError, UnsupportedMediaTypeError, ValidationFailedError
from service.http.schemas import (
    OIP_ERROR_RESPONSES,
    InferenceRequest,
    InferenceResponse,
    InferOutput,
    Liveness,
    MetadataTensor,
    ModelMetadata,
    ModelReadiness,
    OipErrorResponse,
    Readiness,
    ServerMetadata,
)
from service.http.v1.routes import RuntimeDep, parse_thresholds, runtime_of

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

FP32_INPUT = "input"
UINT8_INPUT = "image"
OUTPUTS = ("probabilities", "label", "exit", "macs")
_DTYPES = {"FP32": np.float32, "UINT8": np.uint8}
_V2_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": OipErrorResponse, "description": "unknown model name or version"},
    **OIP_ERROR_RESPONSES,
}


NamePath = Annotated[str, Path(description="model name (GET /v2/models/{name} lists it)")]
VersionPath = Annotated[str, Path(description="model version (the manifest's content hash)")]


async def checked_model(runtime: RuntimeDep, name: NamePath) -> Runtime:
    """404 unless `name` is the model being served."""
    if name != runtime.manifest.name:
        raise NotFoundError(f"unknown model {name!r}; this server serves {runtime.manifest.name!r}")
    return runtime


async def checked_model_version(runtime: RuntimeDep, name: NamePath, version: VersionPath) -> Runtime:
    """404 unless `name` and `version` are the model being served."""
    await checked_model(runtime, name)
    if version != runtime.manifest.version:
        raise NotFoundError(
            f"model {name!r} has no version {version!r}; the served version is {runtime.manifest.version!r}"
        )
    return runtime


ModelDep = Annotated[Runtime, Depends(checked_model)]
VersionDep = Annotated[Runtime, Depends(checked_model_version)]


# ---------------------------------------------------------------------------------------------
# health and metadata
# ---------------------------------------------------------------------------------------------


@router.get("/health/live", response_model=Liveness, summary="Server live")
async def live() -> Liveness:
    return Liveness(live=True)


@router.get(
    "/health/ready", response_model=Readiness, responses={503: OIP_ERROR_RESPONSES[503]}, summary="Server ready"
)
async def ready(request: Request) -> Readiness:
    runtime = runtime_of(request)
    if not runtime.ready or runtime.closing:
        raise NotReadyError("not ready")
    return Readiness(ready=True)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="boostserve", version=__version__, extensions=[])


def _metadata(runtime: Runtime) -> ModelMetadata:
    m = runtime.manifest
    p = m.preprocessing
    return ModelMetadata(
        name=m.name,
        versions=[m.version],
        platform="onnxruntime_onnx",
        inputs=[
            MetadataTensor(name=FP32_INPUT, datatype="FP32", shape=[-1, p.channels, p.height, p.width]),
            MetadataTensor(name=UINT8_INPUT, datatype="UINT8", shape=[-1, p.height, p.width, p.channels]),
        ],
        outputs=[
            MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, len(m.classes)]),
            MetadataTensor(name="label", datatype="INT64", shape=[-1]),
            MetadataTensor(name="exit", datatype="INT64", shape=[-1]),
            MetadataTensor(name="macs", datatype="INT64", shape=[-1]),
        ],
        parameters={
            "exits_total": m.num_stages,
            "full_macs": m.full_macs,
            "classes": ",".join(m.classes),
            "inputs": "send exactly one of: input (FP32 NCHW, preprocessed) or image (UINT8 HWC raw pixels)",
        },
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=_V2_ERRORS, summary="Model metadata")
async def model_metadata(runtime: ModelDep) -> ModelMetadata:
    return _metadata(runtime)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_V2_ERRORS,
    summary="Model metadata",
)
async def model_version_metadata(runtime: VersionDep) -> ModelMetadata:
    return _metadata(runtime)


async def _model_ready(runtime: Runtime) -> ModelReadiness:
    if not runtime.ready or runtime.closing:
        raise NotReadyError(f"model {runtime.manifest.name!r} is not ready")
    return ModelReadiness(name=runtime.manifest.name, ready=True)


@router.get("/models/{name}/ready", response_model=ModelReadiness, responses=_V2_ERRORS, summary="Model ready")
async def model_ready(runtime: ModelDep) -> ModelReadiness:
    return await _model_ready(runtime)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReadiness,
    responses=_V2_ERRORS,
    summary="Model ready",
)
async def model_version_ready(runtime: VersionDep) -> ModelReadiness:
    return await _model_ready(runtime)


# ---------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------


def _tensor(runtime: Runtime, request: InferenceRequest) -> np.ndarray:
    """The one input tensor -> float32 (B, C, H, W), validated."""
    if len(request.inputs) != 1:
        raise ValidationFailedError(
            f"send exactly one input ({FP32_INPUT!r} FP32 NCHW or {UINT8_INPUT!r} UINT8 HWC), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    expected = {FP32_INPUT: "FP32", UINT8_INPUT: "UINT8"}
    if tensor.name not in expected:
        raise ValidationFailedError(
            f"unknown input {tensor.name!r}: use {FP32_INPUT!r} (FP32 NCHW) or {UINT8_INPUT!r} (UINT8 HWC)"
        )
    if tensor.datatype != expected[tensor.name]:
        raise ValidationFailedError(
            f"input {tensor.name!r} must have datatype {expected[tensor.name]}, got {tensor.datatype!r}"
        )
    if tensor.parameters and tensor.parameters.get("binary_data_size") is not None:
        raise UnsupportedMediaTypeError("the binary data extension is not supported; send JSON `data`")
    shape = tensor.shape
    if any(d < 0 for d in shape) or len(shape) not in (3, 4):
        raise ValidationFailedError(f"input {tensor.name!r} has an invalid shape {shape}")
    count = math.prod(shape)
    batch = shape[0] if len(shape) == 4 else 1
    runtime.check_count(batch)
    dtype = _DTYPES[tensor.datatype]
    try:
        if tensor.datatype == "UINT8":
            raw = np.asarray(tensor.data, dtype=np.int64)
        else:
            raw = np.asarray(tensor.data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        # OverflowError: UINT8 data holding integers beyond int64 or +-inf (JSON 1e400) -> 422, not 500.
        raise ValidationFailedError(
            f"input {tensor.name!r}: data must be numbers, flat or nested to the shape: {exc}"
        ) from exc
    if raw.size != count:
        raise ValidationFailedError(f"input {tensor.name!r}: shape {shape} needs {count} values, data has {raw.size}")
    if raw.ndim != 1 and list(raw.shape) != shape:
        raise ValidationFailedError(f"input {tensor.name!r}: nested data has shape {list(raw.shape)}, declared {shape}")
    array = raw.reshape(shape)
    if tensor.datatype == "UINT8":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValidationFailedError(f"input {tensor.name!r}: UINT8 values must be in 0..255")
        return runtime.preprocessor.from_uint8_hwc(array.astype(dtype))
    if not np.isfinite(array).all():
        raise ValidationFailedError(f"input {tensor.name!r} contains NaN or Inf")
    return runtime.preprocessor.check_chw_batch(array.astype(dtype))


def _options(parameters: dict[str, Any] | None) -> tuple[dict[str, Any], bool | None, float | None]:
    params = dict(parameters or {})
    budget: dict[str, Any] = {}
    for key in ("budget_macs", "max_accuracy_drop", "max_exit", "policy"):
        if params.get(key) is not None:
            budget[key] = params[key]
    raw_thresholds = params.get("thresholds")
    if isinstance(raw_thresholds, str):
        budget["thresholds"] = parse_thresholds(raw_thresholds)
    elif raw_thresholds is not None:
        budget["thresholds"] = raw_thresholds
    early_exit = params.get("early_exit")
    if isinstance(early_exit, str):
        lowered = early_exit.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValidationFailedError(f"parameters.early_exit must be a boolean, got {early_exit!r}")
        early_exit = lowered in ("true", "1")
    elif early_exit is not None and not isinstance(early_exit, bool):
        raise ValidationFailedError(f"parameters.early_exit must be a boolean, got {early_exit!r}")
    deadline = params.get("deadline_ms")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= 600_000:
            raise ValidationFailedError("parameters.deadline_ms must be a number in (0, 600000]")
        deadline = float(deadline)
    return budget, early_exit, deadline


_INFER_DOC = dict(
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    responses=_V2_ERRORS,
    summary="Inference (Open Inference Protocol v2, JSON)",
    description="One input: `input` FP32 [B,C,H,W] preprocessed, or `image` UINT8 [B,H,W,C] raw pixels. "
    "Budget (`budget_macs`, `max_accuracy_drop`, `max_exit`, `thresholds`), `early_exit` and "
    "`deadline_ms` go in request `parameters`. Outputs: probabilities, label, exit (1-based), macs.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
        }
    },
)


async def _infer(request: Request, runtime: Runtime) -> InferenceResponse:
    start = time.perf_counter()
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if request.headers.get("inference-header-content-length") is not None:
        raise UnsupportedMediaTypeError("the binary data extension is not supported; send JSON `data`")
    if kind not in ("application/json", "") and not kind.endswith("+json"):
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {kind!r}: the v2 API takes application/json")
    body = await request.body()
    try:
        payload = InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
        msg = errors[0]["msg"] if errors else "invalid"
        raise ValidationFailedError(f"invalid inference request: {loc or 'body'}: {msg}") from exc
    wanted = [o.name for o in payload.outputs] if payload.outputs else list(OUTPUTS)
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise ValidationFailedError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}")
    budget_fields, early_exit, deadline_ms = _options(payload.parameters)
    override = runtime.parse_budget(budget_fields)
    resolved = runtime.resolve(override, early_exit)
    images = _tensor(runtime, payload)
    answers = await runtime.classify(images, resolved, deadline_ms)
    n = len(answers)
    classes = len(runtime.manifest.classes)
    tensors = {
        "probabilities": InferOutput(
            name="probabilities",
            shape=[n, classes],
            datatype="FP32",
            data=np.stack([a.probabilities for a in answers]).reshape(-1).tolist() if n else [],
        ),
        "label": InferOutput(name="label", shape=[n], datatype="INT64", data=[a.label for a in answers]),
        "exit": InferOutput(name="exit", shape=[n], datatype="INT64", data=[a.exit for a in answers]),
        "macs": InferOutput(name="macs", shape=[n], datatype="INT64", data=[a.macs for a in answers]),
    }
    info = runtime.budget_info(resolved)
    return InferenceResponse(
        model_name=runtime.manifest.name,
        model_version=runtime.manifest.version,
        id=payload.id,
        parameters={
            "exits_total": runtime.manifest.num_stages,
            "early_exit": resolved.early_exit,
            "deadline_hits": sum(1 for a in answers if a.deadline_hit),
            "latency_ms": round((time.perf_counter() - start) * 1000.0, 3),
            "budget": json.dumps(info["budget"], separators=(",", ":")),
            "thresholds": json.dumps(info["thresholds"], separators=(",", ":")),
        },
        outputs=[tensors[name] for name in wanted],
    )


@router.post("/models/{name}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer(request: Request, runtime: ModelDep) -> InferenceResponse:
    return await _infer(request, runtime)


@router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer_version(request: Request, runtime: VersionDep) -> InferenceResponse:
    return await _infer(request, runtime)
