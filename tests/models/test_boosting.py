from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.boosting import boosted_loss, gradient_rescale
from models.build import build_model

from .conftest import tiny_compact, tiny_msdnet


@pytest.mark.parametrize("training", [False, True])
def test_boosted_logits_follow_the_formula(training: bool) -> None:
    model = build_model(tiny_compact().with_boosting(t=0.5)).train(training)
    x = torch.randn(8, 1, 12, 12)
    raw = model.raw_logits(x)
    outs = model(x)
    for k, out in enumerate(outs):
        expected = sum(0.5 ** (k - j) * raw[j] for j in range(k + 1))
        torch.testing.assert_close(out, expected)


def test_t_zero_is_the_plain_joint_baseline() -> None:
    model = build_model(tiny_compact().with_boosting(t=0.0)).eval()
    x = torch.randn(4, 1, 12, 12)
    for a, b in zip(model(x), model.raw_logits(x), strict=True):
        torch.testing.assert_close(a, b)


def _head_grads(stop_grad: bool, exit_index: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(tiny_compact().with_boosting(t=0.5, stop_grad=stop_grad)).train()
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x)[exit_index], y).backward()
    heads = model.backbone.heads
    return [0.0 if h.linear.weight.grad is None else float(h.linear.weight.grad.abs().sum()) for h in heads]


def test_stop_grad_keeps_exit_loss_away_from_earlier_heads() -> None:
    grads = _head_grads(stop_grad=True, exit_index=2)
    assert grads[0] == 0.0 and grads[1] == 0.0 and grads[2] > 0
    grads = _head_grads(stop_grad=False, exit_index=2)
    assert grads[0] > 0 and grads[1] > 0 and grads[2] > 0


def test_boosted_loss_is_unweighted_sum_of_batch_mean_ce() -> None:
    outs = [torch.randn(6, 3) for _ in range(3)]
    y = torch.randint(0, 3, (6,))
    total, parts = boosted_loss(outs, y)
    torch.testing.assert_close(total, sum(F.cross_entropy(o, y) for o in outs))
    assert len(parts) == 3


def test_gradient_rescale_is_identity_forward_scaled_backward() -> None:
    x = torch.randn(5, requires_grad=True)
    y = gradient_rescale(x, 0.25)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), 0.25))


def _block_output_grad(rescale: bool, k: int, source: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(tiny_msdnet(n_blocks=4).with_boosting(grad_rescale=rescale)).train()
    backbone = model.backbone
    captured: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: list[torch.Tensor]) -> None:
        out[-1].retain_grad()
        captured.append(out[-1])

    backbone.blocks[k].register_forward_hook(keep)
    x = torch.randn(2, 3, 32, 32)
    feats: list[torch.Tensor] = []
    for j in range(k + 1):
        feats, logits = backbone.forward_stage(j, x, feats)
    weight = torch.randn_like(logits) if source == "head" else torch.randn_like(feats[-1])
    ((logits if source == "head" else feats[-1]) * weight).sum().backward()
    return captured[0].grad


@pytest.mark.parametrize("k", [0, 1, 2])
def test_gradient_rescaling_factors_around_classifier(k: int) -> None:
    n = 4
    head_ratio = _block_output_grad(True, k, "head") / _block_output_grad(False, k, "head")
    torch.testing.assert_close(head_ratio, torch.full_like(head_ratio, 1.0 / (n - k)))
    later_ratio = _block_output_grad(True, k, "later") / _block_output_grad(False, k, "later")
    torch.testing.assert_close(later_ratio, torch.full_like(later_ratio, (n - k - 1) / (n - k)))


def test_gradient_rescaling_is_absent_in_eval_mode() -> None:
    model = build_model(tiny_msdnet()).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x)[-1].sum().backward()
    assert "GradRescale" not in str(model(x)[-1].grad_fn.next_functions)
