"""Model configuration: frozen dataclasses that travel with the weights.

A checkpoint stores `ModelConfig.to_dict()` (plain JSON types only) next to the tensors, so
`torch.load(weights_only=True)` can read it and `export/` can put mean/std and the exit layout
into the serving manifest without importing any training code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass(frozen=True)
class BoostingConfig:
    """The three BoostNet switches. t=0 (with or without stop-grad) is the plain joint-training baseline."""

    t: float = 0.5
    stop_grad: bool = True
    grad_rescale: bool = True


@dataclass(frozen=True)
class MSDNetConfig:
    """kalviny MSDNet-PyTorch arguments (CIFAR stem and heads, prune='max', bottleneck)."""

    n_blocks: int = 10
    step_mode: str = "even"  # "even": every block after the first has `step` layers; "lin_grow": step*i+1
    step: int = 2
    base: int = 4
    n_channels: int = 16
    growth_rate: int = 6
    gr_factor: tuple[int, ...] = (1, 2, 4)
    bn_factor: tuple[int, ...] = (1, 2, 4)
    reduction: float = 0.5
    bottleneck: bool = True
    head_channels: int = 128


@dataclass(frozen=True)
class CompactConfig:
    """A ResNet-style early-exit net: stem, then one stage of residual blocks per exit.

    widths[k] channels and blocks[k] residual blocks in stage k; strides[k] is the stride of its
    first block. Heads are global average pool + linear, so exits cost almost nothing beyond the
    body they sit on.
    """

    stem_channels: int = 16
    widths: tuple[int, ...] = (16, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 2, 2, 2)
    strides: tuple[int, ...] = (1, 2, 2, 2)


@dataclass(frozen=True)
class CascadeConfig:
    """Seed 000: independent networks of growing size, each reading the raw image."""

    members: tuple[CompactConfig, ...] = ()


@dataclass(frozen=True)
class TrainingConfig:
    """The default recipe for a preset; every field can be overridden on the train CLI."""

    epochs: int = 300
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step" (x0.1 at milestones) | "onecycle" | "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` for "step"
    augment: str = "crop_flip"  # "crop_flip" | "none"
    crop_padding: int = 4
    # "fp32" | "bf16": bf16 autocast of forward + loss (weights, optimizer and BN statistics stay fp32).
    # On a CPU with AVX512-BF16/AMX it is ~1.65x faster for the compact net (495 -> 819 img/s on 2 threads),
    # which buys the extra epochs the ~15 min budget needs; without native bf16 it is emulated and slower.
    precision: str = "fp32"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str  # "msdnet" | "compact" | "cascade"
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    boosting: BoostingConfig = field(default_factory=BoostingConfig)
    msdnet: MSDNetConfig | None = None
    compact: CompactConfig | None = None
    cascade: CascadeConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataset: str = ""  # the dataset kind the preset is meant for ("fashion-mnist", "cifar10", ...)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, self.image_size, self.image_size)

    def with_boosting(self, **changes: Any) -> ModelConfig:
        return replace(self, boosting=replace(self.boosting, **changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists) so it survives torch.load(weights_only=True)."""
        return _plain(asdict(self))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        d = dict(data)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        d["boosting"] = BoostingConfig(**d.get("boosting", {}))
        d["training"] = _from(TrainingConfig, d.get("training") or {})
        d["msdnet"] = _from(MSDNetConfig, d["msdnet"]) if d.get("msdnet") else None
        d["compact"] = _from(CompactConfig, d["compact"]) if d.get("compact") else None
        if d.get("cascade"):
            d["cascade"] = CascadeConfig(tuple(_from(CompactConfig, m) for m in d["cascade"]["members"]))
        else:
            d["cascade"] = None
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in d.items() if k in known})


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _from(cls: Any, data: dict[str, Any]) -> Any:
    """Rebuild a flat dataclass, turning lists back into tuples."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

_PAPER_RECIPE = TrainingConfig(
    epochs=300,
    batch_size=64,
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    schedule="step",
    milestones=(0.5, 0.75),
    augment="crop_flip",
    crop_padding=4,
)
# Compact nets: SGD + nesterov + OneCycle reaches high accuracy in few epochs (super-convergence),
# which is what a ~15 min CPU budget needs.
_COMPACT_RECIPE = TrainingConfig(
    epochs=12,
    batch_size=128,
    lr=0.2,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="onecycle",
    milestones=(),
    augment="crop_flip",
    crop_padding=2,
    precision="bf16",
)


def _msdnet(name: str, classes: int, n_blocks: int) -> ModelConfig:
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    return ModelConfig(
        name=name,
        arch="msdnet",
        num_classes=classes,
        in_channels=3,
        image_size=32,
        mean=mean,
        std=std,
        msdnet=MSDNetConfig(n_blocks=n_blocks),
        training=_PAPER_RECIPE,
        dataset="cifar100" if classes == 100 else "cifar10",
    )


# Measured on 2 CPU threads (fwd+bwd, batch 128): 495 img/s fp32, 819 img/s bf16 autocast; 60-80 s per
# 55k-image epoch with the recipe's bf16. Exits at 1.9 / 12.2 / 23.4 / 38.1 M MACs: the first costs 5 % of the full net.
FMNIST_COMPACT = CompactConfig(stem_channels=16, widths=(24, 64, 128, 256), blocks=(1, 1, 1, 1), strides=(2, 1, 2, 2))
CIFAR_COMPACT = CompactConfig(stem_channels=16, widths=(16, 64, 128, 256), blocks=(1, 2, 2, 2), strides=(1, 2, 2, 2))

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _msdnet("msdnet-cifar100-anytime", 100, 10),
        _msdnet("msdnet-cifar100-budgeted", 100, 6),
        _msdnet("msdnet-cifar10-anytime", 10, 10),
        _msdnet("msdnet-cifar10-budgeted", 10, 6),
        ModelConfig(
            name="compact-fashion-mnist",
            arch="compact",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            compact=FMNIST_COMPACT,
            training=_COMPACT_RECIPE,
            dataset="fashion-mnist",
        ),
        ModelConfig(
            name="compact-cifar10",
            arch="compact",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            compact=CIFAR_COMPACT,
            training=replace(_COMPACT_RECIPE, epochs=30, crop_padding=4),
            dataset="cifar10",
        ),
        # The cheap member of the bring-your-own-model cascade (docs/byom.md): the first member of
        # cascade-fashion-mnist as a network of its own, trained plain, independently of the large one.
        ModelConfig(
            name="small-fashion-mnist",
            arch="compact",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            compact=CompactConfig(stem_channels=8, widths=(16, 32), blocks=(1, 1), strides=(2, 2)),
            training=_COMPACT_RECIPE,
            dataset="fashion-mnist",
        ),
        ModelConfig(
            name="cascade-fashion-mnist",
            arch="cascade",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            cascade=CascadeConfig(
                (
                    CompactConfig(stem_channels=8, widths=(16, 32), blocks=(1, 1), strides=(2, 2)),
                    CompactConfig(stem_channels=32, widths=(32, 64, 128), blocks=(1, 2, 2), strides=(1, 2, 2)),
                )
            ),
            boosting=BoostingConfig(t=0.5, stop_grad=True, grad_rescale=False),
            training=_COMPACT_RECIPE,
            dataset="fashion-mnist",
        ),
    )
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(sorted(PRESETS))}") from None
