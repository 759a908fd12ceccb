"""Open Inference Protocol v2 (KServe v2 / Triton REST): health, metadata, infer.

Tensors are decoded and encoded by `service.http.v2.codec` (JSON and the binary tensor data
extension, both directions) on the protocol-neutral rules of `service.core.tensors`; request
`parameters` carry the knobs of the core's table (`budget_macs`, `max_accuracy_drop`, `max_exit`,
`thresholds` as a list or "0.9,0.8,never,0", `policy`, `early_exit`, `deadline_ms`), parsed by the core like every other
protocol's; names the protocol reserves are accepted and ignored, any other is a 422. Response
`parameters` echo what was used (scalars only, per spec).

Errors use the protocol's shape `{"error": "<message>"}` plus our `"error_type"` (see
service.http.errors; tritonclient needs `error` to be a string). Tensor problems
(unknown input, wrong datatype, shape/length mismatch, NaN/Inf) are 422 validation_error;
unknown model names are 404.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from boostserve import __version__
from service.core import tensors
from service.core.classify import ClassifyService
from service.core.errors import NotFoundError, NotReadyError
from service.core.knobs import KNOBS
from service.http.deps import ServiceDep, service_of
from service.http.middleware import arrived_at
from service.http.schemas import OIP_ERROR_RESPONSES, OipErrorResponse
from service.http.v2 import codec
from service.http.v2.schemas import (
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
    return ServerMetadata(name="boostserve", version=__version__, extensions=[codec.EXTENSION])


#: The model metadata's platform string (ONNX Runtime behind our own scheduler).
PLATFORM = "onnxservice_onnx"


def _metadata(service: ClassifyService) -> ModelMetadata:
    m = service.manifest
    return ModelMetadata(
        name=m.name,
        versions=[m.version],
        platform=PLATFORM,
        inputs=[MetadataTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors.input_specs(m)],
        outputs=[MetadataTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors.output_specs(m)],
        parameters=tensors.model_parameters(m),
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
    summary="Inference (Open Inference Protocol v2, JSON or binary tensor data)",
    description="One input: `input` FP32 [B,C,H,W] preprocessed, or `image` UINT8 [B,H,W,C] raw pixels. "
    f"Knobs go in request `parameters`: {', '.join(f'`{k.name}`' for k in KNOBS)} (other names are a 422, "
    "except those the protocol reserves). Outputs: probabilities, label, exit (1-based), macs. "
    "Binary tensor data extension: with `Inference-Header-Content-Length: N` the first N body bytes are "
    "the JSON header and the rest the raw little-endian data of the inputs with `parameters.binary_data_size`; "
    "outputs with `parameters.binary_data` (or all, with request `parameters.binary_data_output`) come back "
    "the same way (`application/octet-stream`, the same response header).",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)


async def _infer(request: Request, service: ClassifyService) -> Response:
    start = time.perf_counter()
    headers = request.headers
    body = await request.body()
    service.check_capacity()  # refused before the JSON tensors are parsed
    parsed = codec.parse(
        body,
        headers.get("content-type"),
        headers.get(codec.HEADER_LENGTH),
        headers.get("content-encoding"),
    )
    payload = parsed.request
    plan = codec.output_plan(payload)
    answer = await tensors.infer(
        service,
        codec.input_tensor(parsed),
        tensors.knob_parameters(payload.parameters),
        [name for name, _ in plan],
        start,
        arrived_at(request.scope),
    )
    head: dict[str, Any] = {"model_name": service.manifest.name, "model_version": service.manifest.version}
    if payload.id is not None:
        head["id"] = payload.id
    head["parameters"] = answer.parameters
    body, response_headers = codec.render(head, answer.outputs, plan)
    return Response(body, headers=response_headers)


@router.post("/models/{name}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer(request: Request, service: ModelDep) -> Response:
    return await _infer(request, service)


@router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)  # type: ignore[arg-type]
async def infer_version(request: Request, service: VersionDep) -> Response:
    return await _infer(request, service)
