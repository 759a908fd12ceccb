"""The offline/online contract: what an artifact directory holds and how it is verified.

`export/` writes a `manifest.json` with this schema; `service/` loads it and refuses to serve
anything whose files do not match their recorded sha256. Artifacts are immutable: recalibrating
writes a new manifest (and so a new content-hash `version`).

Stage wiring: the engine keeps, per sample, the preprocessed image and the outputs of the stage
that ran last. A stage input's `source` names where its value comes from:
  - "image"          the preprocessed image (N, C, H, W) float32
  - "prev:<name>"    output `<name>` of the previous stage (features, or "logits" = F_{k-1})
Every stage outputs the cumulative logits F_k under `logits_output`; the boosting sum
F_k = f_k + t * F_{k-1} lives inside the graph.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"


class ArtifactError(Exception):
    """The artifact directory is missing, malformed or does not match its manifest."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    name: str
    shape: list[int | None] = Field(description="None marks a dynamic axis (the batch axis)")
    dtype: Literal["float32"] = "float32"


class StageInput(TensorSpec):
    source: str = Field(description='"image" or "prev:<output name of the previous stage>"')

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value != "image" and not (value.startswith("prev:") and len(value) > 5):
            raise ValueError(f"stage input source must be 'image' or 'prev:<name>', got {value!r}")
        return value


#: Numeric precision of a stage graph's weights and activations. Inputs and outputs are float32
#: either way (an int8 graph quantizes and dequantizes inside), so the engine's wiring is the same.
Precision = Literal["fp32", "int8"]
#: What a manifest written before the field existed means: its stages are fp32.
DEFAULT_PRECISION: Final[Precision] = "fp32"


class StageSpec(_Frozen):
    index: int = Field(ge=0, description="0-based stage index; exit number shown to users is index + 1")
    file: str
    sha256: str
    precision: Precision = Field(
        default=DEFAULT_PRECISION,
        description="fp32, or int8 (static QDQ: per-channel int8 weights, uint8 activations; export.quantize)",
    )
    inputs: list[StageInput]
    outputs: list[TensorSpec]
    logits_output: str = "logits"
    macs: int = Field(ge=0, description="MACs of this stage alone (block + its head)")
    cumulative_macs: int = Field(ge=0, description="MACs to reach this exit: blocks 0..k and heads 0..k")
    params: int = Field(ge=0)
    cumulative_params: int = Field(ge=0)

    @property
    def reads_image(self) -> bool:
        return any(i.source == "image" for i in self.inputs)


class Preprocessing(_Frozen):
    """bytes -> decoded -> color_mode -> resized to (height, width) -> x/255 -> (x - mean) / std, NCHW."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    color_mode: Literal["L", "RGB"]
    mean: list[float]
    std: list[float]
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    input_scale: float = 1.0 / 255.0
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        expected = "L" if self.channels == 1 else "RGB"
        if self.color_mode != expected:
            raise ValueError(f"{self.channels} channel(s) need color_mode {expected!r}")
        return self


class ExitRule(_Frozen):
    confidence: Literal["max_softmax_cumulative"] = "max_softmax_cumulative"
    t: float = Field(ge=0.0, description="F_k = f_k + t * F_{k-1}; baked into the stage graphs")
    description: str = "exit at the first stage k with max(softmax(F_k)) >= threshold_k; the last always answers"


class Provenance(_Frozen):
    model_config = ConfigDict(frozen=True, extra="allow")

    checkpoint_sha256: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    git_sha: str | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    created_at: str | None = None
    opset: int | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)


class CalibrationSpec(_Frozen):
    """Where the per-exit confidence/correctness arrays live (see service.core.artifact)."""

    file: str
    sha256: str
    split: str = "heldout"
    num_samples: int = Field(gt=0)
    heldout_accuracy: list[float]
    test_accuracy: list[float] | None = None
    test_samples: int | None = None


class Manifest(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str = Field(description="content hash of stages + calibration + contract")
    stages: list[StageSpec] = Field(min_length=1)
    preprocessing: Preprocessing
    classes: list[str] = Field(min_length=2)
    exit_rule: ExitRule
    provenance: Provenance = Field(default_factory=Provenance)
    calibration: CalibrationSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise ValueError(f"stages must be ordered by index; position {i} has index {stage.index}")
        if self.stages[0].reads_image is False:
            raise ValueError("stage 0 must read the image")
        cumulative = [s.cumulative_macs for s in self.stages]
        if cumulative != sorted(cumulative):
            raise ValueError("cumulative_macs must be non-decreasing")
        if self.calibration is not None:
            n = len(self.stages)
            if len(self.calibration.heldout_accuracy) != n:
                raise ValueError("calibration.heldout_accuracy needs one value per stage")
            if self.calibration.test_accuracy is not None and len(self.calibration.test_accuracy) != n:
                raise ValueError("calibration.test_accuracy needs one value per stage")
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def cumulative_macs(self) -> list[int]:
        return [s.cumulative_macs for s in self.stages]

    @property
    def full_macs(self) -> int:
        return self.stages[-1].cumulative_macs

    @property
    def precisions(self) -> list[Precision]:
        return [s.precision for s in self.stages]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_version(manifest_without_version: dict[str, Any]) -> str:
    """A short content hash over everything that defines behaviour (file hashes included).

    A stage at the default precision hashes as if the field were absent, so a manifest written
    before `precision` existed keeps the version it was published with.
    """
    body = {k: v for k, v in manifest_without_version.items() if k not in ("version", "provenance")}
    stages = body.get("stages")
    if isinstance(stages, list):
        body["stages"] = [
            {k: v for k, v in s.items() if not (k == "precision" and v == DEFAULT_PRECISION)}
            if isinstance(s, dict)
            else s
            for s in stages
        ]
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cannot_read(path: Path, exc: OSError) -> ArtifactError:
    """One line for a file the artifact names but the process cannot open (e.g. "permission denied").

    Why here, for every file opened: an unreadable file is a deployment mistake (a mounted artifact
    owned by another user, mode 0600), and the operator needs its path and the reason, not a
    PermissionError traceback or "is not valid JSON".
    """
    reason = exc.strerror.lower() if exc.strerror else str(exc)
    return ArtifactError(f"cannot read {path}: {reason}")


def _verified_path(artifacts_dir: Path, relative: str, expected_sha256: str, what: str) -> Path:
    path = (artifacts_dir / relative).resolve()
    if artifacts_dir.resolve() not in path.parents:
        raise ArtifactError(f"{what} path {relative!r} escapes the artifact directory")
    try:
        if not path.is_file():
            raise ArtifactError(f"{what} file missing: {path}")
        actual = sha256_file(path)
    except OSError as exc:
        raise cannot_read(path, exc) from exc
    if actual != expected_sha256:
        raise ArtifactError(
            f"{what} file {path} is corrupted or was changed: sha256 {actual[:16]}… != manifest {expected_sha256[:16]}…"
        )
    return path


def load_manifest(artifacts_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `manifest.json`; with verify, check the sha256 of every file it names."""
    root = Path(artifacts_dir)
    manifest_path = root / MANIFEST_FILE
    try:
        if not manifest_path.is_file():
            raise ArtifactError(
                f"no {MANIFEST_FILE} in {root}: point --artifacts / BOOSTSERVE_ARTIFACTS_DIR at a directory "
                "written by `boostserve export`"
            )
        text = manifest_path.read_bytes()
    except OSError as exc:
        raise cannot_read(manifest_path, exc) from exc
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ArtifactError(
            f"{manifest_path} has schema_version {raw.get('schema_version')!r}; this boostserve reads {SCHEMA_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path} does not match the manifest schema: {exc}") from exc
    if verify:
        for stage in manifest.stages:
            _verified_path(root, stage.file, stage.sha256, f"stage {stage.index + 1}")
        if manifest.calibration is not None:
            _verified_path(root, manifest.calibration.file, manifest.calibration.sha256, "calibration")
    return manifest


def write_manifest(artifacts_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(artifacts_dir) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------------
# Per-exit confidence and correctness on held-out data: the input of every threshold policy.
#
# Stored beside the manifest as an .npz (hash in the manifest) with these arrays
# (E = number of exits, n = samples):
#   heldout_confidence  (E, n) float32   max softmax of the cumulative logits F_k
#   heldout_correct     (E, n) bool      argmax F_k == label
#   heldout_labels      (n,)   int64
# and optionally the same three with the prefix `test_` (for reports and the offline bench).


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
    except (PermissionError, IsADirectoryError) as exc:
        raise cannot_read(path, exc) from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # BadZipFile: not an npz at all
        raise ArtifactError(f"cannot read calibration file {path}: {exc}") from exc
    if confidence.shape[0] != manifest.num_stages:
        raise ArtifactError(f"calibration file {path} has {confidence.shape[0]} exits, manifest {manifest.num_stages}")
    return CalibrationData(
        confidence=confidence,
        correct=correct,
        cumulative_macs=np.asarray(manifest.cumulative_macs, dtype=np.float64),
    )
