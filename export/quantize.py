"""int8 stage graphs: ONNX Runtime static quantization, per-stage precision chosen by measured time.

Why int8: on the CPUs we serve from, stages 2-4 of the fp32 graphs cost about the same per image at
any batch size (the fp32 convolution kernels, not the MACs, set the time); ONNX Runtime's int8
kernels run them several times faster. Why *per stage*: a small stage (the first one, at batch 1)
can get slower in int8, because quantizing and dequantizing its input and output costs more than
its few MACs save. So every stage is quantized, both versions are timed on this machine, and each
stage keeps the precision the rule below picks; the manifest records it (`StageSpec.precision`).

Method (`onnxruntime.quantization.quantize_static`): QDQ format, int8 weights per output channel,
uint8 activations, MinMax ranges. The ranges are calibrated on images of the TRAINING split only
(a seeded sample, eval transform, no augmentation), never on held-out or test images: the held-out
split chooses thresholds and the test split measures them, so neither may tune the graphs. Each
stage is calibrated on the inputs the fp32 stages before it produce for those images.

The logits stay float: the nodes between a stage's last convolution/pooling and its `logits`
output (the head's Flatten/Gemm and the boosting sum F_k = f_k + t F_{k-1}) are excluded from
quantization. Quantized logits (uint8, one scale per stage) would round the confidences onto a
coarse grid: many images would share one confidence, and a threshold between two grid points
would move whole blocks of images at once. The head is tiny, so keeping it float costs nothing.

Per-stage rule (`choose_precisions`, unit-tested on fake timings): a stage runs int8 when int8's
median time per image is at least `margin` (default 5 %) below fp32's at EVERY decision batch
size (default 1 and 32: an idle server runs batches of one, a loaded one batches of about 32).
One precision per stage, not per batch size, because the calibration arrays must be the ones the
served graphs compute whatever the batch: a stage that is faster in int8 only under load stays
fp32. The margin keeps fp32 (the more accurate graph) where the difference is within the noise
of a shared machine.

After the choice, the held-out and test calibration arrays are recomputed through the *mixed*
engine (export.calibrate.run_split, the serving Engine), so every policy and guarantee is about
what is served, and the parity with the fp32 artifact is measured on the same images: per exit,
the share of images whose label agrees, and the max/mean |logits int8 - logits fp32|. Agreement
below `min_agreement` at any exit fails the quantization (nothing is written).
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from export.calibrate import SplitResult, make_engine, run_split
from export.errors import ExportError
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
from export.quantize_rule import (
    DECISION_BATCH_SIZES,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MARGIN,
    DEFAULT_MIN_AGREEMENT,
    StageTiming,
    choose_precisions,
)
from export.source import SplitSettings, load_export_data
from service.core.artifact import (
    Manifest,
    Precision,
    load_manifest,
    sha256_file,
)

#: Ops that end the "head tail": nodes after them on the way to the logits stay float.
_TAIL_BOUNDARY: Final = frozenset({"Conv", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "AveragePool"})
QUANTIZATION_METHOD: Final = (
    "onnxruntime.quantization.quantize_static: QDQ, int8 weights per channel, uint8 activations, MinMax; "
    "the head tail (nodes after the last convolution/pooling before the logits) left float"
)
CALIBRATION_FILE: Final = "calibration.npz"


@dataclass(frozen=True)
class QuantizeOptions:
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    seed: int = 0
    decision_batch_sizes: tuple[int, ...] = DECISION_BATCH_SIZES
    margin: float = DEFAULT_MARGIN
    rounds: int = 5
    round_seconds: float = 0.2
    #: A fixed choice per stage ("fp32"/"int8"), skipping the timing rule (timings still reported).
    precisions: tuple[Precision, ...] | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    batch_size: int = 256
    threads: int = 1
    overwrite: bool = False
    progress: bool = True


# --------------------------------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------------------------------


def head_tail_nodes(model: Any, logits_output: str = "logits") -> list[str]:
    """Names of the nodes between the last convolution/pooling and `logits_output` (kept float)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: list[str] = []
    todo = [logits_output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.op_type in _TAIL_BOUNDARY or node.name in tail:
            continue
        tail.append(node.name)
        todo.extend(node.input)
    return tail


def _named(model: Any) -> Any:
    """Give every unnamed node a unique name (nodes_to_exclude matches by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


class _Feeds:
    """onnxruntime's CalibrationDataReader over one stage's recorded inputs, in fixed-size batches."""

    def __init__(self, feeds: Mapping[str, np.ndarray], batch_size: int = 64) -> None:
        n = len(next(iter(feeds.values())))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[i : i + batch_size] for k, v in feeds.items()} for i in range(0, n, batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_stage(fp32_path: Path, int8_path: Path, feeds: Mapping[str, np.ndarray], logits_output: str) -> None:
    """One fp32 stage graph -> its static-QDQ int8 version at `int8_path` (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # the base class is abstract; _Feeds holds the logic
        def __init__(self) -> None:
            self._feeds = _Feeds(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self._feeds.get_next()

    work = Path(tempfile.mkdtemp(prefix="quantize-", dir=int8_path.parent))
    try:
        prepared = work / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = _named(onnx.load(str(prepared)))
        onnx.save(model, str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=head_tail_nodes(model, logits_output),
        )
    except Exception as exc:  # the quantizer raises plain Exceptions of many kinds
        raise ExportError(f"cannot quantize {fp32_path.name}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _session(path: Path, threads: int) -> Any:
    """A CPU session with the serving engine's options (service.core.engine): full optimisation, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stage_feeds(manifest: Manifest, root: Path, images: np.ndarray, threads: int = 1) -> list[dict[str, np.ndarray]]:
    """The inputs every fp32 stage receives for `images` (N, C, H, W), keyed by graph input name."""
    state: dict[str, np.ndarray] = {"image": images}
    feeds: list[dict[str, np.ndarray]] = []
    for stage in manifest.stages:
        session = _session(root / stage.file, threads)
        feed = {i.name: images if i.source == "image" else state[i.source.removeprefix("prev:")] for i in stage.inputs}
        feeds.append(feed)
        names = [o.name for o in session.get_outputs()]
        state = {"image": images, **dict(zip(names, session.run(names, feed), strict=True))}
    return feeds


def _tile(feed: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(feed.values())))
    reps = -(-batch_size // n)
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch_size]) for k, v in feed.items()}


def time_stages(
    fp32_paths: Sequence[Path],
    int8_paths: Sequence[Path],
    feeds: Sequence[Mapping[str, np.ndarray]],
    batch_sizes: Sequence[int],
    *,
    rounds: int = 5,
    round_seconds: float = 0.2,
    threads: int = 1,
) -> list[StageTiming]:
    """Median ms per image of every stage in both precisions, interleaved rounds (order alternates).

    Why interleaved: on a shared machine load drifts; alternating fp32 and int8 within each round
    makes a drift hit both alike, and the median over rounds ignores a round that was disturbed.
    """
    timings: list[StageTiming] = []
    for k, (p32, p8, feed) in enumerate(zip(fp32_paths, int8_paths, feeds, strict=True)):
        sessions = {"fp32": _session(p32, threads), "int8": _session(p8, threads)}
        for batch in batch_sizes:
            x = _tile(feed, batch)
            samples: dict[str, list[float]] = {"fp32": [], "int8": []}
            for s in sessions.values():
                s.run(None, x)  # warm this shape
            for r in range(rounds):
                for name in ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32"):
                    session = sessions[name]
                    calls, spent = 0, 0.0
                    deadline = time.perf_counter() + round_seconds
                    while calls < 3 or time.perf_counter() < deadline:
                        t0 = time.perf_counter()
                        session.run(None, x)
                        spent += time.perf_counter() - t0
                        calls += 1
                    samples[name].append(1e3 * spent / (calls * batch))
            timings.append(
                StageTiming(
                    stage=k,
                    batch_size=batch,
                    fp32_ms=float(np.median(samples["fp32"])),
                    int8_ms=float(np.median(samples["int8"])),
                    fp32_range=(min(samples["fp32"]), max(samples["fp32"])),
                    int8_range=(min(samples["int8"]), max(samples["int8"])),
                )
            )
    return timings


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _recorded_split(manifest: Manifest, where: Path) -> SplitSettings:
    recorded = manifest.provenance.dataset
    try:
        return SplitSettings(recorded.get("kind"), int(recorded["heldout_size"]), int(recorded["split_seed"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{where}: the manifest records no held-out split (provenance.dataset): {exc}") from exc


def training_images(manifest: Manifest, data_dir: Path, count: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(count, C, H, W) float32 images drawn from the TRAINING split, and a record of the draw.

    The training split is what models.data.load_splits leaves after removing the held-out images
    (same size and seed as the artifact recorded), so no held-out or test image is ever drawn.
    The eval transform is used (no augmentation): the graphs will see served images, not crops.
    """
    import torch

    from models.data import ArrayDataset, load_splits

    split = _recorded_split(manifest, data_dir)
    pre = manifest.preprocessing
    try:
        splits = load_splits(
            data_dir,
            dataset=split.dataset,
            heldout_size=split.heldout_size,
            seed=split.seed,
            image_size=pre.height,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
        )
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the data splits from {data_dir}: {exc}") from exc
    train = splits.train
    if count < 1 or len(train) == 0:
        raise ExportError(f"need at least one training image to calibrate on (asked {count}, have {len(train)})")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(train), size=min(count, len(train)), replace=False))  # (n,)
    chosen = ArrayDataset(
        train.images[torch.from_numpy(index)], train.labels[torch.from_numpy(index)], splits.heldout.transform
    )
    images = np.concatenate([x for x, _ in dataset_batches(chosen, 256)]).astype(np.float32)  # (n, C, H, W)
    record = {
        "split": "train (models.data.load_splits minus the recorded held-out split; eval transform)",
        "images": len(index),
        "of": len(train),
        "seed": seed,
        "images_sha256": _sha256(images),
    }
    return images, record


def _sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# parity with fp32, measured while calibrating
# --------------------------------------------------------------------------------------------------


@dataclass
class ExitParity:
    """int8 vs fp32 at one exit over every calibrated image."""

    images: int = 0
    agree: int = 0
    max_abs_logits: float = 0.0
    sum_abs_logits: float = 0.0  # sum over images of the mean |diff| over classes

    @property
    def agreement(self) -> float:
        return self.agree / self.images if self.images else float("nan")

    @property
    def mean_abs_logits(self) -> float:
        return self.sum_abs_logits / self.images if self.images else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "label_agreement": self.agreement,
            "max_abs_logits": self.max_abs_logits,
            "mean_abs_logits": self.mean_abs_logits,
        }


class _ParityEngine:
    """`run_all_stages` of the quantized engine (what calibration stores) that also runs fp32 and compares."""

    def __init__(self, served: Any, reference: Any, num_exits: int) -> None:
        self._served = served
        self._reference = reference
        self.exits = [ExitParity() for _ in range(num_exits)]

    def run_all_stages(self, images: np.ndarray) -> list[np.ndarray]:
        served = [np.asarray(z) for z in self._served.run_all_stages(images)]  # E x (B, classes)
        reference = [np.asarray(z) for z in self._reference.run_all_stages(images)]
        for parity, a, b in zip(self.exits, served, reference, strict=True):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))  # (B, classes)
            parity.images += int(a.shape[0])
            parity.agree += int(np.count_nonzero(a.argmax(axis=-1) == b.argmax(axis=-1)))
            parity.max_abs_logits = max(parity.max_abs_logits, float(diff.max(initial=0.0)))
            parity.sum_abs_logits += float(diff.mean(axis=-1).sum())
        return served


# --------------------------------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    path: Path
    manifest: Manifest
    precisions: list[Precision]
    timings: list[StageTiming]
    parity: list[ExitParity]
    fp32_test_accuracy: list[float] | None
    heldout: SplitResult
    test: SplitResult | None
    calibration_record: dict[str, Any] = field(default_factory=dict)
    rule: str = ""

    def report(self) -> dict[str, Any]:
        """What provenance.quantization records (and the CLI prints)."""
        return {
            "method": QUANTIZATION_METHOD,
            "calibration_images": self.calibration_record,
            "rule": self.rule,
            "precisions": self.precisions,
            "timings": [asdict(t) for t in self.timings],
            "parity_vs_fp32": [p.to_dict() for p in self.parity],
        }


def quantize_artifact(
    source_dir: str | Path,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    options: QuantizeOptions | None = None,
) -> QuantizeResult:
    """Write an artifact at `out_dir` with int8 stages where they are faster, recalibrated and checked.

    `source_dir` is an fp32 artifact (every stage fp32, calibrated); `data_dir` defaults to the
    directory its provenance records. Atomic like the export: a failed run leaves nothing at out_dir.
    """
    options = options or QuantizeOptions()
    src, out = Path(source_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ExportError("--out must differ from the source artifact (artifacts are immutable)")
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    manifest = load_manifest(src, verify=True)
    if any(p != "fp32" for p in manifest.precisions):
        raise ExportError(f"{src} is already quantized ({', '.join(manifest.precisions)}): start from an fp32 artifact")
    if manifest.calibration is None:
        raise ExportError(f"{src} has no calibration data: export it with --data first")
    if options.precisions is not None and len(options.precisions) != manifest.num_stages:
        raise ExportError(f"{len(options.precisions)} precisions for {manifest.num_stages} stages")
    recorded = manifest.provenance.dataset
    data = Path(data_dir) if data_dir is not None else Path(str(recorded.get("data_dir", "")))
    if not data.is_dir():
        raise ExportError(f"data directory not found: {data} (pass --data)")
    progress = Progress(enabled=options.progress)

    images, image_record = training_images(manifest, data, options.calibration_images, options.seed)
    temp = new_partial_dir(out)
    try:
        progress.note(f"quantize: {len(images)} training images through the fp32 stages ...")
        feeds = stage_feeds(manifest, src, images, options.threads)
        fp32_paths = [src / s.file for s in manifest.stages]
        int8_paths = [temp / f".int8-{s.file}" for s in manifest.stages]
        for stage, path, feed in zip(manifest.stages, int8_paths, feeds, strict=True):
            quantize_stage(src / stage.file, path, feed, stage.logits_output)
        progress.note("quantize: timing fp32 vs int8 per stage ...")
        timings = time_stages(
            fp32_paths,
            int8_paths,
            feeds,
            options.decision_batch_sizes,
            rounds=options.rounds,
            round_seconds=options.round_seconds,
            threads=options.threads,
        )
        precisions = (
            list(options.precisions)
            if options.precisions is not None
            else choose_precisions(timings, manifest.num_stages, options.decision_batch_sizes, options.margin)
        )
        body: dict[str, Any] = manifest.model_dump(mode="json")
        for stage, spec, precision, int8_path in zip(
            body["stages"], manifest.stages, precisions, int8_paths, strict=True
        ):
            target = temp / spec.file
            shutil.copyfile(int8_path if precision == "int8" else src / spec.file, target)
            stage["precision"] = precision
            stage["sha256"] = sha256_file(target)
        for path in int8_paths:
            path.unlink()
        body["calibration"] = None
        draft = validated_manifest(body)

        progress.note(f"quantize: recalibrating through the {'/'.join(precisions)} engine ...")
        split = _recorded_split(manifest, data)
        export_data, _ = load_export_data(
            data,
            split,
            image_size=manifest.preprocessing.height,
            num_classes=len(manifest.classes),
            mean=tuple(manifest.preprocessing.mean),
            std=tuple(manifest.preprocessing.std),
        )
        served = _ParityEngine(
            make_engine(draft, temp, threads=options.threads),
            make_engine(manifest, src, threads=options.threads),
            manifest.num_stages,
        )
        results: dict[str, SplitResult] = {}
        with np.load(src / manifest.calibration.file, allow_pickle=False) as stored:
            stored_splits = {name for name in ("heldout", "test") if f"{name}_confidence" in stored.files}
        for name, dataset in (("heldout", export_data.heldout), ("test", export_data.test)):
            if name not in stored_splits or dataset is None:
                continue
            hashing = HashingBatches(dataset_batches(dataset, options.batch_size))
            results[name], _ = run_split(served, hashing, manifest.num_stages)
            expected = recorded.get(f"{name}_sha256")
            if expected is not None and hashing.hexdigest() != expected:
                raise ExportError(f"{name}: the split from {data} does not hash to the one the artifact recorded")
        weak = [(k + 1, p.agreement) for k, p in enumerate(served.exits) if p.agreement < options.min_agreement]
        if weak:
            raise ExportError(
                "int8 labels agree with fp32 below "
                f"{options.min_agreement:.1%} at exit(s) {', '.join(f'{k} ({a:.2%})' for k, a in weak)}"
            )
        heldout, test = results["heldout"], results.get("test")
        body["calibration"] = write_calibration(temp, heldout, test)
        result = QuantizeResult(
            path=out,
            manifest=draft,
            precisions=precisions,
            timings=timings,
            parity=served.exits,
            fp32_test_accuracy=manifest.calibration.test_accuracy,
            heldout=heldout,
            test=test,
            calibration_record=image_record,
            rule="fixed by the caller"
            if options.precisions is not None
            else f"int8 iff int8 ms/image <= {1 - options.margin:g} x fp32 at every batch size in "
            f"{list(options.decision_batch_sizes)} (export.quantize_rule.choose_precisions)",
        )
        quantization = result.report()
        quantization["source"] = {"version": manifest.version, "name": manifest.name}
        quantization["fp32_accuracy"] = {
            "heldout": manifest.calibration.heldout_accuracy,
            "test": manifest.calibration.test_accuracy,
        }
        quantization["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        quantization["tool_versions"] = tool_versions()
        quantization["git_sha"] = git_sha()
        body["provenance"]["quantization"] = quantization
        result.manifest = validated_manifest(body)
        finish_artifact(temp, out, result.manifest, options.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return result
