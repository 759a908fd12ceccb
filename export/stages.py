"""Cut a StagedBackbone into one exportable module per stage, with the boosting sum inside.

Why a wrapper per stage: ONNX Runtime serves each stage as its own graph so that the engine can
stop after any exit and batch survivors across requests. Each graph must therefore take exactly
what that stage consumes and return exactly what the next stage (and the exit) needs:

  stage 0 / cascade stage k:  image [, logits_in]            -> [feat_out_j ...,] logits
  feature stage k > 0:        feat_in_0..feat_in_{m-1}, logits_in -> [feat_out_j ...,] logits

`logits` is the cumulative F_k = f_k + t * F_{k-1} with t baked in as a constant, so serving never
needs to know the exit rule's arithmetic. A stage outputs features only when the *next* stage
consumes them (not on the last stage, not before a cascade stage), which keeps dead tensors out
of the serving path.

The names follow docs/architecture.md and `service.core.artifact` (`image`, `feat_in_{j}`,
`logits_in` -> `feat_out_{j}`, `logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.staged import StagedBackbone

IMAGE = "image"
LOGITS_IN = "logits_in"
LOGITS_OUT = "logits"


def feat_in(j: int) -> str:
    return f"feat_in_{j}"


def feat_out(j: int) -> str:
    return f"feat_out_{j}"


def stage_file(index: int) -> str:
    """`stage_01.onnx` for index 0: the file name users see is 1-based, like the exit numbers."""
    return f"stage_{index + 1:02d}.onnx"


@dataclass(frozen=True)
class TensorShape:
    """A graph tensor: its name and its shape with None on the (dynamic) batch axis."""

    name: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class StagePlan:
    """The I/O of one stage graph, derived from the backbone (see `plan_stages`)."""

    index: int
    num_stages: int
    reads_image: bool
    num_feat_in: int
    num_feat_out: int
    inputs: tuple[TensorShape, ...]
    outputs: tuple[TensorShape, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def source(self, input_name: str) -> str:
        """Manifest `source` of an input: the image, or an output of the previous stage."""
        if input_name == IMAGE:
            return "image"
        if input_name == LOGITS_IN:
            return f"prev:{LOGITS_OUT}"
        if input_name.startswith("feat_in_"):
            return "prev:feat_out_" + input_name.removeprefix("feat_in_")
        raise ValueError(f"unknown stage input {input_name!r}")


class StageModule(nn.Module):
    """Stage k of a backbone as a module with positional tensor inputs and a tuple of outputs.

    Positional inputs (in `plan.input_names` order) are what `torch.onnx.export` maps to graph
    inputs; the tuple of outputs maps to `plan.output_names`. The backbone is shared, not copied.
    """

    def __init__(self, backbone: StagedBackbone, plan: StagePlan, t: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.plan = plan
        self.t = float(t)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        plan = self.plan
        if len(inputs) != len(plan.inputs):
            raise TypeError(f"stage {plan.index} takes {plan.input_names}, got {len(inputs)} tensors")
        named = dict(zip(plan.input_names, inputs, strict=True))
        if plan.reads_image:
            image = named[IMAGE]
            features: list[Tensor] = []
        else:
            # A feature stage must not read the image (StagedBackbone contract); an empty tensor
            # makes any accidental use fail loudly during export instead of silently baking in
            # a constant.
            image = torch.empty(0)
            features = [named[feat_in(j)] for j in range(plan.num_feat_in)]
        feats_next, raw = self.backbone.forward_stage(plan.index, image, features)
        cumulative = raw if plan.index == 0 else raw + self.t * named[LOGITS_IN]
        kept = list(feats_next)[: plan.num_feat_out]
        if len(kept) != plan.num_feat_out:
            raise RuntimeError(
                f"stage {plan.index} returned {len(feats_next)} feature tensors, planned {plan.num_feat_out}"
            )
        return (*kept, cumulative)


def torch_stage_outputs(backbone: StagedBackbone, t: float, image: Tensor) -> list[tuple[list[Tensor], Tensor]]:
    """Run every stage in torch: per stage (features returned, cumulative logits F_k).

    This is the reference the ONNX graphs are compared with stage by stage, computed through the
    very same `forward_stage` calls the exported graphs were traced from.
    """
    results: list[tuple[list[Tensor], Tensor]] = []
    features: list[Tensor] = []
    previous: Tensor | None = None
    for k in range(backbone.num_stages):
        stage_features = [] if backbone.stage_reads_image(k) else features
        features, raw = backbone.forward_stage(k, image, stage_features)
        features = list(features)
        cumulative = raw if previous is None else raw + float(t) * previous
        results.append((features, cumulative))
        previous = cumulative
    return results


def _batchless(shape: Sequence[int]) -> tuple[int | None, ...]:
    return (None, *(int(d) for d in shape[1:]))


@torch.no_grad()
def plan_stages(backbone: StagedBackbone, t: float, sample_image: Tensor) -> list[StagePlan]:
    """Derive every stage's inputs/outputs (names and shapes) from one torch forward pass.

    sample_image: (B, C, H, W) with B >= 1; only the non-batch dimensions are recorded.
    """
    if backbone.training:
        raise RuntimeError("plan_stages needs the backbone in eval mode (call .eval())")
    if not backbone.stage_reads_image(0):
        raise ValueError("stage 0 must read the image")
    n = backbone.num_stages
    outputs = torch_stage_outputs(backbone, t, sample_image)
    plans: list[StagePlan] = []
    for k in range(n):
        reads_image = k == 0 or backbone.stage_reads_image(k)
        inputs: list[TensorShape] = []
        num_feat_in = 0
        if reads_image:
            inputs.append(TensorShape(IMAGE, _batchless(sample_image.shape)))
        else:
            prev_features = outputs[k - 1][0]
            num_feat_in = len(prev_features)
            if num_feat_in == 0:
                raise ValueError(f"stage {k} reads features but stage {k - 1} returned none")
            inputs += [TensorShape(feat_in(j), _batchless(f.shape)) for j, f in enumerate(prev_features)]
        if k > 0:
            inputs.append(TensorShape(LOGITS_IN, _batchless(outputs[k - 1][1].shape)))
        next_reads_features = k + 1 < n and not backbone.stage_reads_image(k + 1)
        features, logits = outputs[k]
        num_feat_out = len(features) if next_reads_features else 0
        stage_outputs = [TensorShape(feat_out(j), _batchless(f.shape)) for j, f in enumerate(features)]
        stage_outputs = stage_outputs[:num_feat_out]
        stage_outputs.append(TensorShape(LOGITS_OUT, _batchless(logits.shape)))
        plans.append(
            StagePlan(
                index=k,
                num_stages=n,
                reads_image=reads_image,
                num_feat_in=num_feat_in,
                num_feat_out=num_feat_out,
                inputs=tuple(inputs),
                outputs=tuple(stage_outputs),
            )
        )
    return plans


def custom_autograd_functions(backbone: StagedBackbone, t: float, sample_image: Tensor) -> list[str]:
    """Names of custom `torch.autograd.Function`s on the eval-mode forward path of any stage.

    Why at the torch level: the TorchScript exporter inlines a Function's forward (the gradient
    rescaling is an identity `view_as`), so the ONNX graph alone cannot show that a training-only
    part was still active. One forward with autograd recording and a walk of the autograd graph
    finds every custom Function node (their backward nodes subclass `BackwardCFunction`).
    """
    found: set[str] = set()
    with torch.enable_grad():
        image = sample_image.detach().clone().requires_grad_(True)
        outputs = torch_stage_outputs(backbone, t, image)
        roots = [tensor for features, logits in outputs for tensor in (*features, logits)]
        seen: set[int] = set()
        stack = [r.grad_fn for r in roots if r.grad_fn is not None]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                found.add(type(node).__name__.removesuffix("Backward"))
            stack.extend(next_fn for next_fn, _ in node.next_functions if next_fn is not None)
    return sorted(found)
