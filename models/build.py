"""Build a BoostedNet from a ModelConfig (the single entry point used by training, checkpoints, export)."""

from __future__ import annotations

from models.boosting import BoostedNet
from models.config import ModelConfig
from models.staged import StagedBackbone


def build_backbone(config: ModelConfig) -> StagedBackbone:
    if config.arch == "msdnet":
        from models.msdnet import build_msdnet

        return build_msdnet(config)
    if config.arch == "compact":
        from models.compact import build_compact

        return build_compact(config)
    if config.arch == "cascade":
        from models.compact import build_cascade

        return build_cascade(config)
    raise ValueError(f"unknown arch {config.arch!r} (expected msdnet, compact or cascade)")


def build_model(config: ModelConfig) -> BoostedNet:
    return BoostedNet(build_backbone(config), config)
