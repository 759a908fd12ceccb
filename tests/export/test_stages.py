"""Stage wrappers and ONNX graphs on a test-double backbone (two feature scales, a cascade stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.errors import ExportError
from export.pipeline import ExportOptions, ExportSource, export_artifact
from export.stages import custom_autograd_functions, plan_stages
from models.boosting import gradient_rescale
from tests.export.doubles import TwoScaleNet, costs, make_double

IMAGE = (1, 16, 16)


def _source(backbone: TwoScaleNet, t: float = 0.5) -> ExportSource:
    return ExportSource(
        backbone=backbone,
        t=t,
        name="double",
        image_shape=IMAGE,
        mean=[0.5],
        std=[0.25],
        classes=[f"c{i}" for i in range(5)],
        costs=costs(backbone.num_stages),
    )


def _export(tmp_path: Path, backbone: TwoScaleNet, name: str = "art", t: float = 0.5) -> Path:
    result = export_artifact(
        _source(backbone, t), tmp_path / name, options=ExportOptions(calibrate=False, progress=False)
    )
    assert result.parity.worst <= 1e-4
    return result.path


def test_plan_feature_lists_and_cascade() -> None:
    net = make_double(cascade_stage=2, stages=4)
    plans = plan_stages(net, 0.5, torch.randn(2, *IMAGE))
    assert [p.input_names for p in plans] == [
        ["image"],
        ["feat_in_0", "feat_in_1", "logits_in"],
        ["image", "logits_in"],  # cascade: reads the image, not the previous features
        ["feat_in_0", "feat_in_1", "logits_in"],
    ]
    # Features only where the next stage consumes them: none before the cascade stage or on the last.
    assert [p.output_names for p in plans] == [
        ["feat_out_0", "feat_out_1", "logits"],
        ["logits"],
        ["feat_out_0", "feat_out_1", "logits"],
        ["logits"],
    ]
    assert plans[1].inputs[0].shape == (None, 4, 16, 16)
    assert plans[1].inputs[1].shape == (None, 4, 8, 8)
    assert plans[3].source("feat_in_1") == "prev:feat_out_1"
    assert plans[3].source("logits_in") == "prev:logits"


@pytest.mark.parametrize("cascade_stage", [None, 1])
def test_graphs_names_dynamic_batch_and_boosting(tmp_path: Path, cascade_stage: int | None) -> None:
    net = make_double(cascade_stage=cascade_stage)
    art = _export(tmp_path, net)
    plans = plan_stages(net, 0.5, torch.randn(2, *IMAGE))
    for batch in (1, 5):
        image = torch.randn(batch, *IMAGE)
        prev: dict[str, np.ndarray] = {}
        expected = [f for _, f in _reference(net, 0.5, image)]
        for k, plan in enumerate(plans):
            path = art / f"stage_{k + 1:02d}.onnx"
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
            assert [o.version for o in model.opset_import] == [17]
            assert [i.name for i in model.graph.input] == plan.input_names
            assert [o.name for o in model.graph.output] == plan.output_names
            for value in (*model.graph.input, *model.graph.output):
                assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {n: image.numpy() if n == "image" else prev[plan.source(n)[5:]] for n in plan.input_names}
            prev = dict(zip(plan.output_names, session.run(None, feeds), strict=True))
            assert prev["logits"].shape == (batch, 5)
            np.testing.assert_allclose(prev["logits"], expected[k].numpy(), atol=1e-4)


def _reference(net: TwoScaleNet, t: float, image: torch.Tensor) -> list[tuple[None, torch.Tensor]]:
    """F_k = f_k + t F_{k-1}, written out independently of export.stages."""
    out: list[tuple[None, torch.Tensor]] = []
    features: list[torch.Tensor] = []
    prev: torch.Tensor | None = None
    with torch.no_grad():
        for k in range(net.num_stages):
            features, f = net.forward_stage(k, image, [] if net.stage_reads_image(k) else features)
            prev = f if prev is None else f + t * prev
            out.append((None, prev))
    return out


def test_t_is_baked_into_the_graph(tmp_path: Path) -> None:
    net = make_double()
    a = _export(tmp_path, net, "t05", t=0.5)
    b = _export(tmp_path, net, "t0", t=0.0)
    image = torch.randn(3, *IMAGE).numpy()
    first = ort.InferenceSession(str(a / "stage_01.onnx")).run(None, {"image": image})
    logits_in = np.full((3, 5), 10.0, dtype=np.float32)
    feeds = {"feat_in_0": first[0], "feat_in_1": first[1], "logits_in": logits_in}
    with_t = ort.InferenceSession(str(a / "stage_02.onnx")).run(["logits"], feeds)[0]
    without = ort.InferenceSession(str(b / "stage_02.onnx")).run(["logits"], feeds)[0]
    np.testing.assert_allclose(with_t - without, 5.0, atol=1e-4)  # t * logits_in = 0.5 * 10


def test_train_mode_is_refused(tmp_path: Path) -> None:
    net = make_double().train()
    with pytest.raises(ExportError, match="eval mode"):
        export_artifact(_source(net), tmp_path / "x", options=ExportOptions(calibrate=False, progress=False))
    assert not (tmp_path / "x").exists()


class _RescalingNet(TwoScaleNet):
    """Applies the gradient-rescaling autograd Function even in eval mode (a bug to catch)."""

    def forward_stage(self, k, image, features):  # type: ignore[no-untyped-def]
        feats, logits = super().forward_stage(k, image, features)
        return feats, gradient_rescale(logits, 0.5)


def test_custom_autograd_function_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _RescalingNet().eval()
    assert custom_autograd_functions(net, 0.5, torch.randn(1, *IMAGE)) == ["_GradRescale"]
    assert custom_autograd_functions(make_double(), 0.5, torch.randn(1, *IMAGE)) == []
    with pytest.raises(ExportError, match="autograd"):
        export_artifact(_source(net), tmp_path / "x", options=ExportOptions(calibrate=False, progress=False))
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_existing_output_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    net = make_double()
    art = _export(tmp_path, net)
    before = (art / "manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        _export(tmp_path, net)
    assert (art / "manifest.json").read_text() == before
    result = export_artifact(_source(net), art, options=ExportOptions(calibrate=False, progress=False, overwrite=True))
    assert result.path == art and (art / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
