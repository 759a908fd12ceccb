from __future__ import annotations

import pytest
import torch

from models.build import build_model
from models.config import PRESETS, get_preset
from models.msdnet import layer_scales

from .conftest import tiny_compact, tiny_msdnet


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_one_logit_tensor_per_exit(name: str) -> None:
    config = get_preset(name)
    model = build_model(config).eval()
    x = torch.randn(2, *config.input_shape[1:])
    with torch.no_grad():
        outs = model(x)
    expected = {
        "msdnet-cifar100-anytime": 10,
        "msdnet-cifar100-budgeted": 6,
        "msdnet-cifar10-anytime": 10,
        "msdnet-cifar10-budgeted": 6,
    }.get(name)
    assert len(outs) == model.num_stages == (expected or model.num_stages)
    assert all(o.shape == (2, config.num_classes) for o in outs)


def test_msdnet_feature_scales_shrink_with_prune_max() -> None:
    model = build_model(get_preset("msdnet-cifar100-anytime")).eval()
    x, feats, n_scales = torch.zeros(1, 3, 32, 32), [], []
    with torch.no_grad():
        for k in range(model.num_stages):
            feats, _ = model.backbone.forward_stage(k, x, feats)
            n_scales.append(len(feats))
    assert n_scales == [3, 3, 3, 2, 2, 2, 2, 1, 1, 1]
    assert feats[-1].shape[-2:] == (8, 8)
    # 22 layers in 3 scales: interval 8; layer 9 (first of block 3) drops the finest scale
    assert layer_scales(8, 22, 3) == (3, 3) and layer_scales(9, 22, 3) == (3, 2)


def test_cascade_stages_read_the_image_and_ignore_features() -> None:
    model = build_model(get_preset("cascade-fashion-mnist")).eval()
    backbone = model.backbone
    assert all(backbone.stage_reads_image(k) for k in range(backbone.num_stages))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        _, a = backbone.forward_stage(1, x, [])
        _, b = backbone.forward_stage(1, x, [torch.randn(2, 32, 14, 14)])
        _, c = backbone.forward_stage(1, torch.randn(2, 1, 28, 28), [])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_compact_stage_zero_reads_image_only() -> None:
    backbone = build_model(tiny_compact()).backbone
    assert backbone.stage_reads_image(0) and not backbone.stage_reads_image(1)


def test_tiny_msdnet_builds() -> None:
    outs = build_model(tiny_msdnet()).eval()(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 5)] * 3
