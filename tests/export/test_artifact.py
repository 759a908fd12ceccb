"""End-to-end export of tiny real models (MSDNet, compact, cascade): manifest contract,
calibration through the serving engine, determinism, CLI and the failure path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.pipeline import ExportOptions
from export.source import export_from_checkpoint
from models.checkpoint import load_checkpoint
from models.data import load_splits
from models.macs import count_exit_costs
from service.core.artifact import load_calibration, load_manifest, sha256_file
from service.core.engine import Engine
from service.core.exit_rule import max_softmax
from tests.export.conftest import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_contract(kind: str, tiny_artifacts: dict[str, Path], tiny_checkpoints: dict[str, Path]) -> None:
    """Recompute what the manifest claims: file hashes, MACs/params, preprocessing, provenance."""
    art = tiny_artifacts[kind]
    manifest = load_manifest(art, verify=True)
    loaded = load_checkpoint(tiny_checkpoints[kind])
    costs = count_exit_costs(loaded.model, loaded.config.input_shape)
    assert manifest.num_stages == loaded.model.num_stages == len(costs)
    for stage, cost in zip(manifest.stages, costs, strict=True):
        assert stage.file == f"stage_{stage.index + 1:02d}.onnx"
        assert stage.sha256 == sha256_file(art / stage.file)
        assert (stage.macs, stage.cumulative_macs) == (cost.macs, cost.cumulative_macs)
        assert (stage.params, stage.cumulative_params) == (cost.params, cost.cumulative_params)
        assert all(t.shape[0] is None for t in (*stage.inputs, *stage.outputs))
        assert stage.outputs[-1].name == "logits" and stage.outputs[-1].shape == [None, 10]
    assert manifest.calibration is not None
    assert manifest.calibration.sha256 == sha256_file(art / manifest.calibration.file)
    pre = manifest.preprocessing
    assert (pre.channels, pre.height, pre.width, pre.color_mode) == (1, 28, 28, "L")
    assert pre.mean == pytest.approx(list(loaded.config.mean)) and pre.std == pytest.approx(list(loaded.config.std))
    assert manifest.exit_rule.t == pytest.approx(loaded.config.boosting.t)
    assert len(manifest.classes) == 10
    prov = manifest.provenance
    assert prov.checkpoint_sha256 == sha256_file(tiny_checkpoints[kind])
    assert prov.config == loaded.config.to_dict()
    assert prov.opset == 17
    assert {"torch", "onnx", "onnxruntime", "numpy"} <= set(prov.tool_versions)
    assert prov.dataset["heldout_size"] == 40 and prov.dataset["split_seed"] == 0
    assert prov.dataset["kind"] == "fashion-mnist"
    extra = prov.model_extra or {}
    assert extra["parity"]["max_abs_logits"] <= 1e-4
    assert max(extra["engine_parity"]["max_abs_logits"]) <= 1e-4
    cases = {(c["label"], c["batch_size"]) for c in extra["parity"]["cases"]}
    assert cases == {("random", 1), ("random", 5), ("data", 1), ("data", 5)}


def test_stage_wiring_per_kind(tiny_artifacts: dict[str, Path]) -> None:
    msd = load_manifest(tiny_artifacts["msdnet"], verify=False)
    assert len([i for i in msd.stages[1].inputs if i.name.startswith("feat_in_")]) > 1  # multi-scale list
    cascade = load_manifest(tiny_artifacts["cascade"], verify=False)
    assert [i.source for i in cascade.stages[1].inputs] == ["image", "prev:logits"]
    assert [o.name for o in cascade.stages[0].outputs] == ["logits"]


@pytest.mark.parametrize("kind", ["compact", "cascade"])
def test_calibration_matches_engine_softmax(kind: str, tiny_artifacts: dict[str, Path], tiny_data: Path) -> None:
    art = tiny_artifacts[kind]
    manifest = load_manifest(art)
    splits = load_splits(
        tiny_data,
        heldout_size=40,
        seed=0,
        mean=tuple(manifest.preprocessing.mean),
        std=tuple(manifest.preprocessing.std),
    )
    with np.load(art / "calibration.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    n_exits = manifest.num_stages
    assert arrays["heldout_confidence"].shape == (n_exits, 40)
    assert arrays["heldout_confidence"].dtype == np.float32
    assert arrays["heldout_correct"].shape == (n_exits, 40) and arrays["heldout_correct"].dtype == bool
    assert arrays["heldout_labels"].shape == (40,) and arrays["heldout_labels"].dtype == np.int64
    assert arrays["test_confidence"].shape == (n_exits, 60)
    engine = Engine(manifest, art, intra_op_threads=1)
    images = torch.stack([splits.heldout[i][0] for i in range(40)]).numpy()
    labels = np.array([splits.heldout[i][1] for i in range(40)])
    logits = engine.run_all_stages(images)
    np.testing.assert_array_equal(arrays["heldout_labels"], labels)
    for k, z in enumerate(logits):
        # Bitwise: calibration stores the serving confidence, so thresholds sit where serving compares.
        np.testing.assert_array_equal(arrays["heldout_confidence"][k], max_softmax(z))
        np.testing.assert_array_equal(arrays["heldout_correct"][k], z.argmax(axis=1) == labels)
        # ... and what the engine's early-exit path reports when every image answers at exit k + 1.
        thresholds = [np.inf] * k + [-np.inf] * (n_exits - k)
        served = [r.confidence for r in engine.classify(images, thresholds)]
        np.testing.assert_array_equal(np.asarray(served, dtype=np.float32), arrays["heldout_confidence"][k])
    assert manifest.calibration is not None
    np.testing.assert_allclose(manifest.calibration.heldout_accuracy, arrays["heldout_correct"].mean(axis=1))
    np.testing.assert_allclose(manifest.calibration.test_accuracy or [], arrays["test_correct"].mean(axis=1))
    cal = load_calibration(art, manifest)  # the service reads it back
    assert cal.confidence.shape == (n_exits, 40)


def test_export_is_deterministic(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tiny_data: Path, tiny_artifacts: dict[str, Path]
) -> None:
    """Same checkpoint, same data -> byte-identical stage files and calibration, same version."""
    again = export_from_checkpoint(
        tiny_checkpoints["compact"],
        tiny_data,
        tmp_path / "again",
        ExportOptions(progress=False, batch_size=7),
    )
    first = load_manifest(tiny_artifacts["compact"])
    assert again.manifest.version == first.version
    assert [s.sha256 for s in again.manifest.stages] == [s.sha256 for s in first.stages]


def test_version_changes_when_a_file_changes(tiny_artifacts: dict[str, Path]) -> None:
    from service.core.artifact import content_version

    body = json.loads((tiny_artifacts["compact"] / "manifest.json").read_text())
    version = body.pop("version")
    assert content_version(body) == version
    body["stages"][1]["sha256"] = "0" * 64
    assert content_version(body) != version


def test_cli_export_and_parity_failure(
    tmp_path: Path,
    tiny_checkpoints: dict[str, Path],
    tiny_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from boostserve.cli import main

    out = tmp_path / "cli_art"
    base = [
        "export",
        "--checkpoint",
        str(tiny_checkpoints["cascade"]),
        "--data",
        str(tiny_data),
        "--quiet",
        "--threads",
        "1",
    ]
    assert main([*base, "--out", str(out), "--no-test", "--name", "cli-model"]) == 0
    manifest = load_manifest(out)
    assert manifest.name == "cli-model" and manifest.calibration is not None
    assert manifest.calibration.test_accuracy is None
    assert "parity max abs" in capsys.readouterr().out

    # Perturb what gets exported (not the torch reference): export must fail loudly, write nothing.
    import export.stages as stages

    original = stages.StageModule.forward

    def perturbed(self: stages.StageModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = original(self, *inputs)
        return (*outputs[:-1], outputs[-1] + 1e-3)

    monkeypatch.setattr(stages.StageModule, "forward", perturbed)
    bad = tmp_path / "bad_art"
    assert main([*base, "--out", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "does not match torch" in err and "nothing was written" in err
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli_art"]  # no temp dirs left


def test_no_calibrate(tmp_path: Path, tiny_checkpoints: dict[str, Path], tiny_data: Path) -> None:
    result = export_from_checkpoint(
        tiny_checkpoints["msdnet"],
        tiny_data,
        tmp_path / "nocal",
        ExportOptions(progress=False, calibrate=False),
    )
    manifest = load_manifest(result.path)
    assert manifest.calibration is None
    assert not (result.path / "calibration.npz").exists()
    engine = Engine(manifest, result.path, intra_op_threads=1)
    assert [z.shape for z in engine.run_all_stages(np.zeros((5, 1, 28, 28), np.float32))] == [(5, 10)] * 3


def test_tiny_export_helper(tmp_path: Path) -> None:
    from tests.fixtures.tiny_export import export_tiny_artifact

    art = export_tiny_artifact(tmp_path / "helper", kind="compact", seed=1, logit_scale=5.0)
    manifest = load_manifest(art)
    engine = Engine(manifest, art, intra_op_threads=1)
    results = engine.classify(np.zeros((2, 1, 28, 28), np.float32))
    assert len(results) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_are_clean(kind: str, tiny_artifacts: dict[str, Path]) -> None:
    """Eval-mode graphs: BatchNorm folded into Conv, no Identity leftovers, no dropout, one opset."""
    import onnx

    manifest = load_manifest(tiny_artifacts[kind], verify=False)
    for stage in manifest.stages:
        model = onnx.load(str(tiny_artifacts[kind] / stage.file))
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"BatchNormalization", "Identity", "Dropout", "PythonOp", "ATen"}, (stage.file, ops)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_cli_modules_import_light() -> None:
    """`boostserve export/report --help` must not pay for torch, onnxruntime or matplotlib."""
    import subprocess
    import sys

    code = (
        "import sys, export.commands.export, export.commands.report; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'matplotlib', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
