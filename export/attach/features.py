"""Pooled cut features of the training images, computed by ONNX Runtime and cached on disk.

Why pooled: every exit head is global-average-pool + linear (`export.attach.heads`), and the pool
has no weights, so the head only ever needs the (N, C) channel means of a cut, not the (N, C, H, W)
map. The extraction graph is the user's graph plus one GlobalAveragePool + Flatten per cut as
extra outputs: ONNX Runtime computes the pools inside the graph, batch by batch, and only
(batch, C) arrays leave it. Memory stays bounded by one batch of feature maps plus the pooled
(N, sum C) float32 result (55,000 x 472 channels = 104 MB for the Fashion-MNIST compact net).

Why the original graph in ONNX Runtime and not a torch re-implementation: the features the heads
learn from are then the very numbers the served stage graphs will produce.

The cache key hashes the model file, the cut names, the preprocessing and the images' bytes, so a
changed model, dataset or normalisation can never reuse stale features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from export.attach.graph import Classifier, CutCandidate
from export.calibrate import Batch


def pooled_name(k: int) -> str:
    return f"boostserve_pooled_{k}"


def extraction_model(classifier: Classifier, cuts: Sequence[CutCandidate]) -> onnx.ModelProto:
    """The user's graph with the pooled cut tensors (batch, C_k) as outputs 0..K-1 (logits dropped)."""
    model = onnx.ModelProto()
    model.CopyFrom(classifier.model)
    graph = model.graph
    del graph.output[:]
    del graph.value_info[:]
    for k, cut in enumerate(cuts):
        out = pooled_name(k)
        if len(cut.shape) == 3:  # (C, H, W): pool, then flatten to (batch, C)
            graph.node.append(helper.make_node("GlobalAveragePool", [cut.name], [f"{out}_map"], name=f"{out}_pool"))
            graph.node.append(helper.make_node("Flatten", [f"{out}_map"], [out], name=f"{out}_flatten", axis=1))
        else:
            graph.node.append(helper.make_node("Identity", [cut.name], [out], name=f"{out}_identity"))
        graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["batch", cut.shape[0]]))
    return model


def cache_key(classifier: Classifier, cuts: Sequence[CutCandidate], images_digest: str) -> str:
    digest = hashlib.sha256()
    digest.update(Path(classifier.path).read_bytes())
    for cut in cuts:
        digest.update(cut.name.encode() + b"\0")
    digest.update(images_digest.encode())
    return digest.hexdigest()[:24]


def images_digest(images: np.ndarray) -> str:
    """Hash of the preprocessed images (N, C, H, W) float32: data and normalisation in one."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()


def extract_pooled(
    classifier: Classifier,
    cuts: Sequence[CutCandidate],
    batches: Iterable[Batch],
    *,
    total: int,
    cache_dir: Path | None,
    digest: str,
    threads: int = 1,
    progress: object | None = None,
) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """Per cut (N, C_k) float32 pooled features and the labels (N,); True when read from the cache."""
    import onnxruntime as ort

    path: Path | None = None
    if cache_dir is not None:
        path = cache_dir / f"features-{cache_key(classifier, cuts, digest)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as data:
                return [data[f"cut_{k}"] for k in range(len(cuts))], data["labels"], True
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        extraction_model(classifier, cuts).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [pooled_name(k) for k in range(len(cuts))]
    pooled = [np.empty((total, cut.shape[0]), dtype=np.float32) for cut in cuts]
    labels = np.empty(total, dtype=np.int64)
    start = 0
    for images, batch_labels in batches:
        values = session.run(names, {"image": np.ascontiguousarray(images, dtype=np.float32)})
        stop = start + len(batch_labels)
        for k, value in enumerate(values):
            pooled[k][start:stop] = value  # (B, C_k)
        labels[start:stop] = batch_labels
        start = stop
        update = getattr(progress, "update", None)
        if callable(update):
            update(len(batch_labels))
    if start != total:
        raise ValueError(f"expected {total} images, got {start}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        arrays: dict[str, np.ndarray] = {f"cut_{k}": p for k, p in enumerate(pooled)}
        arrays["labels"] = labels
        np.savez(partial, **arrays)  # type: ignore[arg-type]
        partial.replace(path)
    return pooled, labels, False
