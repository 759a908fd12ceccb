"""`boostserve bench --suite slo`: the live controllers under open-loop load (issue 19, section 4).

Two scenarios, each with its servers side by side in one run (same artifact, same CPUs, same
Poisson schedule and seed, one after the other):

* **accuracy first**: global budget `max_accuracy_drop=0.001`; server `static` (today: the held-out
  thresholds whatever the load) and server `slo` (BOOSTSERVE_LATENCY_TARGET_MS, floor
  BOOSTSERVE_MAX_ACCURACY_DROP_UNDER_LOAD). Offered load steps through multiples of the capacity
  measured in the same run (closed loop, 64 clients, on `static` at its budget); per step: offered
  and served req/s, p50/p99 of admitted requests (latency from the scheduled arrival), shares shed
  (429) and degraded, served accuracy and the loss vs the full network on the same images (the
  test split's all-stages correctness from calibration.npz, which the server's engine computed),
  and the live disagreement of the shadow monitor when the server exports it. Also: capacity at
  the floor ÷ capacity at the budget (closed loop, same server, per-request budget).
* **refusal cost**: server CPU per request of `bench.shedding_app` (the service in SLO mode, told to
  shed everything) closed loop, with the protocol's head gate and without it (the refusal through
  ASGI admission), interleaved rounds, beside the CPU per answered request at the floor.
* **drift**: global `budget_macs` (the held-out cost of `max_accuracy_drop=0.01`); server
  `drift_static` (BOOSTSERVE_LIVE_BUDGET=false) vs `drift_live` (the live MAC budget). Open loop at
  a share of the capacity; the image mix moves from the whole test split to its hardest third (by
  the exit each image takes under the budget's held-out thresholds, from the calibration's test
  confidences). MACs per image vs the budget over time, and accuracy, per phase.

Every number is computed here from the per-request records; bench.targets turns them into verdicts.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Artifact, Progress, format_number
from bench.data import TestSet, encode_png
from bench.http_suite import pinned
from bench.loadgen import run_closed_loop
from bench.machine import cpu_ticks
from bench.openloop import OpenLoopResult, Phase, run_open_loop
from bench.server import ServerProcess, metric_sum

CLASSIFY_PATH = "/v1/classify"
SHADOW_SAMPLES = "boostserve_shadow_samples_total"
SHADOW_DISAGREEMENTS = "boostserve_shadow_disagreements_total"


@dataclass(frozen=True)
class SloSettings:
    step_s: float = 20.0
    steps: tuple[float, ...] = (0.5, 1.0, 1.5, 0.5)  # x the measured capacity
    budget_drop: float = 0.001
    floor: float = 0.03
    latency_target_ms: float = 50.0
    capacity_s: float = 6.0
    capacity_clients: int = 64
    refusal_s: float = 3.0  # per refusal-cost cell
    drift_budget_drop: float = 0.01  # budget_macs = this drop's held-out cost
    drift_phases_s: tuple[float, float] = (15.0, 40.0)
    drift_load: float = 0.5  # x the measured capacity
    drift_settle_s: float = 15.0  # of phase 2, before the settled average
    window_s: float = 2.0  # time series resolution
    images: int = 10_000
    seed: int = 0
    server_cpus: list[int] | None = None
    client_cpus: list[int] | None = None


def _base_env() -> dict[str, str]:
    return {
        "BOOSTSERVE_LOG_LEVEL": "warning",
        "BOOSTSERVE_INTRA_OP_THREADS": "1",
        "BOOSTSERVE_INTER_OP_THREADS": "1",
        "BOOSTSERVE_MAX_QUEUE": "4096",
    }


def server_envs(settings: SloSettings, drift_budget_macs: float) -> dict[str, dict[str, str]]:
    accuracy = {**_base_env(), "BOOSTSERVE_DEFAULT_BUDGET": json.dumps({"max_accuracy_drop": settings.budget_drop})}
    drift = {**_base_env(), "BOOSTSERVE_DEFAULT_BUDGET": json.dumps({"budget_macs": round(drift_budget_macs)})}
    return {
        "static": {**accuracy, "BOOSTSERVE_LIVE_BUDGET": "false"},
        "slo": {
            **accuracy,
            "BOOSTSERVE_LIVE_BUDGET": "false",
            "BOOSTSERVE_LATENCY_TARGET_MS": f"{settings.latency_target_ms:g}",
            "BOOSTSERVE_MAX_ACCURACY_DROP_UNDER_LOAD": f"{settings.floor:g}",
        },
        "drift_static": {**drift, "BOOSTSERVE_LIVE_BUDGET": "false"},
        "drift_live": {**drift, "BOOSTSERVE_LIVE_BUDGET": "true"},
    }


def _full_correct(artifact: Artifact, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(all-stages correctness (n,), test confidences (E, n)) when the test split is `labels` in order."""
    if artifact.test is None or artifact.manifest.calibration is None:
        return None
    with np.load(artifact.path / artifact.manifest.calibration.file) as data:
        cal_labels = np.asarray(data["test_labels"]) if "test_labels" in data else None
    n = len(labels)
    if cal_labels is None or cal_labels.shape[0] < n or not np.array_equal(cal_labels[:n], labels):
        return None
    return artifact.test.correct[-1, :n].astype(bool), artifact.test.confidence[:, :n]


def hardest_third(confidence: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the third of the images that exit last under `thresholds` ((E, n) confidences;
    ties broken by the lowest first-exit confidence)."""
    from service.core.exit_rule import exit_indices

    taken = exit_indices(confidence, thresholds)  # (n,)
    order = np.lexsort((confidence[0], -taken))  # latest exit first, then least confident
    return np.sort(order[: confidence.shape[1] // 3])


def step_summary(
    rec: dict[str, np.ndarray],
    phase: int,
    seconds: float,
    labels: np.ndarray,
    full_correct: np.ndarray | None,
    target_s: float,
) -> dict[str, Any]:
    """One phase of an open-loop trace: rates, latency of admitted requests, shed, degraded, accuracy."""
    sel = rec["phase"] == phase
    status = rec["status"][sel]
    ok = status == 200
    lat = rec["latency_s"][sel][ok]  # (m,)
    images = rec["image"][sel][ok]
    correct = rec["label"][sel][ok] == labels[images]
    arrivals = int(sel.sum())
    over = int((lat > target_s).sum())
    violating = int(arrivals - ok.sum()) + over
    out: dict[str, Any] = {
        "offered_rps": arrivals / seconds,
        "served_rps": float(ok.sum()) / seconds,
        "arrivals": arrivals,
        "answered": int(ok.sum()),
        "shed": int((status == 429).sum()),
        "shed_share": float((status == 429).sum()) / max(1, arrivals),
        "errors": int(((status != 200) & (status != 429)).sum()),
        "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else math.nan,
        "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else math.nan,
        "over_target": over,
        "slo_violations": violating,
        "degraded_share": float(rec["degraded"][sel][ok].mean()) if ok.any() else math.nan,
        "accuracy": float(correct.mean()) if ok.any() else math.nan,
        "macs_mean": float(rec["macs"][sel][ok].mean()) if ok.any() else math.nan,
        "allowed_drop_mean": float(np.nanmean(rec["allowed_drop"][sel][ok])) if ok.any() else math.nan,
        # The generator's own delay (included in every latency): a client-bound step shows here.
        "send_lag_p99_ms": float(np.percentile(rec["send_lag_s"][sel], 99) * 1e3) if arrivals else math.nan,
        # Connections the generator opened in the step (HTTP/1.1: one per extra request in flight).
        "new_connections": int(rec["new_connection"][sel].sum()) if "new_connection" in rec else None,
    }
    if full_correct is not None and ok.any():
        out["full_accuracy_same_images"] = float(full_correct[images].mean())
        out["loss_vs_all_stages"] = out["full_accuracy_same_images"] - out["accuracy"]
    return out


def time_series(rec: dict[str, np.ndarray], window_s: float, target_s: float) -> dict[str, list[float]]:
    """Per window of arrivals: offered req/s, p99 of admitted (ms), shed and degraded shares, MACs."""
    end = float(rec["scheduled_s"].max()) if rec["scheduled_s"].size else 0.0
    edges = np.arange(0.0, end + window_s, window_s)
    out: dict[str, list[float]] = {k: [] for k in ("t", "offered_rps", "p99_ms", "shed_share", "degraded", "macs")}
    for lo in edges[:-1]:
        sel = (rec["scheduled_s"] >= lo) & (rec["scheduled_s"] < lo + window_s)
        ok = sel & (rec["status"] == 200)
        out["t"].append(float(lo + window_s / 2))
        out["offered_rps"].append(float(sel.sum()) / window_s)
        out["p99_ms"].append(float(np.percentile(rec["latency_s"][ok], 99) * 1e3) if ok.any() else math.nan)
        out["shed_share"].append(float((rec["status"][sel] == 429).mean()) if sel.any() else math.nan)
        out["degraded"].append(float(rec["degraded"][ok].mean()) if ok.any() else math.nan)
        out["macs"].append(float(rec["macs"][ok].mean()) if ok.any() else math.nan)
    return out


def _open_loop(server: ServerProcess, bodies: list[bytes], phases: list[Phase], seed: int) -> OpenLoopResult:
    return asyncio.run(
        run_open_loop(host=server.host, port=server.port, path=CLASSIFY_PATH, bodies=bodies, phases=phases, seed=seed)
    )


@dataclass(frozen=True)
class StepSample:
    cpu_s: float  # the server process's CPU seconds
    batches: float  # stage-1 batches run so far (NaN: scrape refused)
    images: float  # images in them
    steal_ticks: float  # the whole VM's (bench.machine.cpu_ticks)
    all_ticks: float


class StepSampler:
    """The server's CPU seconds and stage-1 batch counters, and the VM's steal time, at each step
    boundary of an open-loop trace.

    Why: the open-loop load is defined from closed-loop capacity, and a server that sees Poisson
    arrivals forms smaller batches and pays more per request than 64 clients in lock step; per step,
    the CPU per answered request and the mean stage-1 batch show how far. Steal time says how much
    of a slow step was the host's (this runs on shared VMs). A thread reads them at 0, step,
    2·step, ... seconds after `start()` (just before the trace starts), from /proc and one /metrics
    scrape each; the boundaries are the trace's to within that start offset.
    """

    def __init__(self, server: ServerProcess, boundaries_s: Sequence[float]) -> None:
        self.server = server
        self.boundaries_s = list(boundaries_s)
        self.samples: list[StepSample] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _sample(self) -> StepSample:
        cpu = self.server.cpu_seconds()
        steal, ticks = cpu_ticks()
        try:
            metrics = self.server.scrape()
        except OSError:
            return StepSample(cpu, math.nan, math.nan, steal, ticks)
        count = metric_sum(metrics, "boostserve_stage_batch_size_count", stage="1")
        total = metric_sum(metrics, "boostserve_stage_batch_size_sum", stage="1")
        return StepSample(cpu, count, total, steal, ticks)

    def _run(self, t0: float) -> None:
        for at in self.boundaries_s:
            if self._stop.wait(max(0.0, t0 + at - time.perf_counter())):
                return
            self.samples.append(self._sample())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(time.perf_counter(),), daemon=True)
        self._thread.start()

    def finish(self, wait: bool = True) -> None:
        """Take the remaining samples (`wait`; the trace ended) or give them up (the trace failed)."""
        if self._thread is None:
            return
        if not wait:
            self._stop.set()
        self._thread.join(timeout=None if wait else 10.0)

    def per_step(self, answered: Sequence[int]) -> list[dict[str, float]]:
        """Per step: server CPU ms per answered request, mean stage-1 batch and the VM's steal share
        (NaN where unsampled)."""
        out = []
        for k, n in enumerate(answered):
            if k + 1 >= len(self.samples):
                out.append(dict.fromkeys(("server_cpu_ms_per_answer", "stage1_batch_mean", "steal_share"), math.nan))
                continue
            a, b = self.samples[k], self.samples[k + 1]
            ticks = b.all_ticks - a.all_ticks
            out.append(
                {
                    "server_cpu_ms_per_answer": 1e3 * (b.cpu_s - a.cpu_s) / n if n else math.nan,
                    "stage1_batch_mean": (b.images - a.images) / (b.batches - a.batches)
                    if b.batches > a.batches
                    else math.nan,
                    "steal_share": (b.steal_ticks - a.steal_ticks) / ticks if ticks > 0 else math.nan,
                }
            )
        return out


@dataclass(frozen=True)
class ClosedLoopCell:
    req_per_s: float  # answered with `status`
    cpu_ms_per_request: float  # server CPU over the measured window ÷ requests answered with `status`
    share: float  # of all answers, those with `status`


def _closed_loop(
    server: ServerProcess,
    bodies: list[bytes],
    settings: SloSettings,
    seconds: float,
    query: str = "",
    status: int = 200,
) -> ClosedLoopCell:
    path = CLASSIFY_PATH + (f"?{query}" if query else "")

    def load(duration_s: float) -> Any:
        return asyncio.run(
            run_closed_loop(
                host=server.host,
                port=server.port,
                path=path,
                bodies=bodies,
                concurrency=settings.capacity_clients,
                duration_s=duration_s,
                max_requests=10**7,
                warmup_s=0.0,
            )
        )

    load(1.0)  # warm-up, not counted
    cpu0 = server.cpu_seconds()
    result = load(seconds)
    cpu = server.cpu_seconds() - cpu0
    n = sum(1 for s in result.statuses if s == status)
    return ClosedLoopCell(
        req_per_s=n / result.wall_s if result.wall_s > 0 else math.nan,
        cpu_ms_per_request=1e3 * cpu / n if n else math.nan,
        share=n / len(result.statuses) if result.statuses else math.nan,
    )


class SheddingServerProcess(ServerProcess):
    """`python -m bench.shedding_app`: the service in SLO mode shedding every classify request."""

    def __init__(self, artifacts: Path, env: dict[str, str], gate: bool, *, cpus: list[int] | None, log_path: Path):
        super().__init__(artifacts, env, cpus=cpus, log_path=log_path)
        self.gate = gate

    entry_point = ("bench.shedding_app",)

    @property
    def extra_args(self) -> list[str]:
        return [] if self.gate else ["--no-gate"]


def refusal_cost(
    artifact: Artifact, bodies: list[bytes], settings: SloSettings, logs_dir: Path, rounds: int = 2
) -> dict[str, Any]:
    """Server CPU per 429 with the head gate and through ASGI admission (medians over interleaved rounds)."""
    cells: dict[str, list[ClosedLoopCell]] = {"head_gate": [], "asgi": []}
    for r in range(rounds):
        for name in ("head_gate", "asgi") if r % 2 == 0 else ("asgi", "head_gate"):
            server = SheddingServerProcess(
                artifact.path,
                _base_env(),
                name == "head_gate",
                cpus=settings.server_cpus,
                log_path=logs_dir / f"slo-refusal-{name}.log",
            )
            with server:
                cells[name].append(_closed_loop(server, bodies, settings, settings.refusal_s, status=429))
    return {
        name: {
            "cpu_ms_per_refusal": float(np.median([c.cpu_ms_per_request for c in runs])),
            "cpu_ms_per_refusal_range": [
                min(c.cpu_ms_per_request for c in runs),
                max(c.cpu_ms_per_request for c in runs),
            ],
            "refusals_per_s": float(np.median([c.req_per_s for c in runs])),
            "share_refused": min(c.share for c in runs),
        }
        for name, runs in cells.items()
    }


def _shadow(server: ServerProcess) -> dict[str, float] | None:
    metrics = server.scrape()
    samples = metric_sum(metrics, SHADOW_SAMPLES)
    if not any(name == SHADOW_SAMPLES for name, _ in metrics):
        return None
    return {"samples": samples, "disagreements": metric_sum(metrics, SHADOW_DISAGREEMENTS)}


def _delta(after: dict[str, float] | None, before: dict[str, float] | None) -> dict[str, float] | None:
    if after is None or before is None:
        return None
    out = {k: after[k] - before.get(k, 0.0) for k in after}
    out["rate"] = out["disagreements"] / out["samples"] if out["samples"] > 0 else math.nan
    return out


def mac_noise(resolver: Any, full_macs: float, window: int, fractions: Sequence[float]) -> list[dict[str, float]]:
    """Per budget_macs (a share of the full cost): the coefficient of variation of per-image MACs
    under its held-out thresholds (exit fractions x cumulative MACs) and the relative standard
    error of the live MAC controller's average over `window` images (EWMA: N_eff = 2 window - 1)."""
    from service.core.knobs import Budget

    cum = np.asarray(resolver.manifest.cumulative_macs, dtype=np.float64)  # (E,)
    rows: list[dict[str, float]] = []
    for share in fractions:
        if share * full_macs < cum[0]:
            continue  # below the first exit's cost: not a budget
        point = resolver.resolve(Budget.of(budget_macs=share * full_macs))
        f = np.asarray(point.exit_fractions, dtype=np.float64)  # (E,)
        mean = float((f * cum).sum())
        cv = float(np.sqrt((f * (cum - mean) ** 2).sum()) / mean)
        rows.append({"budget_share": share, "cv": cv, "window": window, "relative_se": cv / math.sqrt(2 * window - 1)})
    return rows


def run_slo(
    artifact: Artifact, test: TestSet, settings: SloSettings, logs_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Both scenarios; returns the suite's JSON body."""
    from service.core.budget import BudgetResolver
    from service.core.knobs import Budget

    subset = test.head(settings.images)
    bodies = encode_png(subset.images)
    labels = subset.labels
    aligned = _full_correct(artifact, labels)
    full_correct = None if aligned is None else aligned[0]
    resolver = BudgetResolver(artifact.manifest, artifact.heldout)
    drift_point = resolver.resolve(Budget.of(max_accuracy_drop=settings.drift_budget_drop))
    drift_budget = float(drift_point.expected_macs or artifact.full_macs)
    envs = server_envs(settings, drift_budget)
    target_s = settings.latency_target_ms / 1000.0
    out: dict[str, Any] = {
        "settings": asdict(settings),
        "drift_budget_macs": drift_budget,
        "mac_noise": mac_noise(resolver, artifact.full_macs, 2000, (0.1, 0.15, 0.2, 0.3, 0.4)),
    }
    servers = {
        name: ServerProcess(artifact.path, env, cpus=settings.server_cpus, log_path=logs_dir / f"slo-{name}.log")
        for name, env in envs.items()
    }
    total = 4 + 2 * 2 + 1
    with progress.task("slo", total) as advance, pinned(settings.client_cpus):
        try:
            for server in servers.values():
                server.start()
            static = servers["static"]
            at_budget = _closed_loop(static, bodies, settings, settings.capacity_s)
            capacity = at_budget.req_per_s
            advance(1, f"capacity {capacity:.0f} req/s")
            at_floor = _closed_loop(
                static, bodies, settings, settings.capacity_s, f"max_accuracy_drop={settings.floor:g}"
            )
            floor_capacity = at_floor.req_per_s
            advance(1, f"floor capacity {floor_capacity:.0f} req/s")
            out["capacity"] = {
                "budget_rps": capacity,
                "floor_rps": floor_capacity,
                "floor_over_budget": floor_capacity / capacity if capacity > 0 else math.nan,
                "clients": settings.capacity_clients,
                "budget_cpu_ms_per_request": at_budget.cpu_ms_per_request,
                "floor_cpu_ms_per_request": at_floor.cpu_ms_per_request,
            }
            everything = np.arange(len(bodies))
            phases = [Phase(settings.step_s, f * capacity, everything) for f in settings.steps]
            scenario: dict[str, Any] = {}
            for name in ("static", "slo"):
                server = servers[name]
                before = _shadow(server)
                sampler = StepSampler(server, [k * settings.step_s for k in range(len(settings.steps) + 1)])
                sampler.start()
                try:
                    rec = _open_loop(server, bodies, phases, settings.seed).as_arrays()
                except BaseException:
                    sampler.finish(wait=False)
                    raise
                sampler.finish()
                after = _shadow(server)
                steps = [
                    {"load": f, **step_summary(rec, p, settings.step_s, labels, full_correct, target_s)}
                    for p, f in enumerate(settings.steps)
                ]
                for step, cost in zip(steps, sampler.per_step([s["answered"] for s in steps]), strict=True):
                    step.update(cost)
                scenario[name] = {
                    "steps": steps,
                    "series": time_series(rec, settings.window_s / 2, target_s),
                    "shadow": _delta(after, before),
                }
                scenario[name]["violations"] = sum(s["slo_violations"] for s in scenario[name]["steps"])
                scenario[name]["arrivals"] = sum(s["arrivals"] for s in scenario[name]["steps"])
                advance(1, f"accuracy first: {name}")
            out["accuracy_first"] = scenario
            again = _closed_loop(static, bodies, settings, settings.capacity_s)
            out["capacity"]["budget_rps_after"] = again.req_per_s
            out["capacity"]["budget_cpu_ms_per_request_after"] = again.cpu_ms_per_request
            advance(1, f"capacity again {again.req_per_s:.0f} req/s")
            if aligned is not None:
                hard = hardest_third(aligned[1], drift_point.as_array())
                drift_phases = [
                    Phase(settings.drift_phases_s[0], settings.drift_load * capacity, everything),
                    Phase(settings.drift_phases_s[1], settings.drift_load * capacity, hard),
                ]
                drift: dict[str, Any] = {"hard_images": int(hard.size)}
                for name in ("drift_static", "drift_live"):
                    rec = _open_loop(servers[name], bodies, drift_phases, settings.seed + 1).as_arrays()
                    ok = rec["status"] == 200
                    settled = (
                        ok
                        & (rec["phase"] == 1)
                        & (rec["scheduled_s"] >= settings.drift_phases_s[0] + settings.drift_settle_s)
                    )
                    first = ok & (rec["phase"] == 0)
                    drift[name] = {
                        "phase1_macs_over_budget": float(rec["macs"][first].mean() / drift_budget),
                        "settled_macs_over_budget": float(rec["macs"][settled].mean() / drift_budget),
                        "settled_images": int(settled.sum()),
                        "phase_accuracy": [
                            float(
                                (
                                    rec["label"][ok & (rec["phase"] == p)]
                                    == labels[rec["image"][ok & (rec["phase"] == p)]]
                                ).mean()
                            )
                            for p in (0, 1)
                        ],
                        "series": time_series(rec, settings.window_s, target_s),
                        "errors": int((~ok).sum()),
                    }
                    advance(1, f"drift: {name}")
                out["drift"] = drift
        finally:
            for server in servers.values():
                server.stop()
        out["refusal_cost"] = refusal_cost(artifact, bodies, settings, logs_dir)
        advance(1, "refusal cost")
    return out


def plot_slo(doc: dict[str, Any], out_dir: Path) -> Path:
    """p99 and degraded share over the accuracy-first trace; MACs / budget over the drift trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = doc["result"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    target = result["settings"]["latency_target_ms"]
    for name, style in (("static", "-"), ("slo", "-")):
        series = result.get("accuracy_first", {}).get(name)
        if series:
            s = series["series"]
            ax.plot(s["t"], [v if v is not None else math.nan for v in s["p99_ms"]], style, label=f"{name}: p99 ms")
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("seconds (load steps x capacity: " + ", ".join(f"{f:g}" for f in result["settings"]["steps"]) + ")")
    ax.set_ylabel("p99 of admitted requests (ms)")
    slo = result.get("accuracy_first", {}).get("slo")
    if slo:
        twin = ax.twinx()
        twin.plot(
            slo["series"]["t"], slo["series"]["degraded"], color="tab:green", alpha=0.6, label="slo: degraded share"
        )
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("share degraded (slo)")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("accuracy first: static vs SLO mode (open loop)")
    ax = axes[1]
    drift = result.get("drift") or {}
    budget = result.get("drift_budget_macs") or 1.0
    for name in ("drift_static", "drift_live"):
        if name in drift:
            s = drift[name]["series"]
            ax.plot(s["t"], [(v if v is not None else math.nan) / budget for v in s["macs"]], label=name)
    ax.axhspan(0.97, 1.03, color="grey", alpha=0.2, label="±3 % of the budget")
    ax.axvline(result["settings"]["drift_phases_s"][0], color="grey", linestyle=":")
    ax.set_xlabel("seconds (mix: whole test split, then its hardest third)")
    ax.set_ylabel("served MACs per image / budget")
    ax.set_title("drift: static thresholds vs live MAC budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "slo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capacity_again(cap: dict[str, Any]) -> str | None:
    """The budget's capacity measured again after the accuracy-first scenario. The steps' loads are
    multiples of the first measurement, so a VM whose speed moved within the run makes them mean other
    multiples: the reader needs the second figure to tell a controller's result from the machine's."""
    after = cap.get("budget_rps_after")
    if after is None or not cap.get("budget_rps"):
        return None
    return (
        f"Capacity at the budget measured again after the accuracy-first scenario: {after:.0f} req/s, "
        f"{after / cap['budget_rps']:.2f}× the first measurement (server CPU per request "
        f"{format_number(cap.get('budget_cpu_ms_per_request_after'), '{:.3f}')} ms against "
        f"{format_number(cap.get('budget_cpu_ms_per_request'), '{:.3f}')} ms): far from 1× means the VM's speed "
        "moved within the run."
    )


def slo_section(doc: dict[str, Any], image: str | None) -> list[str]:
    """The markdown section of the slo suite."""
    r = doc["result"]
    st = r["settings"]
    lines = [
        "## Live traffic: SLO mode and the live MAC budget (open loop)",
        "",
        f"Open-loop Poisson arrivals (bench.openloop), latency from the scheduled arrival. Accuracy first: global "
        f"budget max_accuracy_drop={st['budget_drop']:g}, latency target {st['latency_target_ms']:g} ms, floor "
        f"{st['floor']:g}; steps of {st['step_s']:g} s at "
        + ", ".join(f"{f:g}" for f in st["steps"])
        + " × the capacity measured in the same run (closed loop, "
        f"{st['capacity_clients']} clients). Servers run one after the other on the same CPUs and schedule. "
        "Generator lag: how late the load generator itself sent a request (part of its latency). Connections "
        "opened: by the generator during the step (HTTP/1.1 carries one request at a time, so each extra "
        "request in flight needs one; a step up in load opens them in a burst). Server CPU per "
        "answer and mean stage-1 batch: read at the step boundaries from /proc and /metrics (– where the "
        "server refused the scrape, at its connection limit); VM steal: the share of the machine's CPU time "
        "the hypervisor gave to others during the step (/proc/stat).",
        "",
    ]
    cap = r.get("capacity")
    if cap:
        lines += [
            f"Capacity at the budget: {cap['budget_rps']:.0f} req/s; at the floor (max_accuracy_drop={st['floor']:g}): "
            f"{cap['floor_rps']:.0f} req/s; floor ÷ budget = {cap['floor_over_budget']:.2f}× (how much overload "
            "accuracy scaling can absorb on this model and CPU).",
            "",
        ]
        again = capacity_again(cap)
        if again:
            lines += [again, ""]
    refusal = r.get("refusal_cost")
    if refusal:

        def cost(variant: dict[str, Any]) -> str:
            low, high = (format_number(v, "{:.3f}") for v in variant["cpu_ms_per_refusal_range"])
            return f"{format_number(variant['cpu_ms_per_refusal'], '{:.3f}')} ms [{low}–{high}]"

        served = (cap or {}).get("floor_cpu_ms_per_request")
        lines += [
            "What a refusal costs (bench.shedding_app: the service in SLO mode told to shed every request, "
            f"closed loop, {st['capacity_clients']} clients, median [range] of interleaved rounds): server CPU per "
            f"429 refused at the request head {cost(refusal['head_gate'])}, through ASGI admission "
            f"{cost(refusal['asgi'])}; per answered request at the floor {format_number(served, '{:.3f}')} ms "
            "(the floor capacity run).",
            "",
        ]
    lines += [
        "| server | load × cap | offered req/s | served req/s | p50 ms | p99 ms | shed | degraded "
        "| mean allowed drop served | accuracy | loss vs all stages | over target | generator lag p99 ms "
        "| connections opened | server CPU ms per answer | mean stage-1 batch | VM steal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sc in (r.get("accuracy_first") or {}).items():
        for s in sc["steps"]:
            loss = s.get("loss_vs_all_stages")
            lines.append(
                f"| {name} | {s['load']:g} | {s['offered_rps']:.0f} | {s['served_rps']:.0f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {100 * s['shed_share']:.2f} % | {100 * (s['degraded_share'] or 0):.1f} % "
                f"| {format_number(s.get('allowed_drop_mean'), '{:.2f} %', 100)} "
                f"| {100 * s['accuracy']:.2f} % | {'–' if loss is None else f'{100 * loss:.2f} pp'} "
                f"| {s['over_target']} | {format_number(s.get('send_lag_p99_ms'), '{:.1f}')} "
                f"| {'–' if s.get('new_connections') is None else s['new_connections']} "
                f"| {format_number(s.get('server_cpu_ms_per_answer'), '{:.3f}')} "
                f"| {format_number(s.get('stage1_batch_mean'), '{:.1f}')} "
                f"| {format_number(s.get('steal_share'), '{:.1f} %', 100)} |"
            )
    for name, sc in (r.get("accuracy_first") or {}).items():
        shadow = sc.get("shadow")
        lines.append("")
        lines.append(
            f"- {name}: {sc['violations']} SLO-violating requests (shed, failed or over target) of {sc['arrivals']}; "
            + (
                "shadow monitor: not exported by this server"
                if not shadow
                else f"shadow monitor: {shadow['disagreements']:.0f} disagreements in {shadow['samples']:.0f} samples"
                f" ({100 * shadow['rate']:.2f} %)"
            )
        )
    drift = r.get("drift")
    if drift:
        lines += [
            "",
            f"Drift: global budget_macs = {r['drift_budget_macs'] / 1e6:.2f} M (held-out cost of max_accuracy_drop="
            f"{st['drift_budget_drop']:g}); {st['drift_phases_s'][0]:g} s of the whole test split then "
            f"{st['drift_phases_s'][1]:g} s of its hardest third ({drift['hard_images']} images), open loop at "
            f"{st['drift_load']:g} × capacity; settled = phase 2 after {st['drift_settle_s']:g} s.",
            "",
            "| server | MACs / budget, phase 1 | MACs / budget, phase 2 settled | images settled | accuracy phase 1 "
            "| accuracy phase 2 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("drift_static", "drift_live"):
            if name in drift:
                d = drift[name]
                lines.append(
                    f"| {name} | {d['phase1_macs_over_budget']:.3f} | {d['settled_macs_over_budget']:.3f} "
                    f"| {d['settled_images']} | {100 * d['phase_accuracy'][0]:.2f} % "
                    f"| {100 * d['phase_accuracy'][1]:.2f} % |"
                )
    noise = r.get("mac_noise")
    if noise:
        lines += [
            "",
            "Noise of the live MAC average (held-out exit fractions of budget_macs; relative standard error "
            "of the controller's EWMA over its default window of 2,000 images):",
            "",
            "| budget_macs / full | cv of per-image MACs | relative s.e. at 2,000 images |",
            "|---:|---:|---:|",
            *[f"| {n['budget_share']:g} | {n['cv']:.2f} | {100 * n['relative_se']:.1f} % |" for n in noise],
        ]
    if image:
        lines += ["", f"![slo]({image})"]
    return lines
