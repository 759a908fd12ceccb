"""Engine suite: images/s and latency per batch size, in one process, without HTTP.

Three ways to classify the same preprocessed test images:
  - early_exit:  `Engine.classify(images, thresholds)` at the ≤1 % accuracy-drop budget,
  - all_stages:  `Engine.run_all_stages(images)` (the same engine, nobody leaves early),
  - full_onnx:   ONE plain ONNX Runtime session over the stage graphs chained into a single model
                 (bench.fullgraph) — what a user without boostserve would deploy.
Runs are interleaved (round r runs every mode once, the order rotating each round) so slow
drifts of a shared machine hit all modes alike; each mode sees the same image chunks in the
same order within a round. Reported: median images/s over rounds with min/max, and pooled
per-call latency percentiles.

Precisions: when an int8 version of the artifact sits beside it (`<DIR>_int8`, what
`boostserve quantize --artifacts DIR` writes; the embedded model's is `service/embedded_model_int8`,
the served default), or the artifact is such an int8 version with its fp32 source beside it (the
bench's default), the same three modes run on both, in the same rounds (`early_exit_int8`, `all_stages_int8`,
`full_onnx_int8`), each with thresholds chosen on its own held-out calibration. Plain mode names
are the fp32 artifact's, so the fp32 full network stays the reference "what a user runs today".

Time-ideal (per precision and batch size): all-stages time ÷ Σ_k f_k C_k, with f_k the measured
early-exit fractions and C_k the cumulative *measured* stage time per image (engine stage timers,
all stages run at that batch size). It is the early-exit speed-up the hardware allows if nothing
but the stages cost anything; MAC-ideal (full MACs ÷ average MACs) assumes time ∝ MACs, which the
per-stage µs/MMAC shows is not true, and is kept as information.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TARGET_DROP, Artifact, Progress, load_artifact, simulate_exits, thresholds_for_drop
from bench.data import TestSet, preprocess
from bench.stats import percentiles, safe_ratio, spread

MODES: tuple[str, ...] = ("early_exit", "all_stages", "full_onnx")
#: Mode-name suffix of each precision's cells: plain names are the fp32 artifact's.
SUFFIX: dict[str, str] = {"fp32": "", "int8": "_int8"}


def preprocessed(artifact: Artifact, test: TestSet) -> np.ndarray:
    """(n, C, H, W) float32 of the test images, preprocessed as the artifact's manifest says."""
    spec = artifact.manifest.preprocessing
    return preprocess(
        test.images,
        height=spec.height,
        width=spec.width,
        channels=spec.channels,
        mean=list(spec.mean),
        std=list(spec.std),
        input_scale=spec.input_scale,
        resize=spec.resize,
    )


def int8_variant(path: Path) -> Path | None:
    """The int8 artifact beside `path` (`<path>_int8`, `boostserve quantize`'s default), if there is one."""
    candidate = path.with_name(f"{path.name}_int8")
    return candidate if (candidate / "manifest.json").is_file() else None


def fp32_source(artifact: Artifact) -> Path | None:
    """The fp32 artifact an int8 one was quantized from, when it sits beside it (`DIR` for `DIR_int8`)
    and is the version its provenance records; None for an artifact that is not a quantized one.

    Why: the served default is the int8 embedded model, and the engine suite measures it against
    its fp32 source (the reference "what a user runs today"), whichever of the two it is given.
    """
    from service.core.artifact import load_manifest

    quantization = (artifact.manifest.provenance.model_extra or {}).get("quantization")
    name = artifact.path.name
    if not isinstance(quantization, dict) or not name.endswith("_int8"):
        return None
    candidate = artifact.path.with_name(name.removesuffix("_int8"))
    if not (candidate / "manifest.json").is_file():
        return None
    source = quantization.get("source") or {}
    # The version only (the caller loads and verifies the artifact it picks): no second full load.
    return candidate if load_manifest(candidate, verify=False).version == source.get("version") else None


def mode_name(mode: str, precision: str) -> str:
    return f"{mode}{SUFFIX[precision]}"


def time_ideal(stage_ms: list[float], exit_fractions: list[float]) -> float:
    """All-stages time ÷ expected early-exit time: C_N / Σ_k f_k C_k, C_k = Σ_{j<=k} stage_ms[j]."""
    cumulative = np.cumsum(np.asarray(stage_ms, dtype=np.float64))  # (E,)
    expected = float(np.dot(np.asarray(exit_fractions, dtype=np.float64), cumulative))
    return float(cumulative[-1] / expected) if expected > 0 else math.nan


@dataclass(frozen=True)
class EngineSettings:
    batch_sizes: tuple[int, ...]
    rounds: int
    round_seconds: float
    min_calls: int
    max_calls: int
    images: int
    intra_op_threads: int
    inter_op_threads: int
    providers: list[str] | None
    drop: float = TARGET_DROP


def _exit_of(result: Any) -> int:
    """0-based exit index of one engine result, whatever the result type calls it."""
    for attr in ("exit_index", "stage", "exit"):
        value = getattr(result, attr, None)
        if value is not None:
            return int(value) - (1 if attr == "exit" else 0)
    if isinstance(result, dict):
        return int(result["exit"]) - 1
    raise TypeError(f"cannot read the exit of {type(result).__name__}")


def _labels_of(results: Any) -> np.ndarray:
    """Predicted class index of each engine result (argmax of the cumulative logits at its exit)."""
    return np.asarray([int(np.argmax(r.logits)) for r in results])


def build_engine(artifact: Artifact, settings: EngineSettings) -> Any:
    """The serving engine with the bench's thread settings (kwargs per docs/architecture.md)."""
    from service.core.engine import Engine

    engine = Engine(
        artifact.manifest,
        artifact.path,
        providers=settings.providers,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )
    warm = getattr(engine, "warmup", None)
    if callable(warm):
        warm()
    return engine


def build_full_session(artifact: Artifact, settings: EngineSettings, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """(session or None, info): the chained full-network ORT session, or why there is none."""
    import onnxruntime as ort

    from bench.fullgraph import FullGraphUnavailable, build_full_network

    try:
        path = build_full_network(artifact.manifest, artifact.path, workdir / "full_network.onnx")
    except FullGraphUnavailable as exc:
        return None, {"available": False, "reason": str(exc)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same session options as service.core.engine (no spinning), so only the graph layout differs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = settings.providers or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    return session, {
        "available": True,
        "bytes": path.stat().st_size,
        "providers": session.get_providers(),
        "construction": "stage graphs chained with onnx (bench.fullgraph), only the final logits output",
    }


@dataclass
class _Variant:
    """One precision's artifact, engine, full-network session and early-exit thresholds."""

    precision: str
    artifact: Artifact
    engine: Any
    session: Any
    full_info: dict[str, Any]
    thresholds: list[float]
    exit_counts: np.ndarray  # (E,) early-exit images per exit in the current batch size


def _variant(precision: str, artifact: Artifact, settings: EngineSettings, workdir: Path) -> _Variant:
    session, info = build_full_session(artifact, settings, workdir / precision)
    return _Variant(
        precision=precision,
        artifact=artifact,
        engine=build_engine(artifact, settings),
        session=session,
        full_info=info,
        thresholds=thresholds_for_drop(artifact, settings.drop),
        exit_counts=np.zeros(artifact.manifest.num_stages, dtype=np.int64),
    )


def _parity(v: _Variant, probe: np.ndarray) -> dict[str, Any]:
    """The three modes of one precision must agree on what they compute."""
    all_logits = v.engine.run_all_stages(probe)
    parity: dict[str, Any] = {}
    if v.session is not None:
        full_logits = v.session.run(["logits"], {"image": probe})[0]
        parity["full_onnx_vs_all_stages_max_abs_diff"] = float(np.abs(full_logits - all_logits[-1]).max())
    early = v.engine.classify(probe, v.thresholds)
    early_exits = np.asarray([_exit_of(r) for r in early])
    expected = np.stack(all_logits)[early_exits, np.arange(len(probe))].argmax(axis=-1)
    parity["early_exit_label_mismatches"] = int((expected != _labels_of(early)).sum())
    return parity


def _modes(v: _Variant) -> dict[str, Callable[[np.ndarray], None]]:
    engine, thresholds, counts, session = v.engine, v.thresholds, v.exit_counts, v.session

    def early_exit(batch: np.ndarray) -> None:
        results = engine.classify(batch, thresholds)
        np.add.at(counts, [_exit_of(r) for r in results], 1)

    def all_stages(batch: np.ndarray) -> None:
        engine.run_all_stages(batch)

    def full_onnx(batch: np.ndarray) -> None:
        session.run(["logits"], {"image": batch})

    modes: dict[str, Callable[[np.ndarray], None]] = {
        mode_name("early_exit", v.precision): early_exit,
        mode_name("all_stages", v.precision): all_stages,
    }
    if session is not None:
        modes[mode_name("full_onnx", v.precision)] = full_onnx
    return modes


def _accuracy(artifact: Artifact, thresholds: list[float]) -> dict[str, Any] | None:
    """Test-split accuracy of these thresholds and of all stages, from the calibration arrays (engine-computed)."""
    test = artifact.test
    if test is None:
        return None
    early = simulate_exits(test.confidence, test.correct, thresholds, artifact.cumulative_macs)
    return {
        "early_exit": early["accuracy"],
        "all_stages": float(np.asarray(test.correct)[-1].mean()),
        "per_exit": [float(a) for a in np.asarray(test.correct).mean(axis=1)],
        "exit_fractions_test": early["exit_fractions"],
    }


def run_engine(
    artifact: Artifact,
    test: TestSet,
    settings: EngineSettings,
    workdir: Path,
    progress: Progress,
    int8: Artifact | str | None = "auto",
) -> dict[str, Any]:
    """Measure every (batch size, mode) cell; returns the suite's JSON body.

    int8: the int8 artifact to measure beside `artifact` (fp32); "auto" looks for `<DIR>_int8`, or,
    when `artifact` is itself an int8 artifact with its fp32 source beside it, measures that pair.
    """
    source = fp32_source(artifact) if isinstance(int8, str) else None
    if source is not None:
        artifact, int8 = load_artifact(source), artifact
    x = preprocessed(artifact, test.head(settings.images))
    if isinstance(int8, str):
        found = int8_variant(artifact.path)
        int8 = load_artifact(found) if found is not None else None
    variants = [_variant("fp32", artifact, settings, workdir)]
    if int8 is not None:
        variants.append(_variant("int8", int8, settings, workdir))
    probe = x[: min(64, len(x))]
    parity = {v.precision: _parity(v, probe) for v in variants}
    modes: dict[str, Callable[[np.ndarray], None]] = {}
    for v in variants:
        modes.update(_modes(v))
    names = list(modes)
    precision_of = {mode_name(m, v.precision): v for v in variants for m in MODES}

    cells: list[dict[str, Any]] = []
    total = len(settings.batch_sizes) * settings.rounds * len(names)
    with progress.task("engine", total) as advance:
        for batch_size in settings.batch_sizes:
            n_chunks = max(1, len(x) // batch_size)
            chunks = [x[i * batch_size : (i + 1) * batch_size] for i in range(n_chunks)]
            if len(chunks[0]) < batch_size:  # fewer images than one batch: tile them
                reps = -(-batch_size // len(x))
                chunks = [np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size])]
            for fn in modes.values():  # one untimed call per mode and batch shape
                fn(chunks[0])
            per_mode: dict[str, dict[str, list[float]]] = {m: {"ips": [], "lat": [], "cpu": []} for m in names}
            for v in variants:
                v.exit_counts[:] = 0
            start_chunk = 0
            for r in range(settings.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                calls_this_round = 0
                for mode in order:
                    fn = modes[mode]
                    lat: list[float] = []
                    cpu0 = time.process_time()
                    deadline = time.perf_counter() + settings.round_seconds
                    calls = 0
                    while calls < settings.max_calls and (calls < settings.min_calls or time.perf_counter() < deadline):
                        batch = chunks[(start_chunk + calls) % len(chunks)]
                        t0 = time.perf_counter()
                        fn(batch)
                        lat.append(time.perf_counter() - t0)
                        calls += 1
                    # CPU ms per image (all threads of this process): robust to a busy machine.
                    per_mode[mode]["cpu"].append(1e3 * (time.process_time() - cpu0) / (calls * batch_size))
                    per_mode[mode]["ips"].append(calls * batch_size / sum(lat))
                    per_mode[mode]["lat"].extend(lat)
                    calls_this_round = max(calls_this_round, calls)
                    advance(1, f"batch {batch_size} {mode}")
                start_chunk += calls_this_round
            for mode in names:
                v = precision_of[mode]
                ee_images = max(int(v.exit_counts.sum()), 1)
                early = mode == mode_name("early_exit", v.precision)
                lat_ms = np.asarray(per_mode[mode]["lat"]) * 1e3
                cells.append(
                    {
                        "batch_size": batch_size,
                        "mode": mode,
                        "precision": v.precision,
                        "images_per_s": spread(per_mode[mode]["ips"]),
                        "cpu_ms_per_image": spread(per_mode[mode]["cpu"]),
                        "latency_ms": {
                            **percentiles(lat_ms),
                            "mean": float(lat_ms.mean()),
                            "calls": int(lat_ms.size),
                        },
                        "avg_macs": float((v.exit_counts * v.artifact.cumulative_macs).sum() / ee_images)
                        if early
                        else v.artifact.full_macs,
                        "exit_fractions": (v.exit_counts / ee_images).tolist() if early else None,
                    }
                )
    stage_costs = [c for v in variants for c in _stage_costs(v, x, settings)]
    speedups = [_speedups(cells, stage_costs, v, b) for b in settings.batch_sizes for v in variants]
    fp32 = variants[0]
    frontiers = {v.precision: _frontier(v, stage_costs, FRONTIER_BATCH) for v in variants}
    return {
        "artifacts": str(artifact.path),
        "model": artifact.manifest.name,
        "version": artifact.manifest.version,
        "images": len(x),
        "thresholds": fp32.thresholds,
        "drop": settings.drop,
        "engine_providers": list(getattr(fp32.engine, "providers", []) or []),
        "full_network": fp32.full_info,
        "parity": parity["fp32"],
        "precisions": {
            v.precision: {
                "artifacts": str(v.artifact.path),
                "version": v.artifact.manifest.version,
                "stage_precisions": list(v.artifact.manifest.precisions),
                "thresholds": v.thresholds,
                "full_network": v.full_info,
                "parity": parity[v.precision],
                "test_accuracy": _accuracy(v.artifact, v.thresholds),
                "batching": _batching(cells, v.precision),
                "frontier": frontiers[v.precision],
            }
            for v in variants
        },
        "frontier_batch": FRONTIER_BATCH,
        # fp32's frontier points against the best int8 point of no greater cost (the shipping decision).
        "equal_cost": equal_cost(frontiers["fp32"], frontiers["int8"]) if "int8" in frontiers else [],
        "cells": cells,
        "speedups": speedups,
        "stage_costs": stage_costs,
    }


#: Accuracy-drop budgets of the cost frontier (accuracy vs measured time per image) per precision.
FRONTIER_DROPS: tuple[float, ...] = (0.0, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05)
#: Batch size whose measured stage times price the frontier (a loaded server's stage-1 batch).
FRONTIER_BATCH = 32


def _frontier(v: _Variant, costs: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Test accuracy vs expected ms per image of the max_accuracy_drop thresholds (held-out chosen).

    Cost = Σ_k f_k C_k: the test split's exit fractions on this precision's cumulative measured
    stage times at `batch_size`; it prices what the served thresholds spend, so two precisions can
    be compared at equal cost.
    """
    test = v.artifact.test
    stage_ms = [c["ms_per_image"] for c in costs if c["precision"] == v.precision and c["batch_size"] == batch_size]
    if test is None or v.artifact.heldout is None or len(stage_ms) != v.artifact.manifest.num_stages:
        return []
    cumulative = np.cumsum(stage_ms)  # (E,)
    points = []
    for drop in FRONTIER_DROPS:
        thresholds = thresholds_for_drop(v.artifact, drop)
        early = simulate_exits(test.confidence, test.correct, thresholds, v.artifact.cumulative_macs)
        points.append(
            {
                "drop": drop,
                "test_accuracy": early["accuracy"],
                "ms_per_image": float(np.dot(early["exit_fractions"], cumulative)),
                "avg_macs": early["macs"],
                "exit_fractions": early["exit_fractions"],
            }
        )
    return points


def equal_cost(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each reference point, the most accurate `other` point that costs no more time per image."""
    out = []
    for point in reference:
        affordable = [q for q in other if q["ms_per_image"] <= point["ms_per_image"]]
        best = max(affordable, key=lambda q: q["test_accuracy"], default=None)
        out.append(
            {
                "drop": point["drop"],
                "ms_per_image": point["ms_per_image"],
                "reference_accuracy": point["test_accuracy"],
                "other_accuracy": best["test_accuracy"] if best else None,
                "other_ms_per_image": best["ms_per_image"] if best else None,
                "other_drop": best["drop"] if best else None,
            }
        )
    return out


def _median(cells: list[dict[str, Any]], batch_size: int, mode: str) -> float | None:
    for c in cells:
        if c["batch_size"] == batch_size and c["mode"] == mode:
            return float(c["images_per_s"]["median"])
    return None


def _speedups(cells: list[dict[str, Any]], costs: list[dict[str, Any]], v: _Variant, batch_size: int) -> dict[str, Any]:
    """Ratios of one precision at one batch size, with the MAC- and time-ideal early-exit speed-ups."""
    p = v.precision
    ee = _median(cells, batch_size, mode_name("early_exit", p))
    cell = next(c for c in cells if c["batch_size"] == batch_size and c["mode"] == mode_name("early_exit", p))
    stage_ms = [c["ms_per_image"] for c in costs if c["precision"] == p and c["batch_size"] == batch_size]
    ideal = time_ideal(stage_ms, cell["exit_fractions"]) if stage_ms else math.nan
    vs_all = safe_ratio(ee, _median(cells, batch_size, mode_name("all_stages", p)))
    return {
        "batch_size": batch_size,
        "precision": p,
        "early_exit_vs_all_stages": vs_all,
        "early_exit_vs_full_onnx": safe_ratio(ee, _median(cells, batch_size, mode_name("full_onnx", p))),
        "early_exit_vs_fp32_full_onnx": safe_ratio(ee, _median(cells, batch_size, "full_onnx")),
        "all_stages_vs_full_onnx": safe_ratio(
            _median(cells, batch_size, mode_name("all_stages", p)),
            _median(cells, batch_size, mode_name("full_onnx", p)),
        ),
        "mac_ideal": safe_ratio(v.artifact.full_macs, cell["avg_macs"]),
        "time_ideal": ideal,
        "of_time_ideal": safe_ratio(vs_all, ideal),
    }


def _batching(cells: list[dict[str, Any]], precision: str) -> list[dict[str, Any]]:
    """images/s at each batch size ÷ batch 1 (the most cross-request batching can give), per mode."""
    sizes = sorted({c["batch_size"] for c in cells})
    out = []
    for mode in MODES:
        name = mode_name(mode, precision)
        one = _median(cells, sizes[0], name)
        for b in sizes[1:]:
            out.append(
                {"mode": name, "batch_size": b, "vs_batch": sizes[0], "ratio": safe_ratio(_median(cells, b, name), one)}
            )
    return out


def _stage_costs(v: _Variant, x: np.ndarray, settings: EngineSettings) -> list[dict[str, Any]]:
    """Per-stage wall time per image (all stages, every batch size) next to the stage's MACs.

    Why: the MAC-ideal speedup assumes time ∝ MACs; per-stage µs per MMAC shows where that breaks
    (fixed per-run costs of small stages, cache effects of large batches).
    """
    engine, artifact = v.engine, v.artifact
    stats_of = getattr(engine, "stage_stats", None)
    reset = getattr(engine, "reset_stats", None)
    if not callable(stats_of) or not callable(reset):
        return []
    out = []
    for batch_size in settings.batch_sizes:
        batch = x[:batch_size] if len(x) >= batch_size else np.resize(x, (batch_size, *x.shape[1:]))
        engine.run_all_stages(batch)  # warm this shape
        reset()
        deadline = time.perf_counter() + max(0.2, settings.round_seconds / 2)
        calls = 0
        while calls < 3 or time.perf_counter() < deadline:
            engine.run_all_stages(batch)
            calls += 1
        for stage, counters in zip(artifact.manifest.stages, stats_of(), strict=True):
            ms = 1e3 * counters.seconds / max(counters.items, 1)
            out.append(
                {
                    "batch_size": batch_size,
                    "precision": v.precision,
                    "stage": stage.index + 1,
                    "ms_per_image": ms,
                    "macs": stage.macs,
                    "us_per_mmac": 1e3 * ms / (stage.macs / 1e6) if stage.macs else math.nan,
                }
            )
    return out
