"""Adapters from the models/ API (checkpoint, config, MACs, data splits) to the export pipeline.

Kept apart from `export.pipeline` so that the pipeline stays testable with any StagedBackbone,
and so that every assumption about the checkpoint's metadata lives in one place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.pipeline import ExportData, ExportOptions, ExportResult, ExportSource, export_artifact
from service.core.artifact import sha256_file


@dataclass(frozen=True)
class SplitSettings:
    """How the held-out split is drawn: must equal what training used, or it overlaps training data."""

    dataset: str | None
    heldout_size: int
    seed: int


def checkpoint_split(meta: dict[str, Any]) -> SplitSettings | None:
    """The split the checkpoint recorded (meta["data"]), or None if it recorded none."""
    data = meta.get("data")
    if not isinstance(data, dict):
        return None
    size = data.get("heldout_size")
    seed = data.get("split_seed", data.get("seed"))
    if size is None or seed is None:
        return None
    kind = data.get("dataset") or data.get("kind")
    return SplitSettings(dataset=str(kind) if kind else None, heldout_size=int(size), seed=int(seed))


def resolve_split(meta: dict[str, Any], heldout_size: int | None, seed: int | None, warn: bool = True) -> SplitSettings:
    """The checkpoint's split, with CLI overrides; warn when an override departs from training."""
    recorded = checkpoint_split(meta)
    if recorded is None and (heldout_size is None or seed is None):
        raise ExportError(
            "the checkpoint records no held-out split (meta['data'] heldout_size/split_seed): pass "
            "--heldout-size and --seed with the values used for training"
        )
    size = heldout_size if heldout_size is not None else recorded.heldout_size  # type: ignore[union-attr]
    split_seed = seed if seed is not None else recorded.seed  # type: ignore[union-attr]
    if warn and recorded is not None and (size, split_seed) != (recorded.heldout_size, recorded.seed):
        print(
            f"warning: held-out split overridden (size {size}, seed {split_seed}) but the checkpoint was "
            f"trained with size {recorded.heldout_size}, seed {recorded.seed}: held-out images may overlap "
            "training images and calibration will be optimistic",
            file=sys.stderr,
        )
    return SplitSettings(dataset=recorded.dataset if recorded else None, heldout_size=size, seed=split_seed)


def source_from_checkpoint(checkpoint: str | Path, *, name: str | None = None) -> tuple[ExportSource, dict[str, Any]]:
    """Load a checkpoint (eval mode) and describe it for the exporter; also return its meta."""
    from models.checkpoint import load_checkpoint
    from models.macs import count_exit_costs

    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    loaded = load_checkpoint(path)
    model = loaded.model.eval()
    config = loaded.config
    meta = dict(loaded.meta or {})
    costs = count_exit_costs(model, config.input_shape)
    classes = meta.get("class_names") or (meta.get("data") or {}).get("class_names")
    source = ExportSource(
        backbone=model.backbone,
        t=float(model.t),
        name=name or config.name,
        image_shape=tuple(config.input_shape[1:]),  # type: ignore[arg-type]
        mean=list(config.mean),
        std=list(config.std),
        classes=list(classes) if classes else [str(i) for i in range(config.num_classes)],
        costs=costs,
        config=config.to_dict(),
        checkpoint_sha256=sha256_file(path),
        # the training seed: top level in older checkpoints, under "results" as `boostserve train` writes it
        seed=meta.get("seed", (meta.get("results") or {}).get("seed")),
        reference=model.forward,
    )
    return source, meta


def load_export_data(
    data_dir: str | Path,
    split: SplitSettings,
    *,
    image_size: int | None,
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[ExportData, list[str]]:
    """Reproduce the training run's held-out/test splits with models.data.load_splits.

    mean/std: the model config's normalisation, so the images calibrated on are normalised exactly
    as the service will normalise them (the manifest's preprocessing comes from the same config).
    """
    from models.data import load_splits

    root = Path(data_dir)
    if not root.exists():
        raise ExportError(f"data directory not found: {root}")
    try:
        splits = load_splits(
            root,
            dataset=split.dataset,
            heldout_size=split.heldout_size,
            seed=split.seed,
            image_size=image_size,
            mean=mean,
            std=std,
        )
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the data splits from {root}: {exc}") from exc
    if splits.heldout is None or len(splits.heldout) == 0:
        raise ExportError(f"the held-out split from {root} is empty (heldout_size={split.heldout_size})")
    class_names = list(splits.class_names)
    if len(class_names) != num_classes:
        raise ExportError(f"the data has {len(class_names)} classes, the model {num_classes}")
    info = {
        "kind": splits.dataset,
        "data_dir": str(root.resolve()),
        "heldout_size": split.heldout_size,
        "split_seed": split.seed,
        "test_size": len(splits.test) if splits.test is not None else 0,
    }
    return ExportData(heldout=splits.heldout, test=splits.test, info=info), class_names


def export_from_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    name: str | None = None,
    heldout_size: int | None = None,
    seed: int | None = None,
) -> ExportResult:
    """The whole `boostserve export`: checkpoint + dataset directory -> published artifact."""
    source, meta = source_from_checkpoint(checkpoint, name=name)
    split = resolve_split(meta, heldout_size, seed)
    data, class_names = load_export_data(
        data_dir,
        split,
        image_size=int(source.config.get("image_size", source.image_shape[1])),
        num_classes=len(source.classes),
        mean=tuple(source.mean),
        std=tuple(source.std),
    )
    source.classes = class_names
    return export_artifact(source, out_dir, data, options)
