"""HTTP suite: closed-loop load against a real `boostserve serve` subprocess on 127.0.0.1.

Cells = (server configuration, mode, concurrency). Modes are per-request query parameters on
POST /v1/classify with a raw image/png body:
  all_stages   ?early_exit=false             every stage runs (the A/B reference)
  drop_0.005   ?max_accuracy_drop=0.005      early exit, ≤ 0.5 % held-out accuracy loss
  drop_0.01    ?max_accuracy_drop=0.01       early exit, ≤ 1 % held-out accuracy loss
and two with the same queries and images as multipart/form-data bodies, one `file` part each, laid
out as `curl -F file=@x.png` sends them (bench.loadgen.build_multipart_requests):
  multipart_all_stages, multipart_drop_0.01
Two more modes on `batching`, the same images and budget (drop_0.01) through the Open Inference
Protocol (bench.oip_load): `v2_binary` (POST /v2/models/{m}/infer with the binary tensor data
extension, UINT8 pixels in, binary outputs: what tritonclient.http sends by default) and `grpc`
(ModelInfer with raw_input_contents on BOOSTSERVE_GRPC_PORT).
Server configurations: `batching` (cross-request batching on, the default settings) and
`no_batching` (BOOSTSERVE_BATCHING=false and BOOSTSERVE_MAX_BATCH_SIZE=1: batch-1 serving), and five
ablations of the request path at drop_0.01 with 1 and 64 clients: `fastapi_path`
(BOOSTSERVE_FAST_PATH=false: raw-image classify through FastAPI routing), `thread_stages`
(BOOSTSERVE_STAGE_EXECUTION=thread: every stage batch on the ORT worker thread although the server
has one CPU), `loop_stages` (BOOSTSERVE_STAGE_EXECUTION=loop: every batch on the event loop, the
previous single-CPU default; served: batches predicted over BOOSTSERVE_INLINE_BATCH_MS on the
thread, the rest on the loop), `gc_unfrozen` (BOOSTSERVE_GC_FREEZE=false: start-up objects left to the garbage
collector) and `no_access_log` (BOOSTSERVE_LOG_LEVEL=warning: no access line per request, which is
what the access log costs), each differing from `batching` in that one setting. `batching` and
`no_batching` log at the shipped default level (info, an access line per request): what is
published is what a user's `boostserve serve` does. With `--compare-with DIR`, a
`compare` server (bench.compare) serves the same artifact with the code of another checkout and
the settings of `batching`, drop_0.01 at 1 and 64 clients: the same cells, old code vs new.

Every answer is checked: HTTP status, predicted label vs the Fashion-MNIST ground truth, and —
when the artifact's test calibration arrays are in the dataset's order — the exit against the one
the offline simulation predicts for that image under the same thresholds, plus the all-stages
correctness of the very same images (a paired accuracy loss, free of sampling noise).

CPU placement (2-core host): the servers are pinned to `server_cpus` and this process (the load
generator) to `client_cpus`; each cell records server and client CPU seconds per request, so
client cost and saturation are visible. All server configurations run at once (idle ones cost
nothing) and rounds are interleaved: every round visits each concurrency and, in rotating order,
each (server, mode) pair — an ABAB design for early exit vs all stages and batching vs none.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Artifact, Progress, simulate_exits
from bench.compare import COMPARE_SERVER, Checkout, CheckoutServerProcess, read_checkout, this_checkout
from bench.data import TestSet, encode_png
from bench.loadgen import LoadResult, build_multipart_requests, run_closed_loop, summarize_latency
from bench.oip_load import (
    GRPC_METHOD,
    V2_ROUTE,
    GrpcClients,
    build_v2_binary_requests,
    parse_grpc_answer,
    parse_v2_binary_answer,
)
from bench.server import ServerProcess, free_port, metric_sum
from bench.stats import safe_ratio
from bench.targets import TARGET_CONCURRENCY

MODE_QUERIES: dict[str, str] = {
    "all_stages": "early_exit=false",
    "drop_0.005": "max_accuracy_drop=0.005",
    "drop_0.01": "max_accuracy_drop=0.01",
    "multipart_all_stages": "early_exit=false",
    "multipart_drop_0.01": "max_accuracy_drop=0.01",
}
#: v1 modes whose bodies are multipart forms (one `file` part) instead of raw image/png.
MULTIPART_MODES = ("multipart_all_stages", "multipart_drop_0.01")
CLASSIFY_PATH = "/v1/classify"
#: Modes that speak the Open Inference Protocol instead of v1 (budget drop_0.01, bench.oip_load).
OIP_MODES = ("v2_binary", "grpc")
#: The request-metrics route of each mode's requests (v1 modes: CLASSIFY_PATH).
MODE_ROUTES = {"v2_binary": V2_ROUTE, "grpc": GRPC_METHOD}


@dataclass(frozen=True)
class ServerConfig:
    name: str
    env: dict[str, str]
    modes: tuple[str, ...]
    concurrencies: tuple[int, ...]
    code_dir: str | None = None  # another checkout whose code serves (bench.compare); None: this one


@dataclass(frozen=True)
class HttpSettings:
    servers: tuple[ServerConfig, ...]
    duration_s: float
    max_requests: int
    warmup_s: float
    rounds: int
    images: int
    client: str
    server_cpus: list[int] | None
    client_cpus: list[int] | None
    client_check: bool = False  # one extra cell with the other client kind, to report client costs
    profile: bool = False  # py-spy the batching server during extra drop_0.01 cells (1 and 64 clients)


def default_servers(
    *,
    quick: bool,
    threads: int,
    concurrencies: tuple[int, ...],
    max_batch_size: int | None = None,
    max_batch_wait_ms: float | None = None,
    compare_with: str | None = None,
) -> tuple[ServerConfig, ...]:
    """The issue's matrix; quick mode keeps only the cells the targets need.

    `compare_with`: a checkout of another commit, served as `compare` with exactly the env of
    `batching`, so that the code is the only difference between the two.
    """
    base = {  # the log level is the shipped default (info): the access log is part of what is measured
        "BOOSTSERVE_INTRA_OP_THREADS": str(threads),
        "BOOSTSERVE_INTER_OP_THREADS": "1",
        "BOOSTSERVE_MAX_QUEUE": "4096",
        "BOOSTSERVE_BATCHING": "true",
    }
    if max_batch_size is not None:
        base["BOOSTSERVE_MAX_BATCH_SIZE"] = str(max_batch_size)
    if max_batch_wait_ms is not None:
        base["BOOSTSERVE_MAX_BATCH_WAIT_MS"] = f"{max_batch_wait_ms:g}"
    no_batch = {**base, "BOOSTSERVE_BATCHING": "false", "BOOSTSERVE_MAX_BATCH_SIZE": "1"}
    ablation_clients = tuple(c for c in concurrencies if c in (1, 64)) or concurrencies[-1:]
    ablations = (
        ServerConfig("fastapi_path", {**base, "BOOSTSERVE_FAST_PATH": "false"}, ("drop_0.01",), ablation_clients),
        ServerConfig(
            "thread_stages", {**base, "BOOSTSERVE_STAGE_EXECUTION": "thread"}, ("drop_0.01",), ablation_clients
        ),
        ServerConfig("loop_stages", {**base, "BOOSTSERVE_STAGE_EXECUTION": "loop"}, ("drop_0.01",), ablation_clients),
        ServerConfig("gc_unfrozen", {**base, "BOOSTSERVE_GC_FREEZE": "false"}, ("drop_0.01",), ablation_clients),
        ServerConfig("no_access_log", {**base, "BOOSTSERVE_LOG_LEVEL": "warning"}, ("drop_0.01",), ablation_clients),
    )
    compare = (
        (ServerConfig(COMPARE_SERVER, base, ("drop_0.01",), ablation_clients, code_dir=compare_with),)
        if compare_with is not None
        else ()
    )
    if quick:
        return (
            ServerConfig(
                "batching",
                base,
                ("all_stages", "drop_0.005", "drop_0.01", *MULTIPART_MODES, *OIP_MODES),
                tuple(c for c in concurrencies if c in (1, 64)) or concurrencies,
            ),
            ServerConfig("no_batching", no_batch, ("drop_0.01",), (64,) if 64 in concurrencies else concurrencies[-1:]),
            *ablations,
            *compare,
        )
    return (
        ServerConfig(
            "batching", base, ("all_stages", "drop_0.005", "drop_0.01", *MULTIPART_MODES, *OIP_MODES), concurrencies
        ),
        ServerConfig("no_batching", no_batch, ("all_stages", "drop_0.01"), concurrencies),
        *ablations,
        *compare,
    )


@contextmanager
def pinned(cpus: list[int] | None) -> Iterator[None]:
    """Pin this process (the load generator) to `cpus` for the duration; restore afterwards."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _aligned_test_arrays(artifact: Artifact, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(confidence, correct) of the test calibration split when it is the dataset in file order."""
    if artifact.test is None or artifact.manifest.calibration is None:
        return None
    try:
        with np.load(artifact.path / artifact.manifest.calibration.file) as data:
            cal_labels = np.asarray(data["test_labels"])
    except (KeyError, OSError, ValueError):
        return None
    n = len(labels)
    if cal_labels.shape[0] < n or not np.array_equal(cal_labels[:n], labels):
        return None
    return artifact.test.confidence[:, :n], artifact.test.correct[:, :n]


def _served_thresholds(raw: Any, num_exits: int) -> list[float] | None:
    """JSON thresholds from an answer (null = +inf, last = always) back to floats."""
    if not isinstance(raw, list) or len(raw) != num_exits:
        return None
    values = [math.inf if v is None else float(v) for v in raw]
    values[-1] = -math.inf
    return values


def _cell_summary(
    *,
    server: str,
    mode: str,
    concurrency: int,
    round_index: int,
    result: LoadResult,
    labels: np.ndarray,
    artifact: Artifact,
    aligned: tuple[np.ndarray, np.ndarray] | None,
    metrics_before: dict[Any, float],
    metrics_after: dict[Any, float],
    server_cpu_s: float,
    route: str = CLASSIFY_PATH,
) -> dict[str, Any]:
    """One cell's numbers: throughput, latency, accuracy, MACs, exits and CPU costs."""
    num_exits = artifact.manifest.num_stages
    statuses = np.asarray(result.statuses, dtype=np.int64)
    ok = statuses == 200
    idx = np.asarray(result.image_index, dtype=np.int64)
    predicted = np.asarray(result.labels, dtype=np.int64)
    exits = np.asarray(result.exits, dtype=np.int64)
    n_ok = int(ok.sum())
    correct = ok & (predicted == labels[idx]) if idx.size else np.zeros(0, dtype=bool)
    cum = artifact.cumulative_macs
    exit_hist = np.bincount(exits[ok] - 1, minlength=num_exits)[:num_exits] if n_ok else np.zeros(num_exits)
    macs_from_exits = float((exit_hist * cum).sum() / n_ok) if n_ok else math.nan
    reported_macs = np.asarray(result.macs, dtype=np.float64)[ok]

    paired: dict[str, Any] = {"available": aligned is not None}
    if aligned is not None and n_ok:
        confidence, correct_arr = aligned
        all_stages_correct = correct_arr[-1, idx[ok]]
        paired["all_stages_accuracy_same_images"] = float(all_stages_correct.mean())
        paired["accuracy_loss_vs_all_stages"] = float(all_stages_correct.mean() - correct[ok].mean())
        thresholds = _served_thresholds(result.thresholds, num_exits)
        if MODE_QUERIES.get(mode) == MODE_QUERIES["all_stages"]:  # raw or multipart: every stage runs
            thresholds = [math.inf] * (num_exits - 1) + [-math.inf]
        if thresholds is not None:
            sim_conf = confidence[:, idx[ok]]
            sim = simulate_exits(sim_conf, correct_arr[:, idx[ok]], thresholds, cum)
            predicted_exits = np.full(idx[ok].size, num_exits - 1)
            open_ = np.ones(idx[ok].size, dtype=bool)
            t32 = np.asarray(thresholds, dtype=np.float32)
            for k in range(num_exits - 1):
                take = open_ & (sim_conf[k] >= t32[k])
                predicted_exits[take] = k
                open_ &= ~take
            paired["exit_agreement"] = float((predicted_exits + 1 == exits[ok]).mean())
            paired["offline_accuracy_same_images"] = sim["accuracy"]
            paired["offline_macs_same_images"] = sim["macs"]

    d_images = metric_sum(metrics_after, "boostserve_images_total") - metric_sum(
        metrics_before, "boostserve_images_total"
    )
    d_stage_s = metric_sum(metrics_after, "boostserve_stage_duration_seconds_sum") - metric_sum(
        metrics_before, "boostserve_stage_duration_seconds_sum"
    )
    d_batch_sum = metric_sum(metrics_after, "boostserve_stage_batch_size_sum") - metric_sum(
        metrics_before, "boostserve_stage_batch_size_sum"
    )
    d_batch_count = metric_sum(metrics_after, "boostserve_stage_batch_size_count") - metric_sum(
        metrics_before, "boostserve_stage_batch_size_count"
    )
    stage1_batches = metric_sum(metrics_after, "boostserve_stage_batch_size_count", stage="1") - metric_sum(
        metrics_before, "boostserve_stage_batch_size_count", stage="1"
    )
    stage1_items = metric_sum(metrics_after, "boostserve_stage_batch_size_sum", stage="1") - metric_sum(
        metrics_before, "boostserve_stage_batch_size_sum", stage="1"
    )
    d_req_s = metric_sum(metrics_after, "boostserve_request_duration_seconds_sum", route=route) - metric_sum(
        metrics_before, "boostserve_request_duration_seconds_sum", route=route
    )
    d_req_n = metric_sum(metrics_after, "boostserve_request_duration_seconds_count", route=route) - metric_sum(
        metrics_before, "boostserve_request_duration_seconds_count", route=route
    )

    latency = summarize_latency(result.latencies_s)
    engine_ms = 1e3 * safe_ratio(d_stage_s, d_images)
    server_ms = np.asarray(result.server_ms, dtype=np.float64)[ok]
    server_ms = server_ms[np.isfinite(server_ms)]
    status_counts = {str(s): int(c) for s, c in zip(*np.unique(statuses, return_counts=True), strict=True)}
    return {
        "server": server,
        "mode": mode,
        "concurrency": concurrency,
        "round": round_index,
        "requests": result.count,
        "ok": n_ok,
        "status_counts": status_counts,
        "first_error": result.first_error,
        "wall_s": result.wall_s,
        "req_per_s": result.count / result.wall_s if result.wall_s > 0 else math.nan,
        "ok_per_s": n_ok / result.wall_s if result.wall_s > 0 else math.nan,
        "latency_ms": latency,
        "served_accuracy": float(correct[ok].mean()) if n_ok else math.nan,
        "avg_macs": macs_from_exits,
        "avg_macs_reported": float(reported_macs.mean()) if reported_macs.size else math.nan,
        "macs_fraction_of_full": macs_from_exits / artifact.full_macs if n_ok else math.nan,
        "exit_histogram": exit_hist.tolist(),
        "thresholds_served": result.thresholds,
        "paired": paired,
        "server_latency_ms_p50": float(np.median(server_ms)) if server_ms.size else math.nan,
        "server_request_ms_mean": 1e3 * safe_ratio(d_req_s, d_req_n),
        "engine_ms_per_image": engine_ms,
        "avg_stage_batch": safe_ratio(d_batch_sum, d_batch_count),
        "avg_stage1_batch": safe_ratio(stage1_items, stage1_batches),
        "server_cpu_ms_per_request": 1e3 * safe_ratio(server_cpu_s, d_images),
        "client_cpu_ms_per_request": 1e3 * safe_ratio(result.client_cpu_s, result.count),
        "client_cpu_utilization": safe_ratio(result.client_cpu_s, result.wall_s),
        "overhead_ms_p50": latency["p50"] - engine_ms if math.isfinite(engine_ms) else math.nan,
        "warmup_requests": result.warmup_requests,
    }


def run_http(
    artifact: Artifact, test: TestSet, settings: HttpSettings, logs_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Every server configuration and cell; returns the suite's JSON body."""
    subset = test.head(settings.images)
    bodies = encode_png(subset.images)
    labels = subset.labels
    aligned = _aligned_test_arrays(artifact, labels)
    servers_out: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    # Each (server, mode) continues through the test images where its previous cell stopped, so
    # pooled over cells the served accuracy covers as much of the test split as possible.
    next_start: dict[tuple[str, str], int] = {}
    client_check: dict[str, Any] | None = None
    profiles: list[dict[str, Any]] = []
    pooled: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {}
    # Every server configuration runs at once (an idle server costs nothing), so each round can
    # interleave the cells of all servers: batching vs no batching is an ABAB comparison too.
    servers: dict[str, ServerProcess] = {}
    grpc_ports: dict[str, int] = {}
    oip = OipTarget(subset.images, artifact.manifest.name)
    infos: dict[str, dict[str, str] | None] = {}
    plan: list[tuple[int, int, ServerConfig, str]] = []
    for r in range(settings.rounds):
        for concurrency in sorted({c for s in settings.servers for c in s.concurrencies}):
            pairs = [(s, m) for s in settings.servers if concurrency in s.concurrencies for m in s.modes]
            shift = r % max(len(pairs), 1)
            plan += [(r, concurrency, s, m) for s, m in pairs[shift:] + pairs[:shift]]
    floor: dict[str, Any] | None = None
    # Read before the servers start: the commit whose code `batching` imports, even if one lands mid-run.
    this = this_checkout() if any(s.code_dir for s in settings.servers) else None
    with progress.task("http", len(plan)) as advance, pinned(settings.client_cpus):
        try:
            for config in settings.servers:
                log_path = logs_dir / f"server-{config.name}.log"
                env = config.env
                if "grpc" in config.modes:
                    grpc_ports[config.name] = free_port()
                    env = {**env, "BOOSTSERVE_GRPC_PORT": str(grpc_ports[config.name])}
                server = (
                    ServerProcess(artifact.path, env, cpus=settings.server_cpus, log_path=log_path)
                    if config.code_dir is None
                    else CheckoutServerProcess(
                        read_checkout(Path(config.code_dir)),
                        artifact.path,
                        env,
                        cpus=settings.server_cpus,
                        log_path=log_path,
                    )
                )
                servers[config.name] = server
                server.start()
                progress.log(f"server {config.name} ready on port {server.port} in {server.startup_s:.1f} s")
                info = [dict(labels) for (name, labels) in server.scrape() if name == "boostserve_model_info"]
                infos[config.name] = info[0] if info else None
            for r, concurrency, config, mode in plan:
                server = servers[config.name]
                before = server.scrape()
                cpu0 = server.cpu_seconds()
                result = _load(
                    server,
                    bodies,
                    settings,
                    mode=mode,
                    concurrency=concurrency,
                    start_index=next_start.get((config.name, mode), 0),
                    oip=oip.at(grpc_ports.get(config.name)),
                )
                server_cpu = server.cpu_seconds() - cpu0
                after = server.scrape()
                next_start[(config.name, mode)] = result.next_index
                _pool(pooled.setdefault((config.name, mode), {}), result, labels)
                cell = _cell_summary(
                    server=config.name,
                    mode=mode,
                    concurrency=concurrency,
                    round_index=r,
                    result=result,
                    labels=labels,
                    artifact=artifact,
                    aligned=aligned,
                    metrics_before=before,
                    metrics_after=after,
                    server_cpu_s=server_cpu,
                    route=MODE_ROUTES.get(mode, CLASSIFY_PATH),  # the metrics label: the route template
                )
                cells.append(cell)
                advance(
                    1,
                    f"{config.name} {mode} c={concurrency}: {cell['req_per_s']:.0f} req/s "
                    f"p99 {cell['latency_ms']['p99']:.1f} ms",
                )
            if settings.client_check and "batching" in servers:
                client_check = _client_check(servers["batching"], bodies, settings, cells)
                advance(0, "client check done")
            if settings.profile and "batching" in servers:
                for concurrency in sorted({1, 64} & {c["concurrency"] for c in cells}):
                    profiles.append(_profile_cell(servers["batching"], bodies, settings, concurrency))
                    progress.log(f"profiled batching drop_0.01 with {concurrency} client(s)")
            floor = _floor(bodies, settings, cells, logs_dir)
            progress.log(
                "floor measured: " + ", ".join(f"{f['name']} {f['req_per_s']:.0f} req/s" for f in floor["variants"])
            )
        finally:
            for name, server in servers.items():
                server.stop()
                servers_out.append(
                    {
                        "name": name,
                        **server.describe(),
                        "log": str(server.log_path),
                        "model_info": infos.get(name),
                    }
                )
    return {
        "artifacts": str(artifact.path),
        "model": artifact.manifest.name,
        "version": artifact.manifest.version,
        "images": len(bodies),
        "full_macs": artifact.full_macs,
        "cumulative_macs": artifact.cumulative_macs.tolist(),
        "png_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "paired_with_calibration": aligned is not None,
        "servers": servers_out,
        "compare_with": _compare_with(servers_out, this),
        "cells": cells,
        "client_check": client_check,
        "profiles": profiles,
        "floor": floor,
        "aggregate": aggregate_cells(cells),
        "pooled": [_pooled_summary(server, mode, parts, labels, aligned) for (server, mode), parts in pooled.items()],
    }


def _compare_with(servers_out: list[dict[str, Any]], this: Checkout | None) -> dict[str, Any] | None:
    """Both checkouts of a side-by-side run (None without --compare-with): what `compare` is."""
    other = next((s["checkout"] for s in servers_out if s["name"] == COMPARE_SERVER and "checkout" in s), None)
    if other is None:
        return None
    return {"server": COMPARE_SERVER, "this": this.as_dict() if this else None, "other": other}


class FloorServerProcess(ServerProcess):
    """`python -m bench.floor_app` (HTTP stack only, optionally + PNG decode) on the server's CPUs."""

    def __init__(self, decode: bool, *, cpus: list[int] | None, log_path: Path) -> None:
        super().__init__(Path("."), {}, cpus=cpus, log_path=log_path, startup_timeout_s=30.0)
        self.decode = decode

    def cpu_seconds(self) -> float:
        """The floor process's own CPU clock (GET /cpu): ns resolution, unlike /proc ticks."""
        with urllib.request.urlopen(self.url("/cpu"), timeout=5) as response:
            return float(response.read())

    @property
    def command(self) -> list[str]:
        extra = ["--decode"] if self.decode else []
        return [sys.executable, "-m", "bench.floor_app", "--host", self.host, "--port", str(self.port), *extra]


def _target_concurrency(cells: list[dict[str, Any]]) -> int:
    """The targets' client count (64) when the run has it, else the largest one it has."""
    counts = {c["concurrency"] for c in cells}
    return TARGET_CONCURRENCY if TARGET_CONCURRENCY in counts else max(counts)


def _floor(bodies: list[bytes], settings: HttpSettings, cells: list[dict[str, Any]], logs_dir: Path) -> dict[str, Any]:
    """The per-request floor of the HTTP stack, under the target cell's load (64 clients).

    Two variants of bench.floor_app on the server CPUs: `http_only` (read the body, answer a fixed
    classify-sized JSON) and `http_decode` (the same plus the PNG decode every image server does).
    """
    concurrency = _target_concurrency(cells)
    variants = []
    for name, decode in (("http_only", False), ("http_decode", True)):
        with FloorServerProcess(decode, cpus=settings.server_cpus, log_path=logs_dir / f"floor-{name}.log") as server:
            # warm-up, not counted
            _load(server, bodies, settings, concurrency=concurrency, duration_s=max(settings.warmup_s, 0.2), warmup_s=0)
            cpu0 = server.cpu_seconds()
            result = _load(server, bodies, settings, concurrency=concurrency, warmup_s=0)
            cpu = server.cpu_seconds() - cpu0
        variants.append(
            {
                "name": name,
                "decode": decode,
                "req_per_s": result.count / result.wall_s if result.wall_s > 0 else math.nan,
                "server_cpu_ms_per_request": 1e3 * safe_ratio(cpu, result.count),
                "p50_ms": summarize_latency(result.latencies_s)["p50"],
                "errors": sum(1 for st in result.statuses if st != 200),
            }
        )
    return {"concurrency": concurrency, "variants": variants}


@dataclass(frozen=True)
class OipTarget:
    """What the OIP modes need beyond the PNG bodies: the same images as pixels, the model name,
    and the gRPC port of the server under test (None where it has none)."""

    pixels: np.ndarray  # (n, H, W) uint8, the images the PNG bodies encode
    model: str
    grpc_port: int | None = None

    def at(self, grpc_port: int | None) -> OipTarget:
        return OipTarget(self.pixels, self.model, grpc_port)


def _load(
    server: ServerProcess,
    bodies: list[bytes],
    settings: HttpSettings,
    *,
    mode: str = "drop_0.01",
    concurrency: int,
    duration_s: float | None = None,
    warmup_s: float | None = None,
    client: str | None = None,
    start_index: int = 0,
    oip: OipTarget | None = None,
) -> LoadResult:
    """One closed-loop run of `mode` against `server` with the suite's bounds (overridable)."""
    common: dict[str, Any] = dict(
        host=server.host,
        port=server.port,
        bodies=bodies,
        concurrency=concurrency,
        duration_s=settings.duration_s if duration_s is None else duration_s,
        max_requests=settings.max_requests,
        warmup_s=settings.warmup_s if warmup_s is None else warmup_s,
        start_index=start_index,
    )
    if mode in MULTIPART_MODES:  # pre-built requests: the raw client, whatever settings.client says
        path = f"{CLASSIFY_PATH}?{MODE_QUERIES[mode]}"
        requests = build_multipart_requests(server.host, server.port, path, bodies)
        return asyncio.run(run_closed_loop(path=path, requests=requests, **common))
    if mode not in OIP_MODES:
        return asyncio.run(
            run_closed_loop(
                path=f"{CLASSIFY_PATH}?{MODE_QUERIES[mode]}",
                client=settings.client if client is None else client,
                **common,
            )
        )
    if oip is None:
        raise ValueError(f"mode {mode} needs the images as pixels and the model name")
    if mode == "v2_binary":
        requests = build_v2_binary_requests(server.host, server.port, oip.model, oip.pixels)
        return asyncio.run(
            run_closed_loop(
                path=V2_ROUTE.format(name=oip.model), requests=requests, parse=parse_v2_binary_answer, **common
            )
        )
    if oip.grpc_port is None:
        raise ValueError("mode grpc needs a server started with BOOSTSERVE_GRPC_PORT")
    clients = GrpcClients(server.host, oip.grpc_port, oip.model, oip.pixels)

    async def run_grpc() -> LoadResult:
        try:
            return await run_closed_loop(path=GRPC_METHOD, connect=clients.connect, parse=parse_grpc_answer, **common)
        finally:
            await clients.aclose()

    return asyncio.run(run_grpc())


def _client_check(
    server: ServerProcess, bodies: list[bytes], settings: HttpSettings, cells: list[dict[str, Any]]
) -> dict[str, Any]:
    """Run the target cell once more with the other client kind: what the client itself costs.

    Why: the load generator shares a 2-core machine with the server; this shows how much CPU per
    request each client implementation needs and whether it would have capped the throughput.
    """
    other = "httpx" if settings.client == "raw" else "raw"
    concurrency = _target_concurrency(cells)
    result = _load(server, bodies, settings, concurrency=concurrency, client=other)
    same = [
        c for c in cells if c["server"] == "batching" and c["mode"] == "drop_0.01" and c["concurrency"] == concurrency
    ]

    def entry(kind: str, rps: float, cpu_ms: float, util: float, p50: float) -> dict[str, Any]:
        return {"client": kind, "req_per_s": rps, "client_cpu_ms_per_request": cpu_ms,
                "client_cpu_utilization": util, "p50_ms": p50}  # fmt: skip

    rows = [
        entry(
            other,
            result.count / result.wall_s if result.wall_s > 0 else math.nan,
            1e3 * safe_ratio(result.client_cpu_s, result.count),
            safe_ratio(result.client_cpu_s, result.wall_s),
            summarize_latency(result.latencies_s)["p50"],
        )
    ]
    if same:
        rows.insert(
            0,
            entry(
                settings.client,
                float(np.median([c["req_per_s"] for c in same])),
                float(np.median([c["client_cpu_ms_per_request"] for c in same])),
                float(np.median([c["client_cpu_utilization"] for c in same])),
                float(np.median([c["latency_ms"]["p50"] for c in same])),
            ),
        )
    return {"server": "batching", "mode": "drop_0.01", "concurrency": concurrency, "clients": rows}


def _profile_cell(
    server: ServerProcess, bodies: list[bytes], settings: HttpSettings, concurrency: int
) -> dict[str, Any]:
    """The target mode once more with py-spy attached to the server (not counted in the results)."""
    from bench.profiling import ServerProfile

    assert server.proc is not None
    with ServerProfile(server.proc.pid, settings.duration_s) as prof:
        result = _load(server, bodies, settings, concurrency=concurrency, warmup_s=0.0)
    return {
        "server": "batching",
        "mode": "drop_0.01",
        "concurrency": concurrency,
        "req_per_s_while_profiled": result.count / result.wall_s if result.wall_s > 0 else math.nan,
        **prof.summary(),
    }


def _pool(parts: dict[str, list[np.ndarray]], result: LoadResult, labels: np.ndarray) -> None:
    """Keep the image index and correctness of every 200 answer of a (server, mode)."""
    ok = np.asarray(result.statuses, dtype=np.int64) == 200
    idx = np.asarray(result.image_index, dtype=np.int64)[ok]
    predicted = np.asarray(result.labels, dtype=np.int64)[ok]
    parts.setdefault("index", []).append(idx)
    parts.setdefault("correct", []).append(predicted == labels[idx])
    parts.setdefault("exit", []).append(np.asarray(result.exits, dtype=np.int64)[ok])


def _pooled_summary(
    server: str,
    mode: str,
    parts: dict[str, list[np.ndarray]],
    labels: np.ndarray,
    aligned: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, Any]:
    """Served accuracy of a (server, mode) over all its cells, paired with all-stages correctness."""
    idx = np.concatenate(parts["index"]) if parts.get("index") else np.zeros(0, dtype=np.int64)
    correct = np.concatenate(parts["correct"]) if parts.get("correct") else np.zeros(0, dtype=bool)
    out: dict[str, Any] = {
        "server": server,
        "mode": mode,
        "answers": int(idx.size),
        "distinct_images": int(np.unique(idx).size),
        "test_images": int(labels.size),
        "served_accuracy": float(correct.mean()) if idx.size else math.nan,
        "all_stages_accuracy_same_images": math.nan,
        "accuracy_loss_vs_all_stages": math.nan,
    }
    if aligned is not None and idx.size:
        all_correct = aligned[1][-1, idx]
        out["all_stages_accuracy_same_images"] = float(all_correct.mean())
        out["accuracy_loss_vs_all_stages"] = float(all_correct.mean() - correct.mean())
    return out


def aggregate_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds per (server, mode, concurrency), with min/max of req/s."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["server"], cell["mode"], cell["concurrency"]), []).append(cell)
    out = []
    for (server, mode, concurrency), group in groups.items():
        rps = [c["req_per_s"] for c in group]

        def med(key: str, sub: str | None = None, group: list[dict[str, Any]] = group) -> float:
            values = [(c[key][sub] if sub else c[key]) for c in group]
            values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            return float(np.median(values)) if values else math.nan

        ok = sum(c["ok"] for c in group)
        exit_hist = np.sum([c["exit_histogram"] for c in group], axis=0).tolist()
        losses = [c["paired"].get("accuracy_loss_vs_all_stages") for c in group]
        losses = [v for v in losses if v is not None]
        agreement = [c["paired"].get("exit_agreement") for c in group]
        agreement = [v for v in agreement if v is not None]
        out.append(
            {
                "server": server,
                "mode": mode,
                "concurrency": concurrency,
                "rounds": len(group),
                "requests": sum(c["requests"] for c in group),
                "errors": sum(c["requests"] - c["ok"] for c in group),
                "req_per_s": float(np.median(rps)),
                "req_per_s_min": float(np.min(rps)),
                "req_per_s_max": float(np.max(rps)),
                "p50_ms": med("latency_ms", "p50"),
                "p95_ms": med("latency_ms", "p95"),
                "p99_ms": med("latency_ms", "p99"),
                "served_accuracy": float(sum(c["served_accuracy"] * c["ok"] for c in group if c["ok"]) / ok)
                if ok
                else math.nan,
                "accuracy_loss_vs_all_stages": float(np.mean(losses)) if losses else math.nan,
                "exit_agreement": float(np.mean(agreement)) if agreement else math.nan,
                "avg_macs": float(sum(c["avg_macs"] * c["ok"] for c in group if c["ok"]) / ok) if ok else math.nan,
                "exit_histogram": exit_hist,
                "engine_ms_per_image": med("engine_ms_per_image"),
                "server_request_ms_mean": med("server_request_ms_mean"),
                "server_latency_ms_p50": med("server_latency_ms_p50"),
                "overhead_ms_p50": med("overhead_ms_p50"),
                "avg_stage_batch": med("avg_stage_batch"),
                "avg_stage1_batch": med("avg_stage1_batch"),
                "server_cpu_ms_per_request": med("server_cpu_ms_per_request"),
                "client_cpu_ms_per_request": med("client_cpu_ms_per_request"),
                "client_cpu_utilization": med("client_cpu_utilization"),
            }
        )
    return out
