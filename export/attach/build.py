"""attach-exits end to end: ONNX classifier(s) + preprocessing + dataset -> a served early-exit artifact.

One model with cuts: stage graphs cut from the user's graph (`export.attach.graph`), one exit head
per cut trained on pooled features (`features`, `heads`), the last stage the rest of the user's
graph whose `logits` is the original output. One model without cuts: a one-stage artifact, the
network served whole (the baseline the early-exit artifact is measured against). Several models:
a cascade of separate networks, each stage reading the image and answering with its own output.

Checks before anything is published (any failure: AttachError, nothing written at --out):
  - the dataset's class count equals the model's output size, its channels the colour mode;
  - **last-exit parity**: the chained stages, run by the serving engine, give bit for bit the
    logits of the unsplit model run by the serving engine on real held-out images (and a cascade
    member's stage those of its own file);
  - calibration (held-out and test confidences) is computed by the serving engine, as for
    `boostserve export`, and the manifest is re-read and verified.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, ValidationError

from export.attach.errors import AttachError
from export.attach.exact import inexact_cuts
from export.attach.features import extract_pooled
from export.attach.graph import (
    FEAT_IN,
    FEAT_OUT,
    Classifier,
    CutCandidate,
    auto_cuts,
    build_stage,
    cascade_stage,
    cut_candidates,
    head_macs,
    initializer_params,
    load_classifier,
    resolve_cuts,
    stage_macs,
)
from export.attach.heads import LinearHead, train_heads
from export.calibrate import SplitResult, make_engine, run_split
from export.pipeline import (
    HashingBatches,
    dataset_batches,
    finish_artifact,
    git_sha,
    new_partial_dir,
    tool_versions,
    validated_manifest,
    write_calibration,
)
from export.progress import Progress
from export.stages import IMAGE, LOGITS_IN, LOGITS_OUT, stage_file
from service.core.artifact import Manifest, sha256_file

#: One model without --cuts: three exits before the last, spread by MACs.
DEFAULT_CUTS = "auto:3"
#: Real held-out images each candidate cut is pre-checked on (export.attach.exact).
PARITY_IMAGES = 64


class PreprocessingSpec(BaseModel):
    """What the user's network expects: the small JSON of `--preprocessing` (or the CLI flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: list[float]
    std: list[float]
    size: int | None = None  # square side; None: the model's input size
    color_mode: Literal["L", "RGB"] | None = None  # None: from the model's channel count
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"


def read_preprocessing(path: str | Path) -> PreprocessingSpec:
    try:
        return PreprocessingSpec.model_validate(json.loads(Path(path).read_text()))
    except OSError as exc:
        raise AttachError(f"cannot read preprocessing file {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in first[:3])
        raise AttachError(f"preprocessing file {path} is not valid: {detail}") from exc


@dataclass
class AttachOptions:
    cuts: str | Sequence[str] | None = None  # "auto:K", "none" or tensor names; None: DEFAULT_CUTS (one model)
    t: float = 0.0
    heldout_size: int = 5000
    seed: int = 0
    batch_size: int = 256
    cache_dir: Path | None = None
    include_test: bool = True
    overwrite: bool = False
    progress: bool = True
    threads: int = 1
    name: str | None = None
    train_limit: int | None = None  # use only the first N training images for the heads (tests)


@dataclass
class AttachResult:
    path: Path
    manifest: Manifest
    cuts: list[CutCandidate]
    parity_images: int
    heldout: SplitResult
    test: SplitResult | None
    features_cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _preprocessing(spec: PreprocessingSpec, classifier: Classifier) -> dict[str, Any]:
    c, h, w = classifier.image_shape
    mode = spec.color_mode or ("L" if c == 1 else "RGB")
    channels = 1 if mode == "L" else 3
    if channels != c:
        raise AttachError(f"colour mode {mode} gives {channels} channel(s) but the model takes {c}")
    if h != w:
        raise AttachError(f"the model takes {h}x{w} images; attach-exits supports square inputs only")
    if spec.size is not None and spec.size != h:
        raise AttachError(f"--size {spec.size} but the model takes {h}x{w} images")
    if len(spec.mean) != c or len(spec.std) != c:
        raise AttachError(f"mean and std need {c} value(s), one per channel; got {len(spec.mean)} and {len(spec.std)}")
    if any(s <= 0 for s in spec.std):
        raise AttachError("std must be positive")
    return {
        "height": h,
        "width": w,
        "channels": c,
        "color_mode": mode,
        "mean": [float(m) for m in spec.mean],
        "std": [float(s) for s in spec.std],
        "resize": spec.resize,
    }


def choose_cuts(classifier: Classifier, cuts: str | Sequence[str], images: np.ndarray | None) -> list[CutCandidate]:
    """`auto:K` (K cut points spread by cumulative MACs), `none`, or tensor names.

    With `images` (real, preprocessed), only cuts that keep the last exit bit for bit equal to the
    unsplit network under ONNX Runtime are used (`export.attach.exact`); a named cut that does not
    is an error, auto skips it.
    """
    if isinstance(cuts, str):
        if cuts == "none":
            return []
        if cuts == "auto" or cuts.startswith("auto:"):
            text = cuts.partition(":")[2] or "3"
            try:
                count = int(text)
            except ValueError:
                raise AttachError(f"--cuts {cuts!r}: auto:K needs an integer K") from None
            candidates = cut_candidates(classifier)
            if images is not None:
                bad = inexact_cuts(classifier, candidates, images)
                candidates = [c for c in candidates if c.name not in bad]
            return auto_cuts(candidates, count, classifier.total_macs)
        cuts = [c for c in cuts.split(",") if c]
    resolved = resolve_cuts(classifier, list(cuts))
    if images is not None:
        bad = inexact_cuts(classifier, resolved, images)
        for cut in resolved:
            if cut.name in bad:
                raise AttachError(
                    f"cut {cut.name!r} changes the network's output under ONNX Runtime's graph optimisations "
                    f"(max abs {bad[cut.name]:.1e} on real images), so the last exit would not be the original "
                    "bit for bit; pick a neighbouring tensor (--list-cuts)"
                )
    return resolved


def _load_data(data_dir: str | Path, pre: dict[str, Any], options: AttachOptions, num_classes: int) -> Any:
    from models.data import DataError, load_splits

    try:
        splits = load_splits(
            data_dir,
            heldout_size=options.heldout_size,
            seed=options.seed,
            image_size=int(pre["height"]),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            augment="none",
        )
    except DataError as exc:
        raise AttachError(str(exc)) from exc
    if len(splits.class_names) != num_classes:
        raise AttachError(
            f"the dataset in {data_dir} has {len(splits.class_names)} classes but the model outputs "
            f"{num_classes} logits"
        )
    channels = int(splits.train.images.shape[1])
    if channels != pre["channels"]:
        raise AttachError(f"the dataset's images have {channels} channel(s), the model takes {pre['channels']}")
    return splits


def _train_features(
    classifier: Classifier, cuts: Sequence[CutCandidate], splits: Any, options: AttachOptions, progress: Progress
) -> tuple[list[np.ndarray], np.ndarray, bool]:
    train = splits.train
    if options.train_limit is not None:
        from models.data import ArrayDataset

        n = min(options.train_limit, len(train))
        train = ArrayDataset(train.images[:n], train.labels[:n], train.transform)
    total = len(train)
    hashing = HashingBatches(dataset_batches(train, options.batch_size))
    for _ in hashing:  # the cache key covers the very images (and their normalisation)
        pass
    digest = hashing.hexdigest()
    with progress.bar(total=total, desc="cut features (train)", unit="img") as bar:
        return extract_pooled(
            classifier,
            cuts,
            dataset_batches(train, options.batch_size),
            total=total,
            cache_dir=options.cache_dir,
            digest=digest,
            threads=options.threads,
            progress=bar,
        )


def _stage_body(
    index: int, model: onnx.ModelProto, path: Path, macs: int, cum_macs: int, cum_params: int
) -> dict[str, Any]:
    def shape(value: onnx.ValueInfoProto) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    def source(name: str) -> str:
        if name == IMAGE:
            return "image"
        if name == FEAT_IN:
            return f"prev:{FEAT_OUT}"
        if name == LOGITS_IN:
            return f"prev:{LOGITS_OUT}"
        raise AttachError(f"stage {index + 1} has an unexpected input {name!r}")

    return {
        "index": index,
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": [{"name": v.name, "shape": shape(v), "source": source(v.name)} for v in model.graph.input],
        "outputs": [{"name": v.name, "shape": shape(v)} for v in model.graph.output],
        "logits_output": LOGITS_OUT,
        "macs": int(macs),
        "cumulative_macs": int(cum_macs),
        "params": initializer_params(model),
        "cumulative_params": int(cum_params),
    }


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _whole_engine(classifier: Classifier, work: Path, pre: dict[str, Any], classes: Sequence[str]) -> Any:
    """The unsplit model as a one-stage artifact in `work`, run by the serving engine (the parity reference)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / stage_file(0)
    _save(cascade_stage(classifier), path)
    body = _manifest_body(
        "whole",
        [
            _stage_body(
                0, cascade_stage(classifier), path, classifier.total_macs, classifier.total_macs, classifier.params
            )
        ],
        pre,
        classes,
        0.0,
        {},
    )
    manifest = validated_manifest(body)
    return make_engine(manifest, work)


def _manifest_body(
    name: str,
    stages: list[dict[str, Any]],
    pre: dict[str, Any],
    classes: Sequence[str],
    t: float,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": name,
        "stages": stages,
        "preprocessing": pre,
        "classes": list(classes),
        "exit_rule": {"t": float(t)},
        "provenance": provenance,
        "calibration": None,
    }


def _parity_images(splits: Any) -> np.ndarray:
    count = min(PARITY_IMAGES, len(splits.heldout))
    images, _ = next(iter(dataset_batches(splits.heldout, count)))
    return np.ascontiguousarray(images[:count], dtype=np.float32)  # (n, C, H, W)


class _Parity:
    """The serving engine, checked bit for bit against the unsplit model(s) on every batch it runs.

    Calibration runs every held-out and test image through `run_all_stages`; wrapping the engine
    makes the parity claim cover all of them at the cost of one more pass of the whole network.
    """

    def __init__(self, engine: Any, references: Sequence[tuple[int, Any]]) -> None:
        self.engine = engine
        self.references = references
        self.images = 0

    def run_all_stages(self, images: np.ndarray) -> list[np.ndarray]:
        exits = [np.asarray(x) for x in self.engine.run_all_stages(images)]
        for k, reference in self.references:
            expected = np.asarray(reference.run_all_stages(images)[-1])
            got = exits[k]
            if got.shape != expected.shape:
                raise AttachError(f"exit {k + 1} has shape {got.shape}, the original model {expected.shape}")
            if not np.array_equal(got, expected):
                diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
                raise AttachError(
                    f"exit {k + 1} differs from the original model's output (max abs {diff:.3e} on a batch of "
                    f"{len(images)}): the split graphs do not reproduce the network bit for bit"
                )
        self.images += len(images)
        return exits


def attach_exits(
    models: Sequence[str | Path],
    data_dir: str | Path,
    out_dir: str | Path,
    preprocessing: PreprocessingSpec,
    options: AttachOptions | None = None,
) -> AttachResult:
    """Build, check, calibrate and publish the artifact; AttachError (one line) on any bad input."""
    options = options or AttachOptions()
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise AttachError(f"{out} already exists (pass --overwrite to replace it)")
    if not models:
        raise AttachError("no model given")
    if options.t < 0:
        raise AttachError("--t must be >= 0")
    progress = Progress(enabled=options.progress)
    classifiers = [load_classifier(m) for m in models]
    first = classifiers[0]
    for other in classifiers[1:]:
        if other.image_shape != first.image_shape or other.num_classes != first.num_classes:
            raise AttachError(
                f"cascade members must share input shape and classes: {first.path} takes {first.image_shape} -> "
                f"{first.num_classes}, {other.path} takes {other.image_shape} -> {other.num_classes}"
            )
    cascade = len(classifiers) > 1
    if cascade and options.cuts not in (None, "none"):
        raise AttachError("cuts apply to one model; a cascade of several models takes no --cuts (or --cuts none)")
    wanted = DEFAULT_CUTS if options.cuts is None else options.cuts
    if not cascade:
        choose_cuts(first, wanted, None)  # names, separation, order: fail before loading any data
    pre = _preprocessing(preprocessing, first)
    splits = _load_data(data_dir, pre, options, first.num_classes)
    classes = list(splits.class_names)
    images = _parity_images(splits)
    if not cascade and wanted != "none":
        progress.note(f"checking cut candidates for bit-exact splits on {len(images)} held-out images ...")
    cuts = [] if cascade else choose_cuts(first, wanted, images)
    if cuts:
        progress.note("cuts: " + ", ".join(c.name for c in cuts))

    temp = new_partial_dir(out)
    try:
        stage_models: list[onnx.ModelProto] = []
        macs: list[int] = []
        heads: list[LinearHead] = []
        cached = False
        if cascade:
            for member in classifiers:
                stage_models.append(cascade_stage(member))
                macs.append(member.total_macs)
        else:
            if cuts:
                pooled, labels, cached = _train_features(first, cuts, splits, options, progress)
                progress.note(f"training {len(cuts)} exit head(s) (pool + linear, t={options.t:g}) ...")
                heads = train_heads(pooled, labels, first.num_classes, t=options.t)
            bounds: list[CutCandidate | None] = [None, *cuts, None]
            for k in range(len(cuts) + 1):
                start, end = bounds[k], bounds[k + 1]
                head = (heads[k].weight, heads[k].bias) if end is not None else None
                stage_models.append(build_stage(first, start, end, head, options.t))
                cost = stage_macs(first, start.name if start else None, end.name if end else None)
                if end is not None:
                    cost += head_macs(end.shape, first.num_classes)
                macs.append(cost)
        stage_bodies: list[dict[str, Any]] = []
        cum_macs = cum_params = 0
        for k, model in enumerate(stage_models):
            path = temp / stage_file(k)
            _save(model, path)
            cum_macs += macs[k]
            cum_params += initializer_params(model)
            stage_bodies.append(_stage_body(k, model, path, macs[k], cum_macs, cum_params))

        provenance: dict[str, Any] = {
            "git_sha": git_sha(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tool_versions": tool_versions(),
            "dataset": {
                "data_dir": str(data_dir),
                "dataset": splits.dataset,
                "heldout_size": options.heldout_size,
                "split_seed": options.seed,
            },
            "seed": options.seed,
            "attach": {
                "models": [
                    {"file": str(c.path), "sha256": sha256_file(c.path), "input": c.input_name, "output": c.output_name}
                    for c in classifiers
                ],
                "kind": "cascade" if cascade else ("exits" if cuts else "whole"),
                "cuts": [{"name": c.name, "op": c.op, "shape": list(c.shape)} for c in cuts],
                "head": "global average pool + linear (L-BFGS on pooled train features)",
                "t_heads": options.t,
                "last_exit": "the original model's output, never boosted",
            },
        }
        name = options.name or first.path.stem + ("-cascade" if cascade else "-exits" if cuts else "")
        manifest = validated_manifest(_manifest_body(name, stage_bodies, pre, classes, options.t, provenance))

        engine = make_engine(manifest, temp, threads=options.threads)
        progress.note("last-exit parity (serving engine: chained stages vs the unsplit model) ...")
        whole_dir = temp.parent / f".{temp.name}-whole"
        try:
            if cascade:
                refs = [(k, _whole_engine(c, whole_dir / str(k), pre, classes)) for k, c in enumerate(classifiers)]
            else:
                refs = [(len(stage_models) - 1, _whole_engine(first, whole_dir / "0", pre, classes))]
            checked = _Parity(engine, refs)
            checked.run_all_stages(images[:1])  # a batch of one, then every calibration batch
            n = manifest.num_stages
            hashing = HashingBatches(dataset_batches(splits.heldout, options.batch_size))
            with progress.bar(total=len(splits.heldout), desc="calibrate held-out", unit="img") as bar:
                heldout, _ = run_split(checked, hashing, n, progress=bar.update)
            provenance["dataset"]["heldout_sha256"] = hashing.hexdigest()
            test: SplitResult | None = None
            if options.include_test:
                hashing = HashingBatches(dataset_batches(splits.test, options.batch_size))
                with progress.bar(total=len(splits.test), desc="calibrate test", unit="img") as bar:
                    test, _ = run_split(checked, hashing, n, progress=bar.update)
                provenance["dataset"]["test_sha256"] = hashing.hexdigest()
        finally:
            shutil.rmtree(whole_dir, ignore_errors=True)
        progress.note(f"parity: bit for bit on all {checked.images} calibration images")
        calibration = write_calibration(temp, heldout, test)
        provenance["parity"] = {"images": checked.images, "bit_exact": True}
        body = _manifest_body(name, stage_bodies, pre, classes, options.t, provenance)
        body["calibration"] = calibration
        manifest = validated_manifest(body)
        finish_artifact(temp, out, manifest, options.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return AttachResult(
        path=out,
        manifest=manifest,
        cuts=cuts,
        parity_images=checked.images,
        heldout=heldout,
        test=test,
        features_cached=cached,
    )
