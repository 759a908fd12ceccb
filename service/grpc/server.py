"""The OIP v2 gRPC server: `inference.GRPCInferenceService` and the standard gRPC health service.

Runs on the same asyncio loop as the HTTP server (grpc.aio), calling the same core: tensors and
the inference flow are `service.core.tensors.infer` (what `POST /v2/models/{m}/infer` calls), so
there is no second copy of knobs -> budget -> preprocess -> scheduler. Per call:

  - errors: a domain error's gRPC code is the `grpc` column of the one table (`service.core.status`),
    the message is the same text REST answers; trailing metadata `boostserve-error-type` carries
    the error_type, and a full queue adds `retry-after` (seconds). A 500 never echoes the exception.
  - the gRPC deadline is honoured like `deadline_ms` (anytime answers: images without an exit when
    it passes are answered by exit 1 with `deadline_hits`), see `codec.knobs_with_deadline`.
  - message size: the body limit (`max_body_bytes`) bounds received and sent messages; gRPC answers
    a larger one with RESOURCE_EXHAUSTED before the handler runs.
  - metrics: `boostserve_requests_total` / `boostserve_request_duration_seconds` with
    protocol="grpc", route = the method path, method POST, status_class from the same table.

Health (`grpc.health.v1.Health`): "" and "inference.GRPCInferenceService" are SERVING exactly when
the HTTP readiness probe says ready (`ClassifyService.serving`), NOT_SERVING while starting or
draining; any other service name is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the health
protocol says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from boostserve import __version__
from service.core import tensors
from service.core.classify import ClassifyService
from service.core.errors import BoostServeError, NotFoundError, OverCapacityError
from service.core.status import STATUS
from service.grpc import codec
from service.grpc.proto import grpc_predict_v2_pb2 as pb

log = logging.getLogger("boostserve.grpc")

#: The protocol's service name: the path every client calls (`/inference.GRPCInferenceService/ModelInfer`).
SERVICE_NAME = "inference.GRPCInferenceService"
#: The model metadata's platform string (as on REST).
PLATFORM = "onnxservice_onnx"
#: How often a health Watch stream looks at readiness (a change is sent at most this late).
WATCH_POLL_S = 0.5
INTERNAL_MESSAGE = "internal server error; the server log has the details"
#: What a client that gave up (cancelled, or its deadline passed) is counted as (nginx's 499).
CANCELLED_STATUS = 499

Reply = TypeVar("Reply")


class RequestObserver(Protocol):
    """The metrics (service.http.metrics.Metrics implements it; the gRPC layer never imports it)."""

    def observe_request(self, route: str, method: str, status: int, seconds: float, protocol: str = "http") -> None: ...

    def count_error(self, error_type: str) -> None: ...


class InferenceServicer:
    """The six KServe methods; one instance per server."""

    def __init__(self, service: ClassifyService, observer: RequestObserver | None) -> None:
        self.service = service
        self.observer = observer

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """Run one RPC: errors -> gRPC status from the one table, and the request metrics."""
        start = time.perf_counter()
        status = 200
        try:
            return await work()
        except BoostServeError as exc:
            error_type = exc.error_type if exc.error_type in STATUS else "internal_error"
            row = STATUS[error_type]
            status = row.http
            message = exc.message
            if status == 500:
                log.error("internal error in %s: %s", method, exc.message, exc_info=exc)
                message = INTERNAL_MESSAGE
            await self._abort(context, error_type, row.grpc, message, exc)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            status = CANCELLED_STATUS
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            status = 500
            log.exception("unexpected error in %s", method)
            await self._abort(context, "internal_error", "INTERNAL", INTERNAL_MESSAGE, None)
            raise
        finally:
            if self.observer is not None:
                self.observer.observe_request(
                    f"/{SERVICE_NAME}/{method}", "POST", status, time.perf_counter() - start, "grpc"
                )

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        error_type: str,
        code: str,
        message: str,
        exc: BoostServeError | None,
    ) -> None:
        if self.observer is not None:
            self.observer.count_error(error_type)
        metadata: list[tuple[str, str]] = [("boostserve-error-type", error_type)]
        if isinstance(exc, OverCapacityError):
            metadata.append(("retry-after", str(exc.retry_after_s)))
        context.set_trailing_metadata(tuple(metadata))
        await context.abort(grpc.StatusCode[code], message)

    def _check_model(self, name: str, version: str) -> None:
        """NOT_FOUND unless `name` (and `version`, when given) are the model being served."""
        m = self.service.manifest
        if name != m.name:
            raise NotFoundError(f"unknown model {name!r}; this server serves {m.name!r}")
        if version and version != m.version:
            raise NotFoundError(f"model {name!r} has no version {version!r}; the served version is {m.version!r}")

    # -- the methods ----------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.service.serving)

        return await self._call("ServerReady", context, work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ModelReadyResponse:
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.service.serving)

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ServerMetadataResponse:
            # binary_tensor_data is a REST extension; gRPC carries raw tensors natively.
            return pb.ServerMetadataResponse(name="boostserve", version=__version__, extensions=[])

        return await self._call("ServerMetadata", context, work)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ModelMetadataResponse:
            self._check_model(request.name, request.version)
            m = self.service.manifest
            meta = pb.ModelMetadataResponse(name=m.name, versions=[m.version], platform=PLATFORM)
            for spec in tensors.input_specs(m):
                meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            for spec in tensors.output_specs(m):
                meta.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            return meta

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()

        async def work() -> pb.ModelInferResponse:
            self._check_model(request.model_name, request.model_version)
            wanted = codec.wanted_outputs(request)
            tensor = codec.input_tensor(request)
            knobs = codec.knobs_with_deadline(codec.parameters_of(request.parameters), context.time_remaining())
            answer = await tensors.infer(self.service, tensor, knobs, wanted, start)
            m = self.service.manifest
            return codec.infer_response(request, answer, m.name, m.version)

        return await self._call("ModelInfer", context, work)


#: method -> (request message, response message): the handler table of SERVICE_NAME.
_METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def inference_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The servicer under the protocol's service path (see the .proto for why not generated)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in _METHODS.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """gRPC health from the service's readiness, read live (no state to keep in sync)."""

    SERVICES = frozenset({"", SERVICE_NAME})

    def __init__(self, service: ClassifyService) -> None:
        self.service = service

    def _status(self) -> Any:
        serving = self.service.serving
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.service not in self.SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            status = self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@asynccontextmanager
async def serving(
    service: ClassifyService,
    observer: RequestObserver | None,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    grace_s: float,
) -> AsyncIterator[int]:
    """The gRPC server on host:port for the lifetime of the block; yields the bound port.

    `grace_s`: on exit, calls in flight get this long to finish (the HTTP side's shutdown grace).
    SO_REUSEPORT is off so a port already taken is an error at start, not a silently shared port.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((inference_handler(InferenceServicer(service, observer)),))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(service), server)
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC: cannot listen on {address}: {exc}") from exc
    if not bound:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC (OIP v2 + health) listening on %s", _address(host, bound))
    try:
        yield bound
    finally:
        await server.stop(grace_s)
        log.info("gRPC server stopped")
