"""Recalibrate an existing artifact: rewrite calibration.npz through the serving engine, no retraining.

Why: the stored confidences must be bit for bit what serving computes (service.core.exit_rule),
or an image sitting exactly on a calibrated threshold lands on the other side of it when served.
An artifact calibrated by an older rule (float64 softmax, then cast) is fixed by re-running its
held-out and test splits through the same graphs with the current rule; the graphs, the split and
therefore the correctness arrays must not change, and that is checked:

* the splits are reproduced from the manifest's provenance (dataset kind, held-out size, split
  seed) and must hash to what the export recorded (provenance.dataset.*_sha256);
* labels and per-exit correctness must equal the stored ones (only confidences may move).

The result is written deterministically (byte-reproducible npz, no timestamps): a new
calibration sha256 and so a new content version; provenance.recalibration records the previous
version and calibration hash. An artifact already calibrated with the serving rule is left as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.calibrate import SplitResult, make_engine, run_split
from export.errors import ExportError
from export.pipeline import ARTIFACT_FILE_MODE, HashingBatches, dataset_batches, validated_manifest
from export.source import SplitSettings, load_export_data
from service.core.artifact import (
    Manifest,
    load_manifest,
    save_calibration_npz,
    sha256_file,
    write_manifest,
)

#: What provenance.recalibration names as the confidence now stored.
CONFIDENCE_RULE = "service.core.exit_rule.max_softmax (float32 softmax, as served)"


@dataclass(frozen=True)
class SplitChange:
    """How one split's stored confidences compare with the serving rule's."""

    split: str
    confidences: int  # E * n values compared
    changed: int  # values whose bits differ
    max_abs_change: float


@dataclass(frozen=True)
class RecalibrationResult:
    manifest: Manifest  # the manifest now on disk (unchanged when nothing changed)
    previous_version: str
    changes: tuple[SplitChange, ...]
    written: bool


def _stored(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: np.asarray(data[key]) for key in data.files}


def _compare(split: str, old: dict[str, np.ndarray], new: SplitResult) -> SplitChange:
    """Refuse anything but a confidence change; count the confidences whose bits moved."""
    if not np.array_equal(old[f"{split}_labels"], new.labels):
        raise ExportError(f"{split}: labels differ from the stored ones: not the split this artifact was calibrated on")
    if not np.array_equal(old[f"{split}_correct"], new.correct):
        wrong = int(np.count_nonzero(old[f"{split}_correct"] != new.correct))
        raise ExportError(f"{split}: {wrong} per-exit correctness values differ: the engine's logits changed")
    before = np.asarray(old[f"{split}_confidence"], dtype=np.float32)  # (E, n)
    changed = before != new.confidence  # (E, n)
    delta = np.abs(before.astype(np.float64) - new.confidence.astype(np.float64))
    return SplitChange(split, int(before.size), int(np.count_nonzero(changed)), float(delta.max(initial=0.0)))


def recalibrate(
    artifacts_dir: str | Path, data_dir: str | Path, *, batch_size: int = 256, threads: int = 1, write: bool = True
) -> RecalibrationResult:
    """Recompute the artifact's calibration arrays with the serving rule; write them when they differ."""
    root = Path(artifacts_dir)
    manifest = load_manifest(root, verify=True)
    if manifest.calibration is None:
        raise ExportError(f"{root} has no calibration data to recalibrate (export it with --data)")
    recorded = manifest.provenance.dataset
    try:
        split = SplitSettings(recorded.get("kind"), int(recorded["heldout_size"]), int(recorded["split_seed"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{root}: the manifest records no held-out split (provenance.dataset): {exc}") from exc
    pre = manifest.preprocessing
    size, classes = pre.height, len(manifest.classes)
    data, _ = load_export_data(
        data_dir, split, image_size=size, num_classes=classes, mean=tuple(pre.mean), std=tuple(pre.std)
    )
    calibration_path = root / manifest.calibration.file
    old = _stored(calibration_path)
    engine = make_engine(manifest, root, threads=threads)
    splits: dict[str, SplitResult] = {}
    for name, dataset in (("heldout", data.heldout), ("test", data.test)):
        if f"{name}_confidence" not in old:
            continue
        if dataset is None:
            raise ExportError(f"the stored calibration has a {name} split but {data_dir} has none")
        hashing = HashingBatches(dataset_batches(dataset, batch_size))
        result, _ = run_split(engine, hashing, manifest.num_stages)
        expected = recorded.get(f"{name}_sha256")
        if expected is not None and hashing.hexdigest() != expected:
            raise ExportError(f"{name}: the split from {data_dir} does not hash to the one the artifact recorded")
        splits[name] = result
    changes = tuple(_compare(name, old, result) for name, result in splits.items())
    if not any(c.changed for c in changes) or not write:
        return RecalibrationResult(manifest, manifest.version, changes, written=False)

    arrays = dict(old)
    for name, result in splits.items():
        arrays.update(result.arrays(name))
    temporary = calibration_path.with_name(f".{calibration_path.name}.partial")
    save_calibration_npz(temporary, arrays)
    body: dict[str, Any] = manifest.model_dump(mode="json")
    body["calibration"]["sha256"] = sha256_file(temporary)
    body["provenance"]["recalibration"] = {
        "confidence": CONFIDENCE_RULE,
        "previous_version": manifest.version,
        "previous_calibration_sha256": manifest.calibration.sha256,
        "changed_confidences": {c.split: c.changed for c in changes},
    }
    updated = validated_manifest(body)
    temporary.chmod(ARTIFACT_FILE_MODE)  # the serving user must read it, whatever the umask (see export.pipeline)
    os.replace(temporary, calibration_path)
    write_manifest(root, updated).chmod(ARTIFACT_FILE_MODE)
    load_manifest(root, verify=True)  # what the service will do: re-read and verify every hash
    return RecalibrationResult(updated, manifest.version, changes, written=True)
