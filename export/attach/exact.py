"""Which cuts keep the last exit bit for bit equal to the unsplit network under ONNX Runtime.

Why a check and not a proof: the split graphs hold the very nodes and weights of the original,
but ONNX Runtime optimises each graph it loads on its own. At the serving engine's level
(ORT_ENABLE_ALL, which includes the NCHWc layout transformer) a graph boundary can change which
kernel runs next to it (a blocked-layout pooling or convolution in the whole graph, a plain one
after the cut), and with it the last bits of the logits: measured on a small residual net, one
cut in three left the logits 2e-9 to 3e-8 away from the whole network's; every cut was exact with
the layout transformer off (ORT_ENABLE_EXTENDED). So each candidate is tried as a two-stage split
on real images with the engine's optimisation level, and only exact ones are used; the finished
artifact is then checked again through the serving engine itself on every calibration image
(`export.attach.build`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from export.attach.graph import FEAT_IN, FEAT_OUT, Classifier, CutCandidate, build_stage
from export.stages import IMAGE, LOGITS_OUT


def _session(model_bytes: bytes) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The serving engine's level (service.core.engine.Engine); a difference would only make this
    # pre-check weaker, never the engine check that follows it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _run(session: object, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    return np.asarray(session.run([output], feeds)[0])  # type: ignore[attr-defined]


def inexact_cuts(classifier: Classifier, candidates: Sequence[CutCandidate], images: np.ndarray) -> dict[str, float]:
    """Candidates whose two-stage split changes the logits on `images` (N, C, H, W): name -> max abs diff."""
    whole = _session(classifier.model.SerializeToString())
    batches = [images[:1], images]
    expected = [_run(whole, {IMAGE: b}, LOGITS_OUT) for b in batches]
    bad: dict[str, float] = {}
    for cut in candidates:
        zeros = (
            np.zeros((classifier.num_classes, cut.shape[0]), np.float32),
            np.zeros(classifier.num_classes, np.float32),
        )
        first = _session(build_stage(classifier, None, cut, zeros, 0.0).SerializeToString())
        rest = _session(build_stage(classifier, cut, None, None, 0.0).SerializeToString())
        worst, exact = 0.0, True
        for batch, reference in zip(batches, expected, strict=True):
            features = _run(first, {IMAGE: batch}, FEAT_OUT)
            got = _run(rest, {FEAT_IN: features}, LOGITS_OUT)
            if not np.array_equal(got, reference):
                exact = False
                worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - reference))))
        if not exact:
            bad[cut.name] = worst
    return bad
