"""Per-exit confidence and correctness on held-out data: the input of every threshold policy.

Stored beside the manifest as an .npz (hash in the manifest) with these arrays
(E = number of exits, n = samples):
  heldout_confidence  (E, n) float32   max softmax of the cumulative logits F_k
  heldout_correct     (E, n) bool      argmax F_k == label
  heldout_labels      (n,)   int64
and optionally the same three with the prefix `test_` (for reports and the offline bench).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.manifest import ArtifactError, Manifest


@dataclass(frozen=True)
class CalibrationData:
    """Confidence (E, n), correctness (E, n) and cumulative MACs (E,) of one split."""

    confidence: np.ndarray
    correct: np.ndarray
    cumulative_macs: np.ndarray

    def __post_init__(self) -> None:
        if self.confidence.ndim != 2 or self.confidence.shape != self.correct.shape:
            raise ValueError("confidence and correct must both be (exits, samples)")
        if self.cumulative_macs.shape != (self.confidence.shape[0],):
            raise ValueError("cumulative_macs needs one value per exit")
        if self.confidence.shape[1] == 0:
            raise ValueError("calibration data has no samples")

    @property
    def num_exits(self) -> int:
        return int(self.confidence.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.confidence.shape[1])


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_calibration_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a byte-reproducible .npz that `numpy.load` reads.

    Why not `numpy.savez_compressed`: it stamps each member with the current time, so the same
    arrays saved twice get different sha256s and every re-export of the same checkpoint would get
    a new content version. Here zip timestamps are pinned, members sorted, compression fixed.
    """
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def load_calibration(artifacts_dir: str | Path, manifest: Manifest, split: str = "heldout") -> CalibrationData:
    """Load one split ("heldout" or "test") of the calibration arrays named by the manifest."""
    if manifest.calibration is None:
        raise ArtifactError(
            "this artifact has no calibration data: budget policies other than explicit thresholds and "
            "max_exit need it; re-run `boostserve export` with --data"
        )
    path = Path(artifacts_dir) / manifest.calibration.file
    try:
        with np.load(path, allow_pickle=False) as data:
            confidence = np.asarray(data[f"{split}_confidence"], dtype=np.float32)
            correct = np.asarray(data[f"{split}_correct"], dtype=bool)
    except KeyError as exc:
        raise ArtifactError(f"calibration file {path} has no {split!r} split") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # BadZipFile: not an npz at all
        raise ArtifactError(f"cannot read calibration file {path}: {exc}") from exc
    if confidence.shape[0] != manifest.num_stages:
        raise ArtifactError(f"calibration file {path} has {confidence.shape[0]} exits, manifest {manifest.num_stages}")
    return CalibrationData(
        confidence=confidence,
        correct=correct,
        cumulative_macs=np.asarray(manifest.cumulative_macs, dtype=np.float64),
    )
