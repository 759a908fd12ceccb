"""Calibration: per-exit confidence and correctness of the *serving engine* on held-out data.

Why the engine and not torch: thresholds are chosen on these confidences, and they are applied
to what ONNX Runtime computes at serving time. Running the very graphs, session options and
wiring the service uses (`service.core.engine.Engine.run_all_stages`) means a threshold never sits on
the wrong side of a float32 difference between torch and ORT, and any engine wiring bug shows up
here (cross-checked against torch on the first batch) rather than in production. For the same
reason the confidence is `service.core.exit_rule.max_softmax`, the function serving uses: the
stored confidences are bitwise what serving computes for the same logits, so an image sitting
exactly on a threshold exits when served as it did in calibration.

Arrays (see service/core/artifact.py), E exits, n samples:
  {split}_confidence (E, n) float32  max softmax of the cumulative logits F_k (exit_rule.max_softmax)
  {split}_correct    (E, n) bool     argmax F_k == label
  {split}_labels     (n,)   int64
for split "heldout" (the split the checkpoint was *not* trained on, reproduced with the seed the
checkpoint recorded) and optionally "test" (for reports).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError, ParityError
from service.core.artifact import Manifest
from service.core.exit_rule import max_softmax

Batch = tuple[np.ndarray, np.ndarray]  # images (B, C, H, W) float32, labels (B,) int64
Reference = Callable[[np.ndarray], Sequence[np.ndarray]]


@dataclass
class SplitResult:
    """Per-exit confidence/correctness of one split, as the npz stores it."""

    confidence: np.ndarray  # (E, n) float32
    correct: np.ndarray  # (E, n) bool
    labels: np.ndarray  # (n,) int64

    @property
    def accuracy(self) -> list[float]:
        return [float(a) for a in self.correct.mean(axis=1)]

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        return {
            f"{split}_confidence": self.confidence,
            f"{split}_correct": self.correct,
            f"{split}_labels": self.labels,
        }


@dataclass
class EngineCrossCheck:
    """Max |engine - torch| on the cumulative logits of one real batch, per exit."""

    batch_size: int
    max_abs_logits: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "max_abs_logits": self.max_abs_logits}


def make_engine(manifest: Manifest, artifacts_dir: Path, threads: int = 1) -> Any:
    """The serving engine on an artifact directory (imported lazily: it needs onnxruntime)."""
    try:
        from service.core.engine import Engine
    except ImportError as exc:  # pragma: no cover - the engine ships with the service
        raise ExportError(f"cannot import the serving engine (service.core.engine.Engine): {exc}") from exc
    try:
        return Engine(manifest, artifacts_dir, intra_op_threads=threads, inter_op_threads=1)
    except TypeError:
        # Tolerate an engine whose thread keywords differ; calibration results do not depend on them.
        return Engine(manifest, artifacts_dir)


def run_split(
    engine: Any,
    batches: Iterable[Batch],
    num_exits: int,
    *,
    progress: Callable[[int], None] | None = None,
    reference: Reference | None = None,
    tolerance: float = 1e-4,
) -> tuple[SplitResult, EngineCrossCheck | None]:
    """Run every batch through `engine.run_all_stages`; cross-check the first batch with torch."""
    confidences: list[list[np.ndarray]] = [[] for _ in range(num_exits)]
    corrects: list[list[np.ndarray]] = [[] for _ in range(num_exits)]
    labels_all: list[np.ndarray] = []
    check: EngineCrossCheck | None = None
    for images, labels in batches:
        images = np.ascontiguousarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        logits = [np.asarray(x) for x in engine.run_all_stages(images)]
        if len(logits) != num_exits:
            raise ExportError(f"engine returned {len(logits)} exits, manifest has {num_exits}")
        if reference is not None and check is None:
            check = cross_check(logits, reference(images), tolerance)
        for k, z in enumerate(logits):
            if z.shape[0] != len(labels):
                raise ExportError(f"engine exit {k + 1} returned {z.shape[0]} rows for {len(labels)} images")
            confidences[k].append(max_softmax(z))
            corrects[k].append(z.argmax(axis=-1) == labels)
        labels_all.append(labels)
        if progress is not None:
            progress(len(labels))
    if not labels_all:
        raise ExportError("calibration split is empty")
    result = SplitResult(
        confidence=np.stack([np.concatenate(c) for c in confidences]).astype(np.float32),
        correct=np.stack([np.concatenate(c) for c in corrects]).astype(bool),
        labels=np.concatenate(labels_all).astype(np.int64),
    )
    return result, check


def cross_check(
    engine_logits: Sequence[np.ndarray], torch_logits: Sequence[np.ndarray], tolerance: float
) -> EngineCrossCheck:
    """Engine vs torch on one batch; raises ParityError beyond the tolerance."""
    if len(engine_logits) != len(torch_logits):
        raise ParityError(f"engine has {len(engine_logits)} exits, torch {len(torch_logits)}")
    errors: list[float] = []
    for a, b in zip(engine_logits, torch_logits, strict=True):
        b = np.asarray(b)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            errors.append(float("inf"))
        else:
            errors.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    check = EngineCrossCheck(batch_size=int(engine_logits[0].shape[0]), max_abs_logits=errors)
    if max(errors) > tolerance:
        raise ParityError(
            f"serving engine does not match torch within {tolerance:g} on a real batch: "
            f"max abs per exit {[f'{e:.2e}' for e in errors]}"
        )
    return check
