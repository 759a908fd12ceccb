"""`create_app(settings) -> FastAPI`: the app factory and its lifespan.

Why a factory and no module-level app: settings are read once by the caller (CLI or test), so
importing this module has no side effects (no env, no model, no torch), and tests can build
several apps with different settings and registries in one process.

Lifespan, in order: load the manifest (every file's sha256 verified) -> calibration (optional)
-> BudgetResolver and the global budget -> Engine -> Scheduler.start() -> warm-up -> ready.
Without calibration data, budget_macs / max_accuracy_drop requests get a 422, and a default
budget that needs calibration falls back to `max_exit = last stage` (every image answered by the
full network: no accuracy loss, no early exit) with a warning in the log.
On shutdown readiness goes false first (probes and new requests see 503), then the scheduler
drains: every admitted request is answered, within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from boostserve import __version__
from service.core.artifact import ArtifactError, CalibrationData, Manifest, load_calibration, load_manifest
from service.core.budget import BudgetResolver
from service.core.budget_source import BudgetSource, watching
from service.core.classify import ClassifyService, ResolvedBudget
from service.core.decode_pool import DecodePool, DecodePoolConfig
from service.core.engine import Engine
from service.core.errors import ValidationFailedError
from service.core.knobs import Budget
from service.core.live.control import LiveSettings, running
from service.core.loop_lag import LoopLagMonitor
from service.core.preprocess import Limits, Preprocessor
from service.core.scheduler import Scheduler
from service.core.shadow import DriftControl, ShadowMonitor
from service.http import docs, middleware, probes
from service.http.errors import install_error_handlers
from service.http.metrics import Metrics
from service.http.schemas import budget_fields_schema, classify_json_schema
from service.http.settings import Settings
from service.http.v1 import request as v1_request
from service.http.v1 import routes as v1_routes
from service.http.v1.fast_path import CLASSIFY_PATH, ClassifyFastPath
from service.http.v2 import routes as v2_routes
from service.http.v2.schemas import InferenceRequest

log = logging.getLogger("boostserve.app")

#: Another server living as long as the app, on the same loop and the same ClassifyService (the
#: gRPC transport; `boostserve serve` passes it, the HTTP layer never imports it). Entered once the
#: service exists and before readiness; left at shutdown after readiness went false and before the
#: scheduler drains, so its calls in flight are still answered.
Companion = Callable[[ClassifyService, Metrics], AbstractAsyncContextManager[Any]]

DESCRIPTION = """
Boosted early-exit image classification. Each image leaves the network at the first exit whose
confidence reaches the threshold of the budget in force, so easy images cost a fraction of the
full network.

* **v1**: `POST /v1/classify` (multipart, raw image body or JSON base64), `GET/PUT /v1/budget`.
* **v2**: the Open Inference Protocol (KServe v2 / Triton REST, JSON).
* **ops**: `/livez`, `/readyz`, `/metrics` (Prometheus).

Errors have one of two bodies: `{"error": {"type": ..., "message": ...}}` on every route outside
`/v2/`, and the Open Inference Protocol's `{"error": "<message>", "error_type": ...}` on `/v2/`
routes; the status code for an `error_type` is the same on both. Every response has an
`X-Request-ID` header.
"""

TAGS = [
    {"name": "v1", "description": "classification and budget"},
    {"name": "v2 (Open Inference Protocol)", "description": "KServe v2 / Triton REST compatible"},
    {"name": "ops", "description": "probes and metrics"},
]


def _default_budget(settings: Settings, manifest: Manifest, resolver: BudgetResolver) -> Budget:
    budget = settings.budget()
    if budget.needs_calibration and not resolver.calibrated:
        log.warning(
            "the artifact has no calibration data, so the default budget %s cannot be resolved; "
            "falling back to max_exit=%d (every image answered by the last stage)",
            budget.describe(),
            manifest.num_stages,
        )
        budget = Budget("max_exit", manifest.num_stages)
    try:
        resolver.resolve(budget)
    except ValidationFailedError as exc:
        raise ArtifactError(f"the default budget {budget.describe()} does not fit this model: {exc}") from exc
    return budget


def _load_calibration(settings: Settings, manifest: Manifest) -> CalibrationData | None:
    if manifest.calibration is None:
        log.warning(
            "artifact %s has no calibration data: budget_macs/max_accuracy_drop budgets are refused (422)",
            settings.artifacts_dir,
        )
        return None
    return load_calibration(settings.artifacts_dir, manifest)


#: What a decode worker's data segment may grow beyond max_decode_mb (the estimate's error, Pillow's
#: and numpy's own allocations) before allocations fail inside the decoder.
DECODE_MEMORY_MARGIN_MB = 128


def _startup(settings: Settings, metrics: Metrics) -> ClassifyService:
    """Everything blocking (file hashing, ORT session creation); runs in a worker thread."""
    manifest = load_manifest(settings.artifacts_dir, verify=True)
    resolver = BudgetResolver(manifest, _load_calibration(settings, manifest))
    resolver.warmup()  # the one-off threshold searches happen now, not in the first request
    budget = _default_budget(settings, manifest, resolver)
    engine = Engine(
        manifest,
        settings.artifacts_dir,
        providers=settings.providers or None,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )
    monitor = ShadowMonitor(manifest.num_stages, resolver.calibration, metrics)
    scheduler = Scheduler(
        engine,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_batch_wait_ms,
        max_queue=settings.max_queue,
        batching=settings.batching,
        observer=metrics,
        run_on_loop=settings.runs_stages_on_loop(),
        inline_max_ms=settings.inline_batch_limit_ms(),
        request_timeout_s=settings.request_timeout_s,
        shadow_fraction=settings.shadow_fraction,
        shadow_sink=monitor,
    )
    limits = Limits(max_image_pixels=settings.max_image_pixels, max_decode_bytes=settings.max_decode_mb << 20)
    pool = DecodePoolConfig(
        workers=settings.decode_workers,
        timeout_s=settings.decode_timeout_s,
        max_pending=settings.decode_queue,
        memory_cap_bytes=(settings.max_decode_mb + DECODE_MEMORY_MARGIN_MB) << 20,
    )
    service = ClassifyService(
        manifest=manifest,
        resolver=resolver,
        preprocessor=Preprocessor(manifest.preprocessing, limits, DecodePool(manifest.preprocessing, limits, pool)),
        scheduler=scheduler,
        global_budget=ResolvedBudget(budget, resolver.resolve(budget), settings.early_exit),
        max_images_per_request=settings.max_images_per_request,
        observer=metrics,
    )
    if settings.shadow_fraction > 0.0:  # the monitor follows the live point; it tightens a max_accuracy_drop
        service.drift = DriftControl(service.live, resolver, monitor)
    return service


def _freeze_startup_objects() -> None:
    """gc.freeze() everything alive once the model is loaded and warm.

    Why: the start-up objects (imported modules, FastAPI, pydantic schemas, the engine; hundreds of
    thousands) never become garbage, yet every full (generation-2) collection walks them. Under load
    those collections come every second or two, because request objects that live across a couple of
    young collections are promoted, and each one stopped the event loop for tens of milliseconds:
    that stall was the p99 latency at 64 clients (docs/benchmarks.md). Frozen objects are skipped by
    the collector (they are still freed normally by reference counting), so a full collection only
    walks what requests left behind.
    """
    gc.collect()
    gc.freeze()
    log.info("gc: %d start-up objects frozen out of the collector's reach", gc.get_freeze_count())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    try:
        service = await anyio.to_thread.run_sync(_startup, settings, metrics)
    except ArtifactError as exc:
        # Kept for `boostserve serve`, which turns it into exit code 2 and a one-line message.
        app.state.startup_error = exc
        log.error("cannot serve %s: %s", settings.artifacts_dir, exc)
        raise
    scheduler = service.scheduler
    engine = scheduler.engine
    await anyio.to_thread.run_sync(engine.warmup, settings.max_batch_size)
    await scheduler.start()
    manifest = service.manifest
    metrics.bind_model(
        name=manifest.name,
        version=manifest.version,
        cumulative_macs=manifest.cumulative_macs,
        providers=list(engine.providers),
        exit_rule=manifest.exit_rule.confidence,
    )
    metrics.bind_live_gauges(queue_depths=scheduler.queue_depths, inflight=lambda: service.inflight)
    metrics.bind_decode_pool(service.preprocessor.pool)
    service.publish_budget()
    app.state.service = service
    companions = AsyncExitStack()
    try:
        for companion in app.state.companions:
            await companions.enter_async_context(companion(service, metrics))
    except BaseException:
        await companions.aclose()
        await scheduler.stop(drain=False, timeout=0.0)
        raise
    if settings.gc_freeze:
        _freeze_startup_objects()
    lag_monitor = asyncio.create_task(LoopLagMonitor(metrics.observe_loop_lag).run(), name="loop-lag")
    service.ready = True
    metrics.set_ready(True)
    log.info(
        "ready: model %s version %s, %d stages, providers %s, stage batches run %s, default budget %s, early_exit=%s",
        manifest.name,
        manifest.version,
        manifest.num_stages,
        engine.providers,
        scheduler.execution_summary(),
        service.global_budget.budget.describe(),
        service.global_budget.early_exit,
    )
    try:
        yield
    finally:
        service.begin_shutdown()
        metrics.set_ready(False)
        lag_monitor.cancel()
        await companions.aclose()
        log.info("shutting down: draining the scheduler (up to %.1f s)", settings.shutdown_grace_s)
        await scheduler.stop(drain=True, timeout=settings.shutdown_grace_s)
        if service.preprocessor.pool is not None:
            service.preprocessor.pool.close()  # a decode still running is not worth waiting for
        log.info("shutdown complete")


def _install_openapi(app: FastAPI) -> None:
    """Add the request-body schemas of the routes that read their body themselves.

    /v1/classify and /v2/.../infer parse their body by hand (content negotiation, body limit ->
    413, the core's knob table), so FastAPI does not see their request models; their
    `openapi_extra` refers to these components, which we register here so /docs shows them.
    """
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        js = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in js.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["InferenceRequest"] = js
        components["BudgetFields"] = budget_fields_schema()
        request_knobs = [v1_request.knob(name) for name in v1_request.JSON_KNOBS]
        components["ClassifyJSON"] = classify_json_schema(request_knobs)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class BoostServeApp(FastAPI):
    """FastAPI with a front door for the hot path (see service.http.v1.fast_path for why).

    Raw-image and multipart `POST /v1/classify` requests go to `front` (RequestMiddleware around the fast-path
    handler); everything else, and every request when the fast path is off, is FastAPI's.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if front is not None and ClassifyFastPath.takes(scope):
            scope["app"] = self
            if self.root_path:
                scope["root_path"] = self.root_path
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _budget_file_companion(app: FastAPI, settings: Settings) -> Companion:
    """The budget file watcher (service.core.budget_source), published as app.state.budget_file."""
    path = settings.budget_file
    assert path is not None

    @asynccontextmanager
    async def companion(service: ClassifyService, metrics: Metrics) -> AsyncIterator[None]:
        source = app.state.budget_source
        async with watching(path, source, settings.budget_file_poll_s, service) as watcher:
            app.state.budget_file = watcher
            yield
        app.state.budget_file = None

    return companion


def _live_companion(app: FastAPI, settings: Settings) -> Companion:
    """The live controllers of the global budget (service.core.live), published as app.state.live."""
    live = LiveSettings(
        live_budget=settings.live_budget,
        window=settings.live_budget_window,
        latency_target_s=None if settings.latency_target_ms is None else settings.latency_target_ms / 1000.0,
        max_drop_under_load=settings.max_accuracy_drop_under_load,
    )

    @asynccontextmanager
    async def companion(service: ClassifyService, metrics: Metrics) -> AsyncIterator[None]:
        async with running(service, live, metrics) as control:
            app.state.live = control
            yield
        app.state.live = None

    return companion


def create_app(
    settings: Settings | None = None, *, metrics: Metrics | None = None, companions: Sequence[Companion] = ()
) -> BoostServeApp:
    """Build the app; nothing is loaded until the lifespan starts (TestClient / uvicorn)."""
    settings = settings if settings is not None else Settings()
    metrics = metrics if metrics is not None else Metrics()
    app = BoostServeApp(
        title="boostserve",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,  # served offline by service.http.docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.startup_error = None
    app.state.budget_source = BudgetSource()
    app.state.budget_file = None
    app.state.live = None
    if settings.live_budget or settings.latency_target_ms is not None:  # after the file: it sets the budget
        companions = (_live_companion(app, settings), *companions)
    if settings.budget_file is not None:  # first: the file's budget is in force before gRPC or readiness
        companions = (_budget_file_companion(app, settings), *companions)
    app.state.companions = tuple(companions)
    install_error_handlers(app)
    body_budget = middleware.BodyBudget(settings.max_inflight_body_mb << 20)
    middleware.install(app, metrics=metrics, max_body_bytes=settings.max_body_bytes, body_budget=body_budget)
    app.include_router(v1_routes.router, tags=["v1"])
    app.include_router(v2_routes.router)
    app.include_router(probes.router)
    docs.install(app)
    if settings.fast_path:
        route = next(r for r in v1_routes.router.routes if getattr(r, "path", None) == CLASSIFY_PATH)
        fast_path = ClassifyFastPath(route)
        app.front = middleware.RequestMiddleware(
            fast_path, metrics=metrics, max_body_bytes=settings.max_body_bytes, body_budget=body_budget
        )
    _install_openapi(app)
    return app


__all__ = ["create_app"]
