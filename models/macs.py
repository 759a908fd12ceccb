"""Per-exit MACs and parameters, counted the way the BoostNet/MSDNet papers count them.

One forward of a single zero image, stage by stage, with forward hooks on the leaf modules:
Conv2d Cin*Cout*kh*kw*Hout*Wout/groups (bias ignored), ReLU numel of the output, Avg/MaxPool
C*Hout*Wout*k*k, adaptive average pool C*Hin*Win, Linear weight.numel + bias.numel,
BatchNorm and everything functional (adds, concatenation) 0. Stage k's cost is block k plus
head k; the cost of *answering* at exit k is cumulative over stages 0..k (all heads included,
because an early-exit network evaluates every head on the way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.boosting import BoostedNet


@dataclass(frozen=True)
class ExitCost:
    exit: int  # 1-based
    macs: int  # incremental: stage k only (block + head)
    cumulative_macs: int
    params: int  # incremental: parameters first used by stage k
    cumulative_params: int


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def module_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    """MACs of one leaf module call for a batch of one."""
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        h, w = output.shape[-2:]
        return module.in_channels * module.out_channels * kh * kw * h * w // module.groups
    if isinstance(module, nn.ReLU | nn.ReLU6 | nn.SiLU | nn.GELU):
        return output[0].numel()
    if isinstance(module, nn.AvgPool2d | nn.MaxPool2d):
        kh, kw = _pair(module.kernel_size)
        c, h, w = output.shape[-3:]
        return c * h * w * kh * kw
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return inputs[0][0].numel()
    if isinstance(module, nn.Linear):
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return 0


@torch.no_grad()
def count_exit_costs(model: BoostedNet, input_shape: tuple[int, int, int, int] | None = None) -> list[ExitCost]:
    """Incremental and cumulative MACs/params per exit (paper convention, batch of one zero image)."""
    backbone = model.backbone
    shape = input_shape or model.config.input_shape
    shape = (1, *shape[1:])
    was_training = model.training
    model.eval()
    current = {"macs": 0}
    seen: set[int] = set()
    new_params = {"n": 0}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        current["macs"] += module_macs(module, inputs, output)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                new_params["n"] += p.numel()

    handles = [m.register_forward_hook(hook) for m in backbone.modules() if not list(m.children())]
    try:
        device = next(model.parameters()).device
        image = torch.zeros(shape, device=device)
        features: list[Tensor] = []
        costs: list[ExitCost] = []
        cum_macs = cum_params = 0
        for k in range(backbone.num_stages):
            current["macs"] = 0
            new_params["n"] = 0
            features, _ = backbone.forward_stage(k, image, features)
            cum_macs += current["macs"]
            cum_params += new_params["n"]
            costs.append(ExitCost(k + 1, current["macs"], cum_macs, new_params["n"], cum_params))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return costs
