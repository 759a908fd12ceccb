"""Compact ResNet-style early-exit network and the seed-000 cascade built from the same parts.

Compact: a stem, then one stage of residual blocks per exit with growing widths, and a
global-average-pool + linear head after each stage. The first stage works at full resolution
with few channels so the first exit is very cheap; later stages are wide, so the last exit is
strong and dominates the compute (what makes early exits pay off in serving).

Cascade (seed 000): every stage is an independent compact network that reads the raw image;
stage k ignores the previous features (`stage_reads_image(k)` is True for all k). Boosting
still combines their logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.config import CompactConfig, ModelConfig
from models.staged import StagedBackbone

# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        # (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Stem(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PoolLinearHead(nn.Module):
    """Global average pool + linear: an exit costs C + C*classes MACs."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, C, 1, 1) -> (B, classes)
        return self.linear(self.pool(x).flatten(1))


def make_stages(in_channels: int, cfg: CompactConfig) -> tuple[list[nn.Module], list[int]]:
    """Stage modules (stem folded into stage 0) and their output widths."""
    stages: list[nn.Module] = []
    c = cfg.stem_channels
    for k, (width, n_blocks, stride) in enumerate(zip(cfg.widths, cfg.blocks, cfg.strides, strict=True)):
        layers: list[nn.Module] = [Stem(in_channels, cfg.stem_channels)] if k == 0 else []
        for b in range(n_blocks):
            layers.append(BasicBlock(c, width, stride if b == 0 else 1))
            c = width
        stages.append(nn.Sequential(*layers))
    return stages, list(cfg.widths)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class CompactNet(StagedBackbone):
    """features: a single tensor (B, widths[k], H_k, W_k) handed from stage k to k+1."""

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_stage(self, k: int, image: Tensor, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x = self.stages[k](image if k == 0 else features[0])
        return [x], self.heads[k](x)


class Cascade(StagedBackbone):
    """Independent member networks; member k's body and head form stage k."""

    def __init__(self, members: list[nn.Module], heads: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.heads = nn.ModuleList(heads)

    @property
    def num_stages(self) -> int:
        return len(self.members)

    def stage_reads_image(self, k: int) -> bool:
        return True

    def forward_stage(self, k: int, image: Tensor, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        # image: (B, C, H, W) -> member body -> (B, C_k, h, w) -> head -> (B, classes); no features passed on
        return [], self.heads[k](self.members[k](image))


# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------


def build_compact(config: ModelConfig) -> CompactNet:
    assert config.compact is not None
    stages, widths = make_stages(config.in_channels, config.compact)
    return CompactNet(stages, [PoolLinearHead(w, config.num_classes) for w in widths])


def build_cascade(config: ModelConfig) -> Cascade:
    assert config.cascade is not None
    members: list[nn.Module] = []
    heads: list[nn.Module] = []
    for member in config.cascade.members:
        stages, widths = make_stages(config.in_channels, member)
        members.append(nn.Sequential(*stages))
        heads.append(PoolLinearHead(widths[-1], config.num_classes))
    return Cascade(members, heads)


# Presets: compact-fashion-mnist, compact-cifar10, cascade-fashion-mnist (models.config.PRESETS).
