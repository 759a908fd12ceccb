"""Torch vs ONNX Runtime parity of the exported stage graphs.

Two comparisons per input batch, both on the cumulative logits F_k (max absolute difference):
  - each stage alone: ORT stage k fed with the *torch* inputs of stage k (torch features of stage
    k-1, torch F_{k-1}) — localises a bad stage;
  - chained: ORT stages fed with ORT outputs, image to last exit — what serving actually computes,
    where per-stage errors accumulate.
Feature tensors are compared too and reported, but only logits gate the export (features may
legitimately differ by more in absolute terms when activations are large).

The torch side is the model's own `forward` when given (`reference`), so a wrapper bug (wrong t,
missing boosting term) cannot hide behind a self-consistent comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from export.errors import ParityError
from export.stages import IMAGE, LOGITS_IN, LOGITS_OUT, StagePlan, feat_in, feat_out, torch_stage_outputs
from models.staged import StagedBackbone

DEFAULT_TOLERANCE = 1e-4
Reference = Callable[[Tensor], Sequence[Tensor]]


@dataclass
class ParityCase:
    """Max |torch - ORT| per stage for one input batch."""

    label: str
    batch_size: int
    stage_alone_logits: list[float]
    chained_logits: list[float]
    stage_alone_features: list[float]

    @property
    def worst(self) -> float:
        return max(self.stage_alone_logits + self.chained_logits)


@dataclass
class ParityReport:
    tolerance: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max((c.worst for c in self.cases), default=0.0)

    @property
    def ok(self) -> bool:
        return all(c.worst <= self.tolerance for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON summary for the manifest provenance."""
        return {
            "tolerance": self.tolerance,
            "max_abs_logits": self.worst,
            "cases": [asdict(c) for c in self.cases],
        }

    def summary(self) -> str:
        lines = [f"parity (max |torch - onnxruntime| on logits, tolerance {self.tolerance:g}):"]
        for c in self.cases:
            lines.append(
                f"  {c.label:<24} B={c.batch_size:<3} stage-alone {max(c.stage_alone_logits):.2e}  "
                f"chained {max(c.chained_logits):.2e}"
            )
        return "\n".join(lines)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def open_sessions(paths: Sequence[Path], threads: int = 1) -> list[Any]:
    """ONNX Runtime CPU sessions with the default (full) graph optimisations, as served."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]


def run_chained(sessions: Sequence[Any], plans: Sequence[StagePlan], images: np.ndarray) -> list[np.ndarray]:
    """Cumulative logits of every stage, ORT outputs feeding the next ORT stage."""
    prev: dict[str, np.ndarray] = {}
    logits: list[np.ndarray] = []
    for session, plan in zip(sessions, plans, strict=True):
        feeds = {
            name: images if name == IMAGE else prev[plan.source(name).removeprefix("prev:")]
            for name in plan.input_names
        }
        outputs = session.run(plan.output_names, feeds)
        prev = dict(zip(plan.output_names, outputs, strict=True))
        logits.append(prev[LOGITS_OUT])
    return logits


@torch.no_grad()
def compare(
    backbone: StagedBackbone,
    t: float,
    plans: Sequence[StagePlan],
    sessions: Sequence[Any],
    images: Tensor,
    label: str,
    reference: Reference | None = None,
) -> ParityCase:
    """One parity case: stage-alone and chained max abs differences for `images`."""
    staged = torch_stage_outputs(backbone, t, images)
    expected = (
        [r.detach().cpu().numpy() for r in reference(images)]
        if reference is not None
        else [cum.numpy() for _, cum in staged]
    )
    if len(expected) != len(plans):
        raise ParityError(f"reference returned {len(expected)} exits, the export has {len(plans)} stages")
    image_np = images.detach().cpu().numpy().astype(np.float32)
    alone_logits: list[float] = []
    alone_features: list[float] = []
    for plan, session in zip(plans, sessions, strict=True):
        k = plan.index
        feeds: dict[str, np.ndarray] = {}
        for name in plan.input_names:
            if name == IMAGE:
                feeds[name] = image_np
            elif name == LOGITS_IN:
                feeds[name] = staged[k - 1][1].numpy()
            else:
                j = int(name.removeprefix("feat_in_"))
                assert name == feat_in(j)
                feeds[name] = staged[k - 1][0][j].numpy()
        outputs = dict(zip(plan.output_names, session.run(plan.output_names, feeds), strict=True))
        alone_logits.append(_max_abs(outputs[LOGITS_OUT], expected[k]))
        feature_errors = [_max_abs(outputs[feat_out(j)], staged[k][0][j].numpy()) for j in range(plan.num_feat_out)]
        alone_features.append(max(feature_errors, default=0.0))
    chained = run_chained(sessions, plans, image_np)
    chained_errors = [_max_abs(a, b) for a, b in zip(chained, expected, strict=True)]
    return ParityCase(
        label=label,
        batch_size=int(images.shape[0]),
        stage_alone_logits=alone_logits,
        chained_logits=chained_errors,
        stage_alone_features=alone_features,
    )


def check_parity(
    backbone: StagedBackbone,
    t: float,
    plans: Sequence[StagePlan],
    paths: Sequence[Path],
    batches: Sequence[tuple[str, Tensor]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: Reference | None = None,
) -> ParityReport:
    """Compare torch and ORT on every (label, images) batch; raise ParityError beyond tolerance."""
    sessions = open_sessions(paths)
    report = ParityReport(tolerance=tolerance)
    for label, images in batches:
        report.cases.append(compare(backbone, t, plans, sessions, images, label, reference))
    if not report.ok:
        bad = [c for c in report.cases if c.worst > tolerance]
        details = "; ".join(
            f"{c.label} (B={c.batch_size}): stage-alone {[f'{e:.2e}' for e in c.stage_alone_logits]}, "
            f"chained {[f'{e:.2e}' for e in c.chained_logits]}"
            for c in bad
        )
        raise ParityError(
            f"ONNX Runtime does not match torch within {tolerance:g} (max abs on logits, worst "
            f"{report.worst:.3e}): {details}"
        )
    return report
