"""A checkpoint's last exit as one plain ONNX classifier: the "user's model" of docs/byom.md.

Why: to measure attach-exits the way a user would meet it, the input must be an ordinary ONNX
file that knows nothing of exits. A network trained with `boostserve train --plain` has t = 0,
so its last exit F_{N-1} = f_{N-1} is the whole network; the intermediate heads are dead code
here (their outputs are unused, so the exporter drops them).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from export.attach.errors import AttachError
from export.onnx_export import DEFAULT_OPSET
from models.checkpoint import load_checkpoint
from models.staged import StagedBackbone


class LastExit(nn.Module):
    """image (B, C, H, W) -> raw logits of the last exit (B, classes), through every stage."""

    def __init__(self, backbone: StagedBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: Tensor) -> Tensor:
        features: list[Tensor] = []
        raw = image
        for k in range(self.backbone.num_stages):
            features, raw = self.backbone.forward_stage(k, image, features)
        return raw


def export_last_exit(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write the last exit of a t = 0 checkpoint as `out` (input `input`, output `output`, dynamic batch)."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    if float(model.t) != 0.0 and model.num_stages > 1:
        raise AttachError(f"{checkpoint}: t = {model.t}; only a t = 0 network's last exit is the whole network")
    module = LastExit(model.backbone).eval()
    example = torch.zeros(loaded.config.input_shape)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
            opset_version=opset,
            dynamo=False,
        )
    return out
