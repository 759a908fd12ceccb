"""Open Inference Protocol v2 (KServe v2 / Triton REST), JSON wire format: health, metadata, infer.

Tensors are decoded and encoded by `service.http.v2.codec`; request `parameters` carry the knobs of
the core's table (`budget_macs`, `max_accuracy_drop`, `max_exit`, `thresholds` as a list or
"0.9,0.8,never,0", `policy`, `early_exit`, `deadline_ms`), parsed by the core like every other
protocol's; names the protocol reserves are accepted and ignored, any other is a 422. Response
`parameters` echo what was used (scalars only, per spec).

Errors use the protocol's shape `{"error": "<message>"}` plus our `"error_type"` (see
service.http.errors; tritonclient needs `error` to be a string). Tensor problems
(unknown input, wrong datatype, shape/length mismatch, NaN/Inf) are 422 validation_error;
unknown model names are 404. The binary-data extension is not supported (JSON only).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import ValidationError

from boostserve import __version__
from service.core.classify import ClassifyRequest, ClassifyService
from service.core.errors import NotFoundError, NotReadyError, UnsupportedMediaTypeError, ValidationFailedError
from service.core.knobs import KNOBS
from service.http.deps import ServiceDep, service_of
from service.http.schemas import OIP_ERROR_RESPONSES, OipErrorResponse
from service.http.v2 import codec
from service.http.v2.schemas import (
    InferenceRequest,
    InferenceResponse,
    Liveness,
    MetadataTensor,
    ModelMetadata,
    ModelReadiness,
    Readiness,
    ServerMetadata,
)

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_V2_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": OipErrorResponse, "description": "unknown model name or version"},
    **OIP_ERROR_RESPONSES,
}
PARAMETERS = "parameters key"


NamePath = Annotated[str, Path(description="model name (GET /v2/models/{name} lists it)")]
VersionPath = Annotated[str, Path(description="model version (the manifest's content hash)")]


async def checked_model(service: ServiceDep, name: NamePath) -> ClassifyService:
    """404 unless `name` is the model being served."""
    if name != service.manifest.name:
        raise NotFoundError(f"unknown model {name!r}; this server serves {service.manifest.name!r}")
    return service


async def checked_model_version(service: ServiceDep, name: NamePath, version: VersionPath) -> ClassifyService:
    """404 unless `name` and `version` are the model being served."""
    await checked_model(service, name)
    if version != service.manifest.version:
        raise NotFoundError(
            f"model {name!r} has no version {version!r}; the served version is {service.manifest.version!r}"
        )
    return service


ModelDep = Annotated[ClassifyService, Depends(checked_model)]
VersionDep = Annotated[ClassifyService, Depends(checked_model_version)]


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
    service = service_of(request)
    if not service.serving:
        raise NotReadyError("not ready")
    return Readiness(ready=True)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="boostserve", version=__version__, extensions=[])


def _metadata(service: ClassifyService) -> ModelMetadata:
    m = service.manifest
    p = m.preprocessing
    return ModelMetadata(
        name=m.name,
        versions=[m.version],
        platform="onnxservice_onnx",
        inputs=[
            MetadataTensor(name=codec.FP32_INPUT, datatype="FP32", shape=[-1, p.channels, p.height, p.width]),
            MetadataTensor(name=codec.UINT8_INPUT, datatype="UINT8", shape=[-1, p.height, p.width, p.channels]),
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
async def model_metadata(service: ModelDep) -> ModelMetadata:
    return _metadata(service)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_V2_ERRORS,
    summary="Model metadata",
)
async def model_version_metadata(service: VersionDep) -> ModelMetadata:
    return _metadata(service)


async def _model_ready(service: ClassifyService) -> ModelReadiness:
    if not service.serving:
        raise NotReadyError(f"model {service.manifest.name!r} is not ready")
    return ModelReadiness(name=service.manifest.name, ready=True)


@router.get("/models/{name}/ready", response_model=ModelReadiness, responses=_V2_ERRORS, summary="Model ready")
async def model_ready(service: ModelDep) -> ModelReadiness:
    return await _model_ready(service)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReadiness,
    responses=_V2_ERRORS,
    summary="Model ready",
)
async def model_version_ready(service: VersionDep) -> ModelReadiness:
    return await _model_ready(service)


# ---------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------


_INFER_DOC = dict(
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    responses=_V2_ERRORS,
    summary="Inference (Open Inference Protocol v2, JSON)",
    description="One input: `input` FP32 [B,C,H,W] preprocessed, or `image` UINT8 [B,H,W,C] raw pixels. "
    f"Knobs go in request `parameters`: {', '.join(f'`{k.name}`' for k in KNOBS)} (other names are a 422, "
    "except those the protocol reserves). Outputs: probabilities, label, exit (1-based), macs.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
        }
    },
)


async def _infer(request: Request, service: ClassifyService) -> InferenceResponse:
    start = time.perf_counter()
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if request.headers.get("inference-header-content-length") is not None:
        raise UnsupportedMediaTypeError(codec.BINARY_UNSUPPORTED)
    if kind not in ("application/json", "") and not kind.endswith("+json"):
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {kind!r}: the v2 API takes application/json")
    try:
        payload = InferenceRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
        msg = errors[0]["msg"] if errors else "invalid"
        raise ValidationFailedError(f"invalid inference request: {loc or 'body'}: {msg}") from exc
    wanted = codec.requested_outputs(payload)
    options = codec.knob_parameters(payload.parameters)
    result = await service.classify(ClassifyRequest(codec.input_tensor(payload), options, PARAMETERS))
    answers, resolved = result.answers, result.budget
    info = service.budget_info(resolved)
    return InferenceResponse(
        model_name=service.manifest.name,
        model_version=service.manifest.version,
        id=payload.id,
        parameters={
            "exits_total": service.manifest.num_stages,
            "early_exit": resolved.early_exit,
            "deadline_hits": sum(1 for a in answers if a.deadline_hit),
            "latency_ms": round((time.perf_counter() - start) * 1000.0, 3),
            "budget": json.dumps(info["budget"], separators=(",", ":")),
            "thresholds": json.dumps(info["thresholds"], separators=(",", ":")),
        },
        outputs=codec.output_tensors(answers, len(service.manifest.classes), wanted),
    )


@router.post("/models/{name}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer(request: Request, service: ModelDep) -> InferenceResponse:
    return await _infer(request, service)


@router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer_version(request: Request, service: VersionDep) -> InferenceResponse:
    return await _infer(request, service)
