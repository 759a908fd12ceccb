"""Operational routes: liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.core.classify import ClassifyService
from service.core.errors import NotReadyError
from service.http.metrics import CONTENT_TYPE
from service.http.schemas import ERROR_RESPONSES, Status

router = APIRouter(tags=["ops"])


@router.get("/livez", response_model=Status, summary="Liveness: the process answers HTTP")
async def livez() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: ERROR_RESPONSES[503]},
    summary="Readiness: models loaded and warmed up, not shutting down",
)
async def readyz(request: Request) -> Status:
    service: ClassifyService | None = getattr(request.app.state, "service", None)
    if service is None or not service.serving:
        raise NotReadyError("not ready: " + ("shutting down" if service and service.closing else "loading model"))
    return Status(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(content=request.app.state.metrics.render(), media_type=CONTENT_TYPE)
