"""Test doubles: tiny StagedBackbones that exercise every wiring case of the exporter.

`TwoScaleNet` passes a *list* of two feature tensors between stages (like MSDNet's scales), uses
BatchNorm (folded at export) and a shape-dependent flatten, and can make one stage a cascade
stage that reads the raw image and ignores the previous features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.staged import StagedBackbone


@dataclass(frozen=True)
class Cost:
    macs: int
    cumulative_macs: int
    params: int
    cumulative_params: int


class _Block(nn.Module):
    def __init__(self, in_ch: int, ch: int) -> None:
        super().__init__()
        self.fine = nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
        self.coarse = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU())

    def forward(self, x: Tensor, coarse_in: Tensor | None) -> list[Tensor]:
        fine = self.fine(x)
        coarse = self.coarse(fine)
        if coarse_in is not None:
            coarse = coarse + coarse_in
        return [fine, coarse]


class TwoScaleNet(StagedBackbone):
    def __init__(
        self,
        *,
        channels: int = 1,
        width: int = 4,
        classes: int = 5,
        stages: int = 3,
        cascade_stage: int | None = None,
    ) -> None:
        super().__init__()
        self._n = stages
        self.cascade_stage = cascade_stage
        self.blocks = nn.ModuleList(
            _Block(channels if k == 0 or k == cascade_stage else width, width) for k in range(stages)
        )
        self.heads = nn.ModuleList(nn.Linear(width * 4 * 4, classes) for _ in range(stages))
        self.pool = nn.AdaptiveAvgPool2d(4)
        gen = torch.Generator().manual_seed(0)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            with torch.no_grad():  # non-trivial running stats so BN folding is exercised
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
                bn.running_var.uniform_(0.5, 2.0, generator=gen)

    @property
    def num_stages(self) -> int:
        return self._n

    def stage_reads_image(self, k: int) -> bool:
        return k == 0 or k == self.cascade_stage

    def forward_stage(self, k: int, image: Tensor, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        if self.stage_reads_image(k):
            fine, coarse = self.blocks[k](image, None)
        else:
            fine, coarse = self.blocks[k](features[0], features[1])
        pooled = self.pool(coarse)
        logits = self.heads[k](pooled.view(pooled.size(0), -1))
        return ([fine, coarse] if k < self._n - 1 else []), logits


def costs(n: int) -> list[Cost]:
    return [Cost(macs=100, cumulative_macs=100 * (k + 1), params=10, cumulative_params=10 * (k + 1)) for k in range(n)]


def make_double(seed: int = 0, **kwargs: object) -> TwoScaleNet:
    torch.manual_seed(seed)
    return TwoScaleNet(**kwargs).eval()  # type: ignore[arg-type]
