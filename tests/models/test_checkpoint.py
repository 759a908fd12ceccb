from __future__ import annotations

from pathlib import Path

import torch

from models.build import build_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig, get_preset

from .conftest import tiny_compact, tiny_msdnet


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    for config in (tiny_compact(), tiny_msdnet(), get_preset("cascade-fashion-mnist")):
        model = build_model(config)
        model.train()
        model(torch.randn(4, *config.input_shape[1:]))  # move BN running stats off their defaults
        model.eval()
        path = tmp_path / f"{config.name}.pt"
        data = {"dataset": "fashion-mnist", "data_dir": "/x", "heldout_size": 5000, "split_seed": 0}
        save_checkpoint(path, model, config, data=data, note="hi")
        raw = torch.load(path, weights_only=True)
        assert raw["config"]["name"] == config.name
        loaded = load_checkpoint(path)
        assert loaded.config == config and not loaded.model.training
        assert loaded.meta["data"] == data and loaded.meta["note"] == "hi"
        x = torch.randn(3, *config.input_shape[1:])
        with torch.no_grad():
            for a, b in zip(model(x), loaded.model(x), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_dict_is_plain_json() -> None:
    import json

    for name in ("msdnet-cifar100-anytime", "cascade-fashion-mnist", "compact-fashion-mnist"):
        config = get_preset(name)
        text = json.dumps(config.to_dict())
        assert ModelConfig.from_dict(json.loads(text)) == config
