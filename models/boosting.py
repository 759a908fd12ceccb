"""BoostNet as a wrapper over any StagedBackbone.

F_0 = f_0 and F_k = f_k + t * F_{k-1}. In training the previous ensemble is detached
(stop-gradient), so the loss of exit k only trains head k and the blocks it sits on: exit k
fits the residual of the frozen ensemble before it, as in gradient boosting. The loss is the
unweighted sum over exits of the cross-entropy of F_k (mean over the batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import BoostingConfig, ModelConfig
from models.staged import StagedBackbone


class _GradRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    """Scale the gradient flowing back through `x` by `scale` (forward is the identity).

    Callers apply it only when `self.training`, so it never reaches an exported graph.
    """
    return _GradRescale.apply(x, scale)


class BoostedNet(nn.Module):
    """Cumulative (boosted) logits over the exits of `backbone`."""

    def __init__(self, backbone: StagedBackbone, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.backbone_frozen = False
        self.set_boosting(config.boosting)

    def set_boosting(self, boosting: BoostingConfig) -> None:
        self.t = float(boosting.t)
        self.stop_grad = bool(boosting.stop_grad)
        # Only backbones that define the knob (MSDNet) rescale gradients.
        if hasattr(self.backbone, "grad_rescale"):
            setattr(self.backbone, "grad_rescale", bool(boosting.grad_rescale))  # noqa: B010 (nn.Module attr typing)

    @property
    def num_stages(self) -> int:
        return self.backbone.num_stages

    def combine(self, f_k: Tensor, prev: Tensor | None) -> Tensor:
        """F_k from the raw logits f_k and F_{k-1} (None for k=0)."""
        if prev is None:
            return f_k
        if self.training and self.stop_grad:
            prev = prev.detach()
        return f_k + self.t * prev

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, H, W) -> [F_0, ..., F_{N-1}], each (B, num_classes)."""
        features: list[Tensor] = []
        outputs: list[Tensor] = []
        prev: Tensor | None = None
        for k in range(self.num_stages):
            features, f_k = self.backbone.forward_stage(k, x, features)
            prev = self.combine(f_k, prev)
            outputs.append(prev)
        return outputs

    def raw_logits(self, x: Tensor) -> list[Tensor]:
        """[f_0, ..., f_{N-1}] without boosting (for tests and analysis)."""
        features: list[Tensor] = []
        out: list[Tensor] = []
        for k in range(self.num_stages):
            features, f_k = self.backbone.forward_stage(k, x, features)
            out.append(f_k)
        return out

    # -- seed 001: exits on a frozen, already-trained backbone -------------------------------
    def head_parameter_names(self) -> set[str]:
        """Parameters of the exit heads (by convention every backbone keeps them in `heads`)."""
        return {n for n, _ in self.named_parameters() if n.startswith("backbone.heads.")}

    def last_head_prefix(self) -> str:
        return f"backbone.heads.{self.num_stages - 1}."

    def freeze_backbone(self) -> None:
        """Freeze the pre-trained network: everything but the exit heads 0..N-2 (no gradients, BN fixed).

        Why the last head too: it is the network's own final classifier. Kept frozen (and t = 0),
        the last exit answers exactly what the pre-trained network answers, so an accuracy drop
        is measured against the user's network, not against a retrained one (seed 001).
        """
        last = self.last_head_prefix()
        heads = {n for n in self.head_parameter_names() if not n.startswith(last)}
        for name, p in self.named_parameters():
            p.requires_grad_(name in heads)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> BoostedNet:
        super().train(mode)
        if self.backbone_frozen:
            for name, child in self.backbone.named_children():
                if name != "heads":
                    child.eval()
            heads = getattr(self.backbone, "heads", None)
            if isinstance(heads, nn.ModuleList):
                heads[self.num_stages - 1].eval()
        return self


def boosted_loss(outputs: list[Tensor], target: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Sum over exits of the batch-mean cross-entropy of F_k; also the per-exit losses (detached)."""
    losses = [F.cross_entropy(o, target) for o in outputs]
    return torch.stack(losses).sum(), [loss.detach() for loss in losses]
