"""MSDNet (Huang et al. 2018) for CIFAR, as built by kalviny/MSDNet-PyTorch with prune='max'.

Features are a list with one tensor per *remaining* scale, finest first: at 32x32 input the
scales are 32x32, 16x16 and 8x8 with n*gr_factor[s] channels. Every layer adds growth_rate *
gr_factor[s] channels per scale (DenseNet concatenation); when a scale is dropped, a 1x1
transition halves the channels (reduction 0.5). Heads read only the coarsest scale x[-1].

Gradient rescaling (BoostNet, Eq. 7) wraps x[-1] with 1/(N-k) before head k and (N-k-1)
after it, in training mode only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.boosting import gradient_rescale
from models.config import ModelConfig, MSDNetConfig
from models.staged import StagedBackbone

# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class BottleneckConv(nn.Sequential):
    """Optional 1x1 bottleneck to min(c_in, bn_width*c_out), then a 3x3 conv (stride 2 if `down`)."""

    def __init__(self, c_in: int, c_out: int, down: bool, bottleneck: bool, bn_width: int) -> None:
        layers: list[nn.Module] = []
        inner = c_in
        if bottleneck:
            inner = min(c_in, bn_width * c_out)
            layers += [
                nn.Conv2d(c_in, inner, 1, 1, 0, bias=False),
                nn.BatchNorm2d(inner),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.Conv2d(inner, c_out, 3, 2 if down else 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class DenseUnit(nn.Module):
    """New features for one scale: from the same scale (normal) and, if given, the finer one (down).

    With both inputs each path produces half the growth; the result is concatenated onto the
    same-scale input (dense connectivity).
    """

    def __init__(
        self, c_finer: int | None, c_same: int, growth: int, bottleneck: bool, bn_finer: int, bn_same: int
    ) -> None:
        super().__init__()
        self.down: nn.Module | None = None
        if c_finer is None:
            self.normal = BottleneckConv(c_same, growth, False, bottleneck, bn_same)
        else:
            self.down = BottleneckConv(c_finer, growth // 2, True, bottleneck, bn_finer)
            self.normal = BottleneckConv(c_same, growth // 2, False, bottleneck, bn_same)

    def forward(self, finer: Tensor | None, same: Tensor) -> Tensor:
        # finer: (B, Cf, 2H, 2W), same: (B, Cs, H, W) -> (B, Cs + growth, H, W)
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        assert finer is not None
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer mapping `in_scales` scales to `out_scales` (dropping the finest ones)."""

    def __init__(
        self, n_in: int, growth: int, cfg: MSDNetConfig, n_scales: int, in_scales: int, out_scales: int
    ) -> None:
        super().__init__()
        self.in_scales, self.out_scales = in_scales, out_scales
        self.discard = in_scales - out_scales
        offset = n_scales - out_scales  # index of the finest output scale
        gr, bn = cfg.gr_factor, cfg.bn_factor
        self.units = nn.ModuleList()
        for s in range(offset, n_scales):
            has_finer = s > offset or self.discard > 0
            self.units.append(
                DenseUnit(
                    n_in * gr[s - 1] if has_finer else None,
                    n_in * gr[s],
                    growth * gr[s],
                    cfg.bottleneck,
                    bn[s - 1] if has_finer else 1,
                    bn[s],
                )
            )

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        # x: in_scales tensors, finest first; output: out_scales tensors
        out = []
        for j, unit in enumerate(self.units):
            if self.discard > 0:
                out.append(unit(x[j], x[j + 1]))
            else:
                out.append(unit(x[j - 1] if j > 0 else None, x[j]))
        return out


class Stem(nn.Module):
    """CIFAR stem: 3x3 conv at full resolution, then one stride-2 3x3 conv per extra scale."""

    def __init__(self, c_in: int, n_channels: int, gr_factor: tuple[int, ...]) -> None:
        super().__init__()
        convs = []
        prev = c_in
        for s, g in enumerate(gr_factor):
            convs.append(ConvBNReLU(prev, n_channels * g, 3, 1 if s == 0 else 2))
            prev = n_channels * g
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        # (B, 3, 32, 32) -> [(B, 16, 32, 32), (B, 32, 16, 16), (B, 64, 8, 8)]
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class Transition(nn.Module):
    """1x1 conv per remaining scale compressing channels (after a scale was dropped)."""

    def __init__(self, n_in: int, n_out: int, gr_factor: tuple[int, ...], offset: int, out_scales: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNReLU(n_in * gr_factor[offset + i], n_out * gr_factor[offset + i], 1) for i in range(out_scales)
        )

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return [conv(t) for conv, t in zip(self.convs, x, strict=True)]


class Block(nn.Module):
    """The layers between two exits (the first block starts with the stem)."""

    def __init__(self, stem: Stem | None, layers: list[nn.Module]) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)

    def forward(self, image: Tensor, x: list[Tensor]) -> list[Tensor]:
        if self.stem is not None:
            x = self.stem(image)
        for layer in self.layers:
            x = layer(x)
        return x


class CifarHead(nn.Module):
    """Head on the coarsest scale: two stride-2 3x3 convs (C->128->128), AvgPool(2), Linear."""

    def __init__(self, c_in: int, num_classes: int, inter: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU(c_in, inter, 3, 2), ConvBNReLU(inter, inter, 3, 2), nn.AvgPool2d(2))
        self.linear = nn.Linear(inter, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, 8, 8) -> (B, 128, 4, 4) -> (B, 128, 2, 2) -> (B, 128, 1, 1) -> (B, classes)
        return self.linear(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MSDNet(StagedBackbone):
    def __init__(self, blocks: list[Block], heads: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.grad_rescale = True

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    def forward_stage(self, k: int, image: Tensor, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x = list(self.blocks[k](image, features))
        n = self.num_stages
        rescale = self.training and self.grad_rescale
        if rescale:
            x[-1] = gradient_rescale(x[-1], 1.0 / (n - k))
        logits = self.heads[k](x[-1])
        if rescale:
            x[-1] = gradient_rescale(x[-1], float(n - k - 1))
        return x, logits


# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------


def layer_scales(n: int, n_layers: int, n_scales: int) -> tuple[int, int]:
    """prune='max': (in_scales, out_scales) of layer n (1-indexed) out of n_layers."""
    interval = math.ceil(n_layers / n_scales)
    in_scales = n_scales - math.floor(max(0, n - 2) / interval)
    out_scales = n_scales - math.floor((n - 1) / interval)
    return in_scales, out_scales


def build_msdnet(config: ModelConfig) -> MSDNet:
    cfg = config.msdnet
    assert cfg is not None
    n_scales = len(cfg.gr_factor)
    if cfg.step_mode == "even":
        steps = [cfg.base] + [cfg.step] * (cfg.n_blocks - 1)
    else:
        steps = [cfg.base] + [cfg.step * i + 1 for i in range(1, cfg.n_blocks)]
    n_layers = sum(steps)
    n_in = cfg.n_channels
    layer_idx = 0
    blocks: list[Block] = []
    heads: list[nn.Module] = []
    for b, step in enumerate(steps):
        layers: list[nn.Module] = []
        for _ in range(step):
            layer_idx += 1
            in_s, out_s = layer_scales(layer_idx, n_layers, n_scales)
            layers.append(MSDLayer(n_in, cfg.growth_rate, cfg, n_scales, in_s, out_s))
            n_in += cfg.growth_rate
            if in_s > out_s and cfg.reduction > 0:
                n_out = math.floor(cfg.reduction * n_in)
                layers.append(Transition(n_in, n_out, cfg.gr_factor, n_scales - out_s, out_s))
                n_in = n_out
        stem = Stem(config.in_channels, cfg.n_channels, cfg.gr_factor) if b == 0 else None
        blocks.append(Block(stem, layers))
        heads.append(CifarHead(n_in * cfg.gr_factor[-1], config.num_classes, cfg.head_channels))
    return MSDNet(blocks, heads)


# Presets: msdnet-cifar100-anytime / -budgeted, msdnet-cifar10-anytime / -budgeted (models.config.PRESETS).
