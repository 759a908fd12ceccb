"""Service settings: one pydantic-settings model, environment prefix `BOOSTSERVE_`.

Why a class and no module-level instance: settings are read once, by the CLI (`boostserve serve`)
or by whoever calls `create_app(settings)`, so tests can build several apps with different
settings in one process and importing `service.http.app` never touches the environment.

Lists accept a comma-separated string (`BOOSTSERVE_PROVIDERS=cuda,cpu`); the default budget is
JSON (`BOOSTSERVE_DEFAULT_BUDGET='{"max_accuracy_drop": 0.01}'`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.errors import ValidationFailedError
from service.core.knobs import BUDGET_KNOBS, POLICIES, Budget, parse_bool

#: The model shipped inside the package, both precisions (`make model` writes both): the fp32 export
#: and its `boostserve quantize` version (int8 stages where int8 measured faster).
EMBEDDED_FP32_MODEL_DIR = Path(__file__).resolve().parents[1] / "embedded_model"
EMBEDDED_INT8_MODEL_DIR = EMBEDDED_FP32_MODEL_DIR.with_name("embedded_model_int8")
#: The default artifact: the int8 version, which is as accurate or more than fp32 at equal measured
#: cost (the engine suite's "accuracy at equal cost", docs/benchmarks.md); fp32 stays the reference.
EMBEDDED_MODEL_DIR = EMBEDDED_INT8_MODEL_DIR

#: Short provider names accepted on the command line / in the environment -> ONNX Runtime names.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def usable_cpus() -> float:
    """CPUs this process may use: its affinity set, capped by a cgroup v2 CPU quota (containers)."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1.0, float(quota) / float(period)))
    except (OSError, ValueError):
        pass
    return cpus


#: Upper bound for intra-/inter-op threads. Why a fixed number and not the CPU count: a setting
#: must mean the same on every host it is deployed to (a config validated on a laptop must not be
#: refused on the node), and 256 is above any core count this service is scaled on per replica
#: while far below the ~32,000 threads (16.9 GB, never ready) that `intra_op_threads=100000` made.
MAX_THREADS = 256
#: Upper bound for `inline_batch_ms`: an inline batch holds the event loop (probes, deadlines, every
#: connection) for its whole run, and the liveness probe's timeout is a second.
MAX_INLINE_BATCH_MS = 100.0


def normalize_provider(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full ONNX Runtime names pass through unchanged."""
    cleaned = name.strip()
    return PROVIDER_ALIASES.get(cleaned.lower(), cleaned)


def describe_errors(exc: ValidationError) -> str:
    """A settings ValidationError as one line naming each variable: `BOOSTSERVE_X='v': reason; ...`.

    Why one line: `boostserve serve` prints it as its only output before exiting 2, and an
    orchestrator shows the last line of a crashed container's log.
    """
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = f"BOOSTSERVE_{field.upper()}" if field else "settings"
        shown = f"={error.get('input')!r}" if field else ""
        message = str(error["msg"]).removeprefix("Value error, ").replace("\n", " ")
        parts.append(f"{name}{shown}: {message}")
    return "; ".join(parts)


class Settings(BaseSettings):
    """Everything `boostserve serve` can be told; each field maps to `BOOSTSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix="BOOSTSERVE_",
        extra="ignore",
        validate_default=True,
        case_sensitive=False,
    )

    # -- model -----------------------------------------------------------------------------------
    artifacts_dir: Path = Field(
        default=EMBEDDED_MODEL_DIR,
        description="artifact directory (manifest.json + stage_XX.onnx + calibration.npz); "
        "default: the model embedded in the package",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in preference order, e.g. 'cuda,cpu'; "
        "empty = CUDA when ONNX Runtime offers it, else CPU",
    )
    intra_op_threads: int = Field(
        default=1,
        ge=0,
        le=MAX_THREADS,
        description=f"ORT intra-op threads per session (0 = ORT default: all cores; at most {MAX_THREADS})",
    )
    inter_op_threads: int = Field(
        default=1, ge=0, le=MAX_THREADS, description=f"ORT inter-op threads (0 = ORT default; at most {MAX_THREADS})"
    )
    stage_execution: Literal["auto", "thread", "loop"] = Field(
        default="auto",
        description="where stage batches run: 'thread' = one ORT worker thread beside the event loop, "
        "'loop' = on the event loop (no hand-off, but a batch holds every connection while it runs), "
        "'auto' = when the process may use a single CPU (affinity or cgroup quota), batches predicted "
        "to take at most BOOSTSERVE_INLINE_BATCH_MS on the loop and longer ones on the thread; else 'thread'",
    )
    inline_batch_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=MAX_INLINE_BATCH_MS,
        description="with stage_execution=auto on one CPU: the longest predicted stage batch (its stage's "
        "mean time per image so far x its images) run on the event loop instead of the worker thread; "
        f"0 = always the thread (at most {MAX_INLINE_BATCH_MS:g})",
    )

    # -- HTTP ------------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="port of the OIP v2 gRPC service (KServe GRPCInferenceService + gRPC health) on the same "
        "host; unset or empty = no gRPC port is opened",
    )

    # -- connections (uvicorn + service.http.connection) -------------------------------------------
    limit_concurrency: int = Field(
        default=1024,
        ge=1,
        le=65536,
        description="open connections (or running requests) beyond which a new request gets uvicorn's "
        "plain-text 503; 1..65536",
    )
    keep_alive_s: float = Field(
        default=5.0, ge=0.1, le=300.0, description="an idle keep-alive connection is closed after this (s)"
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="request line + headers larger than this -> 431 and the connection closed; 1 KiB..1 MiB",
    )
    header_timeout_s: float = Field(
        default=10.0,
        ge=0.1,
        le=300.0,
        description="a request head not complete this long after its first byte (or after the connection "
        "opened) -> 408 and closed (closed silently if nothing was sent)",
    )
    body_timeout_s: float = Field(
        default=30.0,
        ge=0.1,
        le=3600.0,
        description="no request body bytes for this long while the body is incomplete (slow or short body) "
        "-> 408 and closed",
    )
    backlog: int = Field(default=2048, ge=1, le=65535, description="listen() backlog of the server socket")

    # -- batching / admission ----------------------------------------------------------------------
    batching: bool = Field(default=True, description="batch images of concurrent requests per stage")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="how long stage 1 waits for more images before running a partial batch; 0 = run "
        "as soon as the worker is free (batches still form while it is busy)",
    )
    max_queue: int = Field(
        default=1024,
        ge=1,
        le=65536,
        description="images admitted and not yet answered; more -> 429 (1..65536)",
    )

    # -- input limits ------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="request body limit (413); 1 KiB..256 MiB (a body is held in memory while parsed)",
    )
    max_inflight_body_mb: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="request-body bytes all requests in progress may hold together (MiB); over it a body "
        "still arriving is refused (429) unless it is the only one (1..65536)",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        le=1 << 31,
        description="decoded width*height limit, checked from the header (413); at least the model's own "
        "input (height*width, checked at start), at most 2**31",
    )
    max_images_per_request: int = Field(default=64, ge=1, le=4096, description="more images -> 413")
    max_decode_mb: int = Field(
        default=256,
        ge=16,
        le=65536,
        description="memory one image's decode may need, estimated from its header (width, height, mode, "
        "format) before decoding -> 413 above; each decode worker's data segment may grow by this + 128 MiB",
    )

    # -- decode workers ----------------------------------------------------------------------------
    decode_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="processes that decode every image except small plain PNGs (started with the first "
        "such image); a decode over its time limit kills and replaces its worker",
    )
    decode_timeout_s: float = Field(
        default=2.0,
        ge=0.05,
        le=60.0,
        description='wall-clock limit for one image\'s decode -> 400 "image too expensive to decode"; a '
        "request's deadline_ms (422) or request_timeout_s (504) applies when sooner, and bounds its wait for a "
        "worker",
    )
    decode_queue: int = Field(
        default=64,
        ge=1,
        le=65536,
        description="images that may wait for a decode worker; more -> 429",
    )

    # -- budget ------------------------------------------------------------------------------------
    default_budget: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=lambda: {"max_accuracy_drop": 0.01},
        description=f"global budget, JSON: exactly one of {', '.join(k.name for k in BUDGET_KNOBS)} "
        '(and optionally "policy")',
    )
    default_policy: str | None = Field(
        default=None,
        description="policy for the default budget (default_budget) when it takes one and names none; "
        "request and PUT budgets without a policy get their knob's default (budget_macs: reference, "
        "max_accuracy_drop: optimal)",
    )
    early_exit: bool = Field(default=True, description="false: every request runs every stage (A/B)")
    fast_path: bool = Field(
        default=True,
        description="serve raw-image and multipart POST /v1/classify without FastAPI routing (same answers, "
        "less CPU; false: every request goes through FastAPI, for A/B)",
    )
    gc_freeze: bool = Field(
        default=True,
        description="move everything alive after start-up out of the garbage collector's reach "
        "(gc.freeze): full collections then scan request garbage only (see service.http.app)",
    )
    budget_file: Path | None = Field(
        default=None,
        description="JSON file holding the global budget (a PUT /v1/budget body), e.g. a mounted ConfigMap: "
        "loaded at start, re-read when it changes (a bad file is logged and ignored), PUT writes through "
        "to it; unset or empty = the budget is default_budget and PUTs are per-replica",
    )
    budget_file_poll_s: float = Field(
        default=2.0, ge=0.1, le=60.0, description="how often the budget file is checked for changes (s)"
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token for PUT /v1/budget; unset or empty -> the endpoint answers 403",
    )

    # -- live control of the global budget (service.core.live, docs/policies.md) -------------------
    live_budget: bool = Field(
        default=True,
        description="with a global budget_macs, move its thresholds along the calibrated frontier so the live "
        "MACs per image stay at the budget when the image mix drifts (requests with their own budget are never "
        "moved)",
    )
    live_budget_window: int = Field(
        default=2000,
        ge=100,
        le=1_000_000,
        description="images in the live MAC average (EWMA 1/alpha; 100..1000000): shorter follows a drift sooner "
        "and moves the thresholds on sampling noise more",
    )
    latency_target_ms: float | None = Field(
        default=None,
        gt=0.0,
        le=60_000.0,
        description="SLO mode: the latency target of admitted requests (ms, (0, 60000]); under overload requests "
        "on the global budget move to cheaper points, never past max_accuracy_drop_under_load, and only beyond "
        "the cheapest allowed point is a request refused (429); unset or empty = off",
    )
    max_accuracy_drop_under_load: float = Field(
        default=0.03,
        gt=0.0,
        le=0.5,
        description="SLO mode's floor: the cheapest point served under overload is max_accuracy_drop=this "
        "(a guaranteed drop, (0, 0.5])",
    )
    shadow_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="share of early-exited images on the global budget that also run the remaining stages when "
        "the worker is idle, after their answer is sent (the label-free accuracy monitor and drift tightening of "
        "a global max_accuracy_drop, docs/monitoring.md); [0, 1], 0 = off",
    )

    # -- operations ------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["text", "json"] = "text"
    request_timeout_s: float = Field(
        default=30.0, ge=0.01, le=3600.0, description="per-request limit -> 504 (0.01..3600 s)"
    )
    shutdown_grace_s: float = Field(default=10.0, ge=0.0, le=600.0, description="drain time on SIGTERM (0..600 s)")

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                try:
                    value = json.loads(stripped)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"providers: invalid JSON list: {exc}") from exc
            else:
                value = [part for part in stripped.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for name in value:
            full = normalize_provider(name)
            if not full.endswith("ExecutionProvider"):
                raise ValueError(
                    f"unknown execution provider {name!r}: use one of {sorted(PROVIDER_ALIASES)} "
                    "or a full ONNX Runtime name such as 'CUDAExecutionProvider'"
                )
            if full not in out:
                out.append(full)
        return out

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: Any) -> Any:
        """An empty or blank token (e.g. `BOOSTSERVE_ADMIN_TOKEN=` from a template) must not be a valid key."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(raw, str) and not raw.strip() else value

    @field_validator("grpc_port", "budget_file", "latency_target_ms", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`BOOSTSERVE_GRPC_PORT=`, `BOOSTSERVE_BUDGET_FILE=` or `BOOSTSERVE_LATENCY_TARGET_MS=` (a
        template's empty value) means off."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("default_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"default_budget must be JSON such as '{{\"max_accuracy_drop\": 0.01}}': {exc}"
                ) from exc
        return value

    @field_validator("early_exit", mode="before")
    @classmethod
    def _knob_bool(cls, value: Any) -> Any:
        """early_exit is a knob: spelled as the knob table spells booleans (not pydantic's yes/on/t)."""
        try:
            return parse_bool(value, "early_exit")
        except ValidationFailedError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("default_policy")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None and value not in POLICIES:
            raise ValueError(f"default_policy must be one of {', '.join(POLICIES)}, got {value!r}")
        return value

    @field_validator("default_budget")
    @classmethod
    def _valid_budget(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Budget.parse(value)
        except ValidationFailedError as exc:
            raise ValueError(f"default_budget: {exc.message}") from exc
        return value

    def check_model_input(self, height: int, width: int) -> None:
        """Refuse a pixel limit below the model's own input (height x width).

        Why at start and not in the field: the bound depends on the artifact, known only once its
        manifest is loaded; below it even an image already at the model's resolution is a 413, so
        the server would start and refuse everything.
        """
        if self.max_image_pixels < height * width:
            raise ValueError(
                f"BOOSTSERVE_MAX_IMAGE_PIXELS={self.max_image_pixels} is below the model's input "
                f"{height}x{width} = {height * width} pixels: every image would be refused"
            )

    def runs_stages_on_loop(self) -> bool:
        """Every stage batch on the event loop (no worker thread): `stage_execution=loop`."""
        return self.stage_execution == "loop"

    def inline_batch_limit_ms(self) -> float:
        """The resolved `stage_execution` for a worker-thread server: the longest predicted batch
        run on the loop (0: none). Only `auto` on one CPU inlines: with a second core the thread
        runs ORT beside the loop's HTTP work, which an inline batch would stop."""
        if self.stage_execution == "auto" and usable_cpus() <= 1:
            return self.inline_batch_ms
        return 0.0

    def budget(self) -> Budget:
        """The default budget, with the default policy where the budget takes one and names none."""
        return Budget.parse(self.default_budget, default_policy=self.default_policy)
