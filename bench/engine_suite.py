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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TARGET_DROP, Artifact, Progress, thresholds_for_drop
from bench.data import TestSet, preprocess
from bench.stats import percentiles, safe_ratio, spread

MODES: tuple[str, ...] = ("early_exit", "all_stages", "full_onnx")


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


def run_engine(
    artifact: Artifact, test: TestSet, settings: EngineSettings, workdir: Path, progress: Progress
) -> dict[str, Any]:
    """Measure every (batch size, mode) cell; returns the suite's JSON body."""
    spec = artifact.manifest.preprocessing
    subset = test.head(settings.images)
    x = preprocess(
        subset.images,
        height=spec.height,
        width=spec.width,
        channels=spec.channels,
        mean=list(spec.mean),
        std=list(spec.std),
        input_scale=spec.input_scale,
        resize=spec.resize,
    )
    thresholds = thresholds_for_drop(artifact, settings.drop)
    engine = build_engine(artifact, settings)
    session, full_info = build_full_session(artifact, settings, workdir)
    macs = artifact.cumulative_macs

    # Correctness first: the three modes must agree on what they compute.
    probe = x[: min(64, len(x))]
    all_logits = engine.run_all_stages(probe)
    parity: dict[str, Any] = {}
    if session is not None:
        full_logits = session.run(["logits"], {"image": probe})[0]
        parity["full_onnx_vs_all_stages_max_abs_diff"] = float(np.abs(full_logits - all_logits[-1]).max())
    early = engine.classify(probe, thresholds)
    early_exits = np.asarray([_exit_of(r) for r in early])
    expected = np.stack(all_logits)[early_exits, np.arange(len(probe))].argmax(axis=-1)
    parity["early_exit_label_mismatches"] = int((expected != _labels_of(early)).sum())

    exit_counts = np.zeros(artifact.manifest.num_stages, dtype=np.int64)

    def early_exit(batch: np.ndarray) -> None:
        results = engine.classify(batch, thresholds)
        np.add.at(exit_counts, [_exit_of(r) for r in results], 1)

    def all_stages(batch: np.ndarray) -> None:
        engine.run_all_stages(batch)

    def full_onnx(batch: np.ndarray) -> None:
        session.run(["logits"], {"image": batch})

    modes: dict[str, Callable[[np.ndarray], None]] = {"early_exit": early_exit, "all_stages": all_stages}
    if session is not None:
        modes["full_onnx"] = full_onnx
    names = list(modes)

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
            exit_counts[:] = 0
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
            ee_images = max(int(exit_counts.sum()), 1)
            avg_macs = float((exit_counts * macs).sum() / ee_images)
            for mode in names:
                lat_ms = np.asarray(per_mode[mode]["lat"]) * 1e3
                cells.append(
                    {
                        "batch_size": batch_size,
                        "mode": mode,
                        "images_per_s": spread(per_mode[mode]["ips"]),
                        "cpu_ms_per_image": spread(per_mode[mode]["cpu"]),
                        "latency_ms": {
                            **percentiles(lat_ms),
                            "mean": float(lat_ms.mean()),
                            "calls": int(lat_ms.size),
                        },
                        "avg_macs": avg_macs if mode == "early_exit" else artifact.full_macs,
                        "exit_fractions": (exit_counts / ee_images).tolist() if mode == "early_exit" else None,
                    }
                )
    stage_costs = _stage_costs(engine, artifact, x, settings)
    speedups = []
    for batch_size in settings.batch_sizes:
        by_mode = {c["mode"]: c for c in cells if c["batch_size"] == batch_size}
        ee = by_mode["early_exit"]["images_per_s"]["median"]
        speedups.append(
            {
                "batch_size": batch_size,
                "early_exit_vs_all_stages": safe_ratio(ee, by_mode["all_stages"]["images_per_s"]["median"]),
                "early_exit_vs_full_onnx": safe_ratio(
                    ee, by_mode["full_onnx"]["images_per_s"]["median"] if "full_onnx" in by_mode else None
                ),
                "all_stages_vs_full_onnx": safe_ratio(
                    by_mode["all_stages"]["images_per_s"]["median"],
                    by_mode["full_onnx"]["images_per_s"]["median"] if "full_onnx" in by_mode else None,
                ),
                "mac_ideal": safe_ratio(artifact.full_macs, by_mode["early_exit"]["avg_macs"]),
            }
        )
    return {
        "artifacts": str(artifact.path),
        "model": artifact.manifest.name,
        "version": artifact.manifest.version,
        "images": len(x),
        "thresholds": thresholds,
        "drop": settings.drop,
        "engine_providers": list(getattr(engine, "providers", []) or []),
        "full_network": full_info,
        "parity": parity,
        "cells": cells,
        "speedups": speedups,
        "stage_costs": stage_costs,
    }


def _stage_costs(engine: Any, artifact: Artifact, x: np.ndarray, settings: EngineSettings) -> list[dict[str, Any]]:
    """Per-stage wall time per image (all stages, every batch size) next to the stage's MACs.

    Why: the MAC-ideal speedup assumes time ∝ MACs; per-stage µs per MMAC shows where that breaks
    (fixed per-run costs of small stages, cache effects of large batches).
    """
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
                    "stage": stage.index + 1,
                    "ms_per_image": ms,
                    "macs": stage.macs,
                    "us_per_mmac": 1e3 * ms / (stage.macs / 1e6) if stage.macs else math.nan,
                }
            )
    return out
