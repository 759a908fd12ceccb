"""Checkpoints that carry their own model config and load with `torch.load(weights_only=True)`.

Layout: {"format", "config": ModelConfig.to_dict(), "state_dict", "meta", "train_state"} with
only tensors and plain JSON-like values, so loading never unpickles arbitrary objects.
`meta["data"]` = {dataset, data_dir, heldout_size, split_seed, ...}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.boosting import BoostedNet
from models.build import build_model
from models.config import ModelConfig

FORMAT = "boostserve-checkpoint-v1"


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: BoostedNet
    config: ModelConfig
    meta: dict[str, Any]
    train_state: dict[str, Any] | None = None


def save_checkpoint(
    path: str | Path,
    model: BoostedNet,
    config: ModelConfig,
    *,
    train_state: dict[str, Any] | None = None,
    **meta: Any,
) -> None:
    """Atomically write a checkpoint (temp file + rename, so a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the stored config and load its weights; the model is in eval mode."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a boostserve checkpoint (format {FORMAT})")
    config = ModelConfig.from_dict(payload["config"])
    model = build_model(config)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return LoadedCheckpoint(model, config, dict(payload.get("meta", {})), payload.get("train_state"))
