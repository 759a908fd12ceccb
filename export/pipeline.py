"""Checkpoint-independent export pipeline: stages -> ONNX -> parity -> calibration -> manifest.

`export_artifact` takes an `ExportSource` (a backbone in eval mode plus the facts the manifest
needs) so the same code path serves the CLI (real checkpoints, `export.source`) and the test
fixtures (seeded random-weight models, test doubles).

Atomicity: everything is written into a hidden temporary directory next to the target and
renamed into place only after every check passed; on any failure the temporary directory is
removed, so a failed export never leaves a manifest (or a half-written artifact) behind.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import torch
from torch import Tensor

from export.calibrate import Batch, EngineCrossCheck, SplitResult, make_engine, run_split
from export.errors import ExportError
from export.onnx_export import DEFAULT_OPSET, Exporter, export_stage
from export.parity import DEFAULT_TOLERANCE, ParityReport, check_parity
from export.progress import Progress
from export.stages import (
    StageModule,
    StagePlan,
    custom_autograd_functions,
    plan_stages,
    stage_file,
    torch_stage_outputs,
)
from models.staged import StagedBackbone
from service.core.artifact import (
    Manifest,
    content_version,
    load_manifest,
    save_calibration_npz,
    sha256_file,
    write_manifest,
)

CALIBRATION_FILE = "calibration.npz"


class CostLike(Protocol):
    """What the manifest needs per exit (models.macs.ExitCost satisfies it)."""

    @property
    def macs(self) -> int: ...
    @property
    def cumulative_macs(self) -> int: ...
    @property
    def params(self) -> int: ...
    @property
    def cumulative_params(self) -> int: ...


class DatasetLike(Protocol):
    """A map-style dataset yielding (image tensor (C, H, W) normalised, int label)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


@dataclass
class ExportSource:
    """A model ready to export and the metadata that travels into the manifest."""

    backbone: StagedBackbone
    t: float
    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: Sequence[float]
    std: Sequence[float]
    classes: Sequence[str]
    costs: Sequence[CostLike]
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    seed: int | None = None
    resize: str = "bilinear"
    # The model's own forward (BoostedNet.forward) as the parity reference; None: recompute the
    # boosting sum from forward_stage.
    reference: Callable[[Tensor], Sequence[Tensor]] | None = None


@dataclass
class ExportData:
    """The splits used for parity (a real batch), calibration (held-out) and the test arrays."""

    heldout: DatasetLike | None = None
    test: DatasetLike | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    exporter: Exporter = "torchscript"
    tolerance: float = DEFAULT_TOLERANCE
    batch_size: int = 256
    parity_batch_size: int = 5
    calibrate: bool = True
    include_test: bool = True
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    threads: int = 1


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    parity: ParityReport
    engine_check: EngineCrossCheck | None
    heldout: SplitResult | None
    test: SplitResult | None


def dataset_batches(dataset: DatasetLike, batch_size: int) -> Iterator[Batch]:
    """(images float32 NCHW, labels int64) numpy batches in dataset order (no shuffling).

    Uses the dataset's own vectorised `batches(batch_size)` when it has one (models.data's
    ArrayDataset transforms a whole batch at once), else a plain DataLoader.
    """
    fast = getattr(dataset, "batches", None)
    if callable(fast):
        for images, labels in fast(batch_size):
            yield images.numpy().astype(np.float32, copy=False), labels.numpy().astype(np.int64)
        return
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
    )
    for images, labels in loader:
        yield images.numpy().astype(np.float32, copy=False), labels.numpy().astype(np.int64)


class HashingBatches:
    """Wrap a batch iterator and hash what passes through, for report reuse.

    Images and labels go into separate digests (combined at the end), so the hash does not
    depend on the batch size used to stream the split.
    """

    def __init__(self, batches: Iterable[Batch]) -> None:
        import hashlib

        self._batches = batches
        self._images = hashlib.sha256()
        self._labels = hashlib.sha256()

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self._batches:
            self._images.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
            self._labels.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
            yield images, labels

    def hexdigest(self) -> str:
        import hashlib

        return hashlib.sha256((self._images.hexdigest() + self._labels.hexdigest()).encode()).hexdigest()


def split_sha256(dataset: DatasetLike, batch_size: int = 512) -> str:
    """The hash `HashingBatches` records, recomputed from a dataset (used by the report)."""
    hashing = HashingBatches(dataset_batches(dataset, batch_size))
    for _ in hashing:
        pass
    return hashing.hexdigest()


def git_sha(repo: Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the repository holding this code, or None outside a checkout."""
    where = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha or None


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import boostserve

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "boostserve": boostserve.__version__,
    }


def _stage_dict(plan: StagePlan, path: Path, cost: CostLike) -> dict[str, Any]:
    return {
        "index": plan.index,
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": [{"name": t.name, "shape": list(t.shape), "source": plan.source(t.name)} for t in plan.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape)} for t in plan.outputs],
        "logits_output": "logits",
        "macs": int(cost.macs),
        "cumulative_macs": int(cost.cumulative_macs),
        "params": int(cost.params),
        "cumulative_params": int(cost.cumulative_params),
    }


def _example_inputs(plan: StagePlan, staged: list[tuple[list[Tensor], Tensor]], image: Tensor) -> tuple[Tensor, ...]:
    values: list[Tensor] = []
    for name in plan.input_names:
        if name == "image":
            values.append(image)
        elif name == "logits_in":
            values.append(staged[plan.index - 1][1])
        else:
            values.append(staged[plan.index - 1][0][int(name.removeprefix("feat_in_"))])
    return tuple(values)


def new_partial_dir(out: Path) -> Path:
    """A fresh `.NAME.partial-*` directory beside `out`: written in full there, then renamed onto
    `out`, so a reader never sees half an artifact (same filesystem, so the rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


#: An artifact is immutable, public model data (no secrets) read by another user: the serving
#: container runs as UID 10001 on a mounted directory. mkdtemp creates its directory 0700 and a
#: umask of 077 would make the files 0600, so the modes are set explicitly, not left to either.
ARTIFACT_DIR_MODE: Final = 0o755
ARTIFACT_FILE_MODE: Final = 0o644


def make_world_readable(root: Path) -> None:
    """Give `root` and everything under it the artifact modes (links are left alone)."""
    root.chmod(ARTIFACT_DIR_MODE)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(ARTIFACT_DIR_MODE if path.is_dir() else ARTIFACT_FILE_MODE)


def _publish(temp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place (same filesystem: atomic for the new directory)."""
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "artifact")
        os.replace(temp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, out)


def write_calibration(temp: Path, heldout: SplitResult, test: SplitResult | None) -> dict[str, Any]:
    """Write calibration.npz into `temp`; returns the manifest's `calibration` entry for it.

    One writer for export, quantize and attach-exits, so every artifact describes its calibration
    the same way.
    """
    arrays = heldout.arrays("heldout")
    if test is not None:
        arrays.update(test.arrays("test"))
    path = temp / CALIBRATION_FILE
    save_calibration_npz(path, arrays)
    return {
        "file": CALIBRATION_FILE,
        "sha256": sha256_file(path),
        "split": "heldout",
        "num_samples": int(heldout.labels.shape[0]),
        "heldout_accuracy": heldout.accuracy,
        "test_accuracy": test.accuracy if test is not None else None,
        "test_samples": int(test.labels.shape[0]) if test is not None else None,
    }


def finish_artifact(temp: Path, out: Path, manifest: Manifest, overwrite: bool) -> None:
    """Write the manifest, re-read it as the service will (every hash verified), make the files
    readable by the container user and move the directory into place."""
    write_manifest(temp, manifest)
    load_manifest(temp, verify=True)
    make_world_readable(temp)
    _publish(temp, out, overwrite)


def export_artifact(
    source: ExportSource,
    out_dir: str | Path,
    data: ExportData | None = None,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Export, verify, calibrate and publish an artifact directory. Raises ExportError on failure."""
    options = options or ExportOptions()
    data = data or ExportData()
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    backbone = source.backbone
    if backbone.training:
        raise ExportError("the model must be in eval mode (gradient rescaling and other training-only parts off)")
    n = backbone.num_stages
    if len(source.costs) != n:
        raise ExportError(f"{len(source.costs)} exit costs for {n} stages")
    if data.heldout is None and options.calibrate:
        raise ExportError("calibration needs the held-out split (or pass --no-calibrate)")
    progress = Progress(enabled=options.progress)
    generator = torch.Generator().manual_seed(options.seed)
    c, h, w = source.image_shape
    trace_image = torch.randn(2, c, h, w, generator=generator)

    temp = new_partial_dir(out)
    try:
        with torch.no_grad():
            plans = plan_stages(backbone, source.t, trace_image)
            staged = torch_stage_outputs(backbone, source.t, trace_image)
        custom = custom_autograd_functions(backbone, source.t, trace_image[:1])
        if custom:
            raise ExportError(
                f"custom autograd Functions {custom} run in eval mode; training-only parts (gradient "
                "rescaling) must be off in the exported graphs"
            )
        paths: list[Path] = []
        with progress.bar(total=n, desc="export stages", unit="stage") as bar:
            for plan in plans:
                path = temp / stage_file(plan.index)
                module = StageModule(backbone, plan, source.t).eval()
                export_stage(
                    module,
                    _example_inputs(plan, staged, trace_image),
                    path,
                    opset=options.opset,
                    exporter=options.exporter,
                )
                paths.append(path)
                bar.update(1)

        batches: list[tuple[str, Tensor]] = [
            ("random", torch.randn(1, c, h, w, generator=generator)),
            ("random", torch.randn(options.parity_batch_size, c, h, w, generator=generator)),
        ]
        real = data.heldout if data.heldout is not None else data.test
        if real is not None:
            count = min(len(real), options.parity_batch_size)
            real_images = torch.stack([real[i][0] for i in range(count)]).float()
            batches += [("data", real_images[:1]), ("data", real_images)]
        progress.note("parity check (torch vs onnxruntime) ...")
        parity = check_parity(
            backbone, source.t, plans, paths, batches, tolerance=options.tolerance, reference=source.reference
        )
        progress.note(parity.summary())

        dataset_info = dict(data.info)
        provenance: dict[str, Any] = {
            "checkpoint_sha256": source.checkpoint_sha256,
            "config": source.config,
            "git_sha": git_sha(),
            "dataset": dataset_info,
            "seed": source.seed,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "opset": options.opset,
            "tool_versions": tool_versions(),
            "exporter": options.exporter,
            "parity": parity.to_dict(),
        }
        body: dict[str, Any] = {
            "schema_version": 1,
            "name": source.name,
            "stages": [_stage_dict(p, path, cost) for p, path, cost in zip(plans, paths, source.costs, strict=True)],
            "preprocessing": {
                "height": h,
                "width": w,
                "channels": c,
                "color_mode": "L" if c == 1 else "RGB",
                "mean": [float(m) for m in source.mean],
                "std": [float(s) for s in source.std],
                "resize": source.resize,
            },
            "classes": list(source.classes),
            "exit_rule": {"t": float(source.t)},
            "provenance": provenance,
            "calibration": None,
        }
        manifest = validated_manifest(body)

        heldout = test = None
        engine_check: EngineCrossCheck | None = None
        if options.calibrate:
            assert data.heldout is not None
            heldout, test, engine_check, split_info = _calibrate(manifest, temp, source, data, options, progress)
            dataset_info.update(split_info)
            body["calibration"] = write_calibration(temp, heldout, test)
            if engine_check is not None:
                provenance["engine_parity"] = engine_check.to_dict()
            manifest = validated_manifest(body)
        finish_artifact(temp, out, manifest, options.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ExportResult(
        path=out,
        manifest=manifest,
        parity=parity,
        engine_check=engine_check,
        heldout=heldout,
        test=test,
    )


def validated_manifest(body: dict[str, Any]) -> Manifest:
    """Validate the manifest and set its content version.

    The version hashes the *normalised* manifest (pydantic defaults filled in, JSON types), i.e.
    exactly what manifest.json will hold, so anyone can recompute it from the file alone.
    """
    try:
        draft = Manifest.model_validate({**body, "version": "pending"})
        normalised = draft.model_dump(mode="json")
        normalised.pop("version")
        return Manifest.model_validate({**normalised, "version": content_version(normalised)})
    except ValueError as exc:
        raise ExportError(f"the manifest does not validate: {exc}") from exc


def _calibrate(
    manifest: Manifest,
    artifacts_dir: Path,
    source: ExportSource,
    data: ExportData,
    options: ExportOptions,
    progress: Progress,
) -> tuple[SplitResult, SplitResult | None, EngineCrossCheck | None, dict[str, Any]]:
    """Held-out (and test) splits through the serving engine; engine-vs-torch check on batch one."""
    assert data.heldout is not None
    engine = make_engine(manifest, artifacts_dir, threads=options.threads)

    def reference(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            tensor = torch.from_numpy(images)
            if source.reference is not None:
                return [x.numpy() for x in source.reference(tensor)]
            return [cum.numpy() for _, cum in torch_stage_outputs(source.backbone, source.t, tensor)]

    n = manifest.num_stages
    hashing = HashingBatches(dataset_batches(data.heldout, options.batch_size))
    with progress.bar(total=len(data.heldout), desc="calibrate held-out", unit="img") as bar:
        heldout, check = run_split(
            engine, hashing, n, progress=bar.update, reference=reference, tolerance=options.tolerance
        )
    info: dict[str, Any] = {
        "heldout_sha256": hashing.hexdigest(),
        "heldout_samples": int(heldout.labels.shape[0]),
    }
    test: SplitResult | None = None
    if data.test is not None and options.include_test:
        hashing = HashingBatches(dataset_batches(data.test, options.batch_size))
        with progress.bar(total=len(data.test), desc="calibrate test", unit="img") as bar:
            test, _ = run_split(engine, hashing, n, progress=bar.update)
        info["test_sha256"] = hashing.hexdigest()
        info["test_samples"] = int(test.labels.shape[0])
    return heldout, test, check, info
