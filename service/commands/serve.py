"""`boostserve serve`: start the HTTP service with uvicorn (one worker) on the app factory.

Settings come from `BOOSTSERVE_*` environment variables; command-line flags override them. The
artifact is loaded and verified *before* uvicorn starts, so a missing or corrupted artifact fails
fast with a clear message and exit code 2 instead of a uvicorn traceback.

Why one worker: the scheduler batches images across requests inside one process and ONNX Runtime
already uses the cores; several workers would split batches and multiply model memory. Scale
with replicas instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when used: `boostserve --help` must not load the web stack
    import uvicorn

    from service.http.app import BoostServeApp
    from service.http.settings import Settings

EXIT_BAD_CONFIG = 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", metavar="DIR", help="artifact directory (default: the embedded model)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--grpc-port", type=int, help="OIP v2 gRPC port (default: none, no gRPC)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    parser.add_argument("--log-format", choices=["text", "json"])
    parser.add_argument("--providers", help="ONNX Runtime providers in order, e.g. 'cuda,cpu'")
    parser.add_argument("--intra-op-threads", type=int)
    parser.add_argument("--inter-op-threads", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-batch-wait-ms", type=float)
    parser.add_argument("--max-queue", type=int)
    batching = parser.add_mutually_exclusive_group()
    batching.add_argument("--batching", dest="batching", action="store_true", default=None)
    batching.add_argument("--no-batching", dest="batching", action="store_false")
    parser.add_argument("--default-budget", metavar="JSON", help="e.g. '{\"max_accuracy_drop\": 0.01}'")
    parser.add_argument("--default-policy", help="policy for budget_macs budgets (optimal, reference)")
    early = parser.add_mutually_exclusive_group()
    early.add_argument("--early-exit", dest="early_exit", action="store_true", default=None)
    early.add_argument(
        "--no-early-exit",
        dest="early_exit",
        action="store_false",
        help="run every stage for every image (A/B)",
    )
    parser.add_argument("--request-timeout-s", type=float)
    parser.add_argument("--shutdown-grace-s", type=float)
    parser.add_argument("--max-body-bytes", type=int)
    parser.add_argument("--max-image-pixels", type=int)
    parser.add_argument("--max-images-per-request", type=int)


_FLAG_TO_FIELD = {
    "artifacts": "artifacts_dir",
    "host": "host",
    "port": "port",
    "grpc_port": "grpc_port",
    "log_level": "log_level",
    "log_format": "log_format",
    "providers": "providers",
    "intra_op_threads": "intra_op_threads",
    "inter_op_threads": "inter_op_threads",
    "max_batch_size": "max_batch_size",
    "max_batch_wait_ms": "max_batch_wait_ms",
    "max_queue": "max_queue",
    "batching": "batching",
    "default_budget": "default_budget",
    "default_policy": "default_policy",
    "early_exit": "early_exit",
    "request_timeout_s": "request_timeout_s",
    "shutdown_grace_s": "shutdown_grace_s",
    "max_body_bytes": "max_body_bytes",
    "max_image_pixels": "max_image_pixels",
    "max_images_per_request": "max_images_per_request",
}


def build_settings(args: argparse.Namespace) -> Any:
    """Environment first, flags on top (only the flags that were given)."""
    from service.http.settings import Settings

    overrides = {
        field: getattr(args, flag) for flag, field in _FLAG_TO_FIELD.items() if getattr(args, flag, None) is not None
    }
    return Settings(**overrides)


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT flips readiness to false at once.

        Why: a load balancer should stop sending new traffic as soon as shutdown begins, while
        uvicorn (up to timeout_graceful_shutdown) and then the scheduler drain (shutdown_grace_s)
        finish what was already admitted.
        """

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                _start_exit_watchdog(float(self.config.timeout_graceful_shutdown or 0.0))
            app: Any = self.config.app
            service = getattr(getattr(app, "state", None), "service", None)
            if service is not None:
                service.begin_shutdown()
                app.state.metrics.set_ready(False)
            super().handle_exit(sig, frame)

    return Server


#: Time after the grace that the exit watchdog leaves the normal path (uvicorn's shutdown, the
#: scheduler drain, interpreter teardown) before it ends the process; within the documented
#: "exit within shutdown_grace_s + 1 s" with room for the flush.
WATCHDOG_SLACK_S = 0.5


def _start_exit_watchdog(grace_s: float) -> None:
    """After the first SIGTERM/SIGINT: end the process at grace + WATCHDOG_SLACK_S whatever still runs.

    Why os._exit: an image decode runs in a threadpool thread inside Pillow's C code, which
    nothing can interrupt, and those threads are non-daemon, so the interpreter's exit joins them
    (a progressive-JPEG scan bomb kept the process 22 s past a 1 s grace). By then every client
    has had its answer (uvicorn answers what is left with 503 at the grace), so the only thing a
    hard exit skips is teardown; logs and stdio are flushed first. Exit code 0, as for any drain
    that a SIGTERM started (see _graceful_exit). The timer thread is a daemon: when the normal
    path finishes first, the process exits without waiting for it.
    """
    import contextlib
    import logging
    import os
    import threading

    def fire() -> None:
        logging.getLogger("boostserve").warning(
            "shutdown grace (%.1f s) over: exiting now; %d thread(s) still running",
            grace_s,
            threading.active_count() - 1,
        )
        # A broken handler or closed stream must not keep the process alive.
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)

    timer = threading.Timer(grace_s + WATCHDOG_SLACK_S, fire)
    timer.daemon = True
    timer.name = "boostserve-exit-watchdog"
    timer.start()


def _companions(settings: Any) -> list[Any]:
    """The gRPC server beside HTTP when BOOSTSERVE_GRPC_PORT is set (grpc is imported only then)."""
    if settings.grpc_port is None:
        return []
    import functools

    from service.grpc.server import serving

    return [
        functools.partial(
            serving,
            host=settings.host,
            port=settings.grpc_port,
            max_message_bytes=settings.max_body_bytes,
            grace_s=settings.shutdown_grace_s,
        )
    ]


def _graceful_exit(signum: int, frame: object) -> None:
    """SIGTERM after uvicorn's graceful shutdown: nothing left to do."""


def uvicorn_config(settings: Settings, app: BoostServeApp, **overrides: Any) -> uvicorn.Config:
    """The uvicorn.Config `boostserve serve` runs `app` with (tests start the same one in process)."""
    import uvicorn

    from service.http.connection import bounded_protocol
    from service.http.early_refusal import EarlyRefusal, service_shed_check
    from service.http.middleware import request_ids

    # While SLO mode sheds, classify requests are refused at their head (service.http.early_refusal).
    early_refusal = None
    if settings.latency_target_ms is not None:
        early_refusal = EarlyRefusal(service_shed_check(app.state), app.state.metrics, request_ids())
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": 1,
        "log_level": settings.log_level,
        "access_log": False,
        # The float itself (uvicorn passes it to asyncio.wait_for): round() turned a grace under
        # 0.5 s into 0 -> None, i.e. no timeout at all, and moved 1.4 s to 1 s, 2.6 s to 3 s.
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "proxy_headers": False,
        "server_header": False,
        # Connection limits (issue 15): uvicorn's own, then what its httptools protocol lacks.
        "limit_concurrency": settings.limit_concurrency,
        "backlog": settings.backlog,
        "timeout_keep_alive": settings.keep_alive_s,  # typed int there; call_later takes the float
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "http": bounded_protocol(
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            early_refusal=early_refusal,
        ),
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.http.settings import describe_errors

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        print(f"boostserve serve: invalid settings: {describe_errors(exc)}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    from service.core.artifact import ArtifactError, load_manifest
    from service.http.logging_setup import configure_logging, uvicorn_log_config

    configure_logging(settings.log_level, settings.log_format)
    try:
        manifest = load_manifest(settings.artifacts_dir, verify=True)
    except ArtifactError as exc:
        print(f"boostserve serve: cannot serve {settings.artifacts_dir}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        settings.check_model_input(manifest.preprocessing.height, manifest.preprocessing.width)
    except ValueError as exc:
        print(f"boostserve serve: invalid settings: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    from service.http.app import create_app

    app = create_app(settings, companions=_companions(settings))
    config = uvicorn_config(settings, app, log_config=uvicorn_log_config())
    server = _server_class()(config)
    # uvicorn re-raises the signal it caught once shutdown is complete; a SIGTERM that led to a
    # clean drain is a normal exit (0), so the handler it restores and re-raises into does nothing.
    signal.signal(signal.SIGTERM, _graceful_exit)
    try:
        server.run()
    except ArtifactError as exc:  # pragma: no cover - checked above, kept for races with the files
        print(f"boostserve serve: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except SystemExit:
        if server.started:
            raise
        # uvicorn exits with its own code 3 when the lifespan startup fails; handled below.
    if not server.started:
        # Lifespan startup failed. An artifact uvicorn could not load (ONNX Runtime refusing a
        # stage file whose hash matches, unreadable calibration data, a default budget the model
        # cannot meet) is a configuration problem like a missing file: exit 2 and say why.
        error = getattr(app.state, "startup_error", None)
        if isinstance(error, ArtifactError):
            print(f"boostserve serve: {error}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return 3
    return 0
