"""`boostserve attach-exits` on a tiny plain ONNX classifier: the whole path, parity, MACs, bad inputs.

The "user's model" is a seeded random-weight compact net with t = 0 written as one ONNX file by
`export.attach.plain` (what a user brings: a plain classifier file that knows nothing of exits).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from boostserve.cli import main
from tests.fixtures.tiny_export import save_tiny_checkpoint, write_tiny_idx

MEAN, STD = "0.2860", "0.3530"
#: Right after the stem convolution (1 input channel): split there, ONNX Runtime's layout optimiser
#: changes the last bits of the logits (docs/byom.md), so it is never used.
STEM_RELU = "/stages.0/stages.0.0/stages.0.0.2/Relu_output_0"
#: A tensor inside the first residual block of the tiny compact net: the identity skip bypasses it.
INSIDE_BLOCK = "/stages.0/stages.0.1/relu1/Relu_output_0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_idx(tmp_path_factory.mktemp("attach_data"), n_train=160, n_test=60, seed=1)


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from export.attach.plain import export_last_exit

    root = tmp_path_factory.mktemp("attach_model")
    checkpoint = save_tiny_checkpoint(root / "plain.pt", kind="compact", t=0.0, seed=3, data_dir=data_dir)
    return export_last_exit(checkpoint, root / "plain.onnx")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, plain_onnx: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("attach_art") / "art"
    args = ["attach-exits", "--model", str(plain_onnx), "--data", str(data_dir), "--out", str(out)]
    args += ["--mean", MEAN, "--std", STD, "--cuts", "auto:2", "--heldout-size", "40", "--threads", "1", "--quiet"]
    assert main(args) == 0
    return out


def _session(path: Path | bytes) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, options)


def _heldout_images(data_dir: Path, n: int = 40) -> np.ndarray:
    from models.data import load_splits

    splits = load_splits(data_dir, heldout_size=40, seed=0, mean=(0.2860,), std=(0.3530,), augment="none")
    images, _ = next(splits.heldout.batches(n))
    return images.numpy()  # (n, 1, 28, 28) float32


def test_last_exit_is_the_original_network_bit_for_bit(artifact: Path, plain_onnx: Path, data_dir: Path) -> None:
    from service.core.artifact import load_manifest
    from service.core.engine import Engine

    manifest = load_manifest(artifact)
    assert manifest.num_stages == 3
    assert manifest.exit_rule.t == 0.0
    images = _heldout_images(data_dir)
    exits = Engine(manifest, artifact).run_all_stages(images)
    original = _session(plain_onnx).run(None, {"input": images})[0]  # type: ignore[attr-defined]
    assert np.array_equal(exits[-1], original)
    assert not np.array_equal(exits[0], original)  # the first exit is a head of its own


def test_manifest_macs_match_the_torch_count(artifact: Path, plain_onnx: Path) -> None:
    """The ONNX MAC counter agrees with models.macs: the full cost is the plain net's blocks + last head."""
    from export.attach.graph import head_macs, load_classifier
    from models.build import build_model
    from models.macs import count_exit_costs
    from service.core.artifact import load_manifest
    from tests.fixtures.tiny_export import tiny_config

    classifier = load_classifier(plain_onnx)
    torch_costs = count_exit_costs(build_model(tiny_config("compact", t=0.0)))
    # the torch count includes the two intermediate heads (GAP + linear on 4x28x28 and 8x14x14)
    intermediate = head_macs((4, 28, 28), 10) + head_macs((8, 14, 14), 10)  # heads 0 and 1 of the torch net
    assert classifier.total_macs == torch_costs[-1].cumulative_macs - intermediate
    manifest = load_manifest(artifact)
    cuts = manifest.provenance.model_dump()["attach"]["cuts"]
    heads = sum(head_macs(c["shape"], 10) for c in cuts)
    assert manifest.full_macs == classifier.total_macs + heads


def test_exit_heads_in_the_graph_compute_the_trained_heads(artifact: Path, plain_onnx: Path, data_dir: Path) -> None:
    """Exit 1's ONNX answer equals the pooled-feature linear head (the head the trainer fitted)."""
    from export.attach.features import extraction_model
    from export.attach.graph import load_classifier, resolve_cuts
    from service.core.artifact import load_manifest
    from service.core.engine import Engine

    manifest = load_manifest(artifact)
    classifier = load_classifier(plain_onnx)
    cut_names = [c["name"] for c in manifest.provenance.model_dump()["attach"]["cuts"]]
    cuts = resolve_cuts(classifier, cut_names)
    images = _heldout_images(data_dir)
    pooled = _session(extraction_model(classifier, cuts).SerializeToString()).run(None, {"image": images})  # type: ignore[attr-defined]
    stage = onnx.load(str(artifact / manifest.stages[0].file))
    inits = {i.name: numpy_helper.to_array(i) for i in stage.graph.initializer}
    weight, bias = inits["boostserve_exit_weight"], inits["boostserve_exit_bias"]
    exits = Engine(manifest, artifact).run_all_stages(images)
    np.testing.assert_allclose(exits[0], pooled[0] @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_artifact_is_served_over_http(artifact: Path, data_dir: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from service.http.app import create_app
    from service.http.settings import Settings

    pixels = np.full((28, 28), 120, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    settings = Settings(artifacts_dir=artifact, gc_freeze=False, intra_op_threads=1, log_level="warning")
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/classify?max_accuracy_drop=0.01", content=buffer.getvalue(), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert 1 <= body["results"][0]["exit"] <= 3


def test_cascade_of_two_models_reads_the_image_at_each_stage(tmp_path: Path, plain_onnx: Path, data_dir: Path) -> None:
    from service.core.artifact import load_manifest
    from service.core.engine import Engine

    out = tmp_path / "cascade"
    args = ["attach-exits", "--model", str(plain_onnx), "--model", str(plain_onnx), "--data", str(data_dir)]
    args += ["--out", str(out), "--mean", MEAN, "--std", STD, "--heldout-size", "40", "--threads", "1", "--quiet"]
    assert main(args) == 0
    manifest = load_manifest(out)
    assert [s.reads_image for s in manifest.stages] == [True, True]
    assert manifest.cumulative_macs[1] == 2 * manifest.cumulative_macs[0]
    images = _heldout_images(data_dir)
    exits = Engine(manifest, out).run_all_stages(images)
    original = _session(plain_onnx).run(None, {"input": images})[0]  # type: ignore[attr-defined]
    assert np.array_equal(exits[0], original) and np.array_equal(exits[1], original)


def test_list_cuts(plain_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attach-exits", "--model", str(plain_onnx), "--list-cuts"]) == 0
    out = capsys.readouterr().out
    assert "/stages.1/stages.1.0/relu2/Relu_output_0" in out
    assert INSIDE_BLOCK not in out  # not separating: never offered


# ---------------------------------------------------------------------------------------------
# bad inputs: one line on stderr, exit status 1, nothing written
# ---------------------------------------------------------------------------------------------


def _two_output_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["N", 1, 1, 1])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 1, 1, 1])
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["a"]), helper.make_node("GlobalMaxPool", ["x"], ["b"])]
    model = helper.make_model(helper.make_graph(nodes, "two", [x], [a, b]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _five_class_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])
    weight = numpy_helper.from_array(np.ones((5, 1), dtype=np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "five", [x], [y], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(capsys: pytest.CaptureFixture[str], model: Path, data_dir: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["attach-exits", "--model", str(model), "--data", str(data_dir), "--out", str(out)]
    code = main([*args, "--mean", MEAN, "--std", STD, "--heldout-size", "40", "--quiet", *extra])
    return code, capsys.readouterr().err


def test_cut_that_does_not_exist(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, plain_onnx, data_dir, tmp_path / "a", "--cuts", "no_such_tensor")
    assert code == 1
    assert err == (
        "boostserve attach-exits: error: cut tensor 'no_such_tensor' does not exist in "
        f"{plain_onnx} (see --list-cuts)\n"
    )
    assert not (tmp_path / "a").exists()


def test_cut_that_does_not_separate_the_graph(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, plain_onnx, data_dir, tmp_path / "a", "--cuts", INSIDE_BLOCK)
    assert code == 1
    assert err == (
        f"boostserve attach-exits: error: cut {INSIDE_BLOCK!r} does not separate the graph: a path from the image "
        "to the logits bypasses it (e.g. a residual skip); see --list-cuts\n"
    )
    assert not (tmp_path / "a").exists()


def test_cut_that_onnx_runtime_does_not_reproduce_exactly(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, plain_onnx, data_dir, tmp_path / "a", "--cuts", STEM_RELU)
    assert code == 1
    assert err.startswith(
        f"boostserve attach-exits: error: cut {STEM_RELU!r} changes the network's output under ONNX Runtime's "
        "graph optimisations (max abs "
    )
    assert err.count("\n") == 1 and not (tmp_path / "a").exists()


def test_auto_skips_cuts_that_are_not_bit_exact(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny net has 3 spread candidates, the stem's Relu one of them: auto:3 must refuse, not use it."""
    code, err = _run(capsys, plain_onnx, data_dir, tmp_path / "a", "--cuts", "auto:3")
    assert code == 1
    assert err == (
        "boostserve attach-exits: error: auto:3 needs 3 cut candidates; the model has 2 (separating tensors at "
        "least 1 % of the MACs apart, split bit for bit by ONNX Runtime)\n"
    )


def test_auto_cuts_spread_by_macs() -> None:
    from export.attach.graph import CutCandidate, auto_cuts

    def cut(percent: float) -> CutCandidate:
        return CutCandidate(f"t{percent}", (8, 4, 4), "Relu", int(percent * 100))

    pool = [cut(p) for p in (0.3, 5.0, 31.9, 61.4, 99.9)]  # the compact net's block outputs (% of MACs)
    assert [c.name for c in auto_cuts(pool, 3, 10_000)] == ["t5.0", "t31.9", "t61.4"]  # not the useless 99.9
    assert [c.name for c in auto_cuts(pool, 2, 10_000)] == ["t31.9", "t61.4"]


def test_model_with_several_outputs(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _two_output_model(tmp_path / "two.onnx")
    code, err = _run(capsys, model, data_dir, tmp_path / "a")
    assert code == 1
    assert err == (
        f"boostserve attach-exits: error: {model} has 2 outputs (a, b); attach-exits needs a classifier with "
        "exactly one output, its logits (batch, classes)\n"
    )


def test_dataset_classes_do_not_match_the_model(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _five_class_model(tmp_path / "five.onnx")
    code, err = _run(capsys, model, data_dir, tmp_path / "a", "--cuts", "none")
    assert code == 1
    assert err == (
        f"boostserve attach-exits: error: the dataset in {data_dir} has 10 classes but the model outputs 5 logits\n"
    )
    assert not (tmp_path / "a").exists()


def test_preprocessing_file(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "pre.json"
    good.write_text(json.dumps({"mean": [0.286], "std": [0.353], "color_mode": "L"}))
    args = ["attach-exits", "--model", str(plain_onnx), "--data", str(data_dir), "--out", str(tmp_path / "w")]
    args += ["--preprocessing", str(good), "--cuts", "none", "--heldout-size", "40", "--quiet", "--threads", "1"]
    assert main(args) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0.286], "std": [0.353], "colour": "L"}))
    args[args.index(str(good))] = str(bad)
    args[args.index(str(tmp_path / "w"))] = str(tmp_path / "b")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"boostserve attach-exits: error: preprocessing file {bad} is not valid: ")
    assert err.count("\n") == 1


def test_engine_parity_guard_refuses_an_inexact_split(
    tmp_path: Path, plain_onnx: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the pre-check, auto:3 takes the stem's Relu; the serving-engine check must then refuse it."""
    from export.attach import build
    from export.attach.errors import AttachError

    monkeypatch.setattr(build, "inexact_cuts", lambda *args: {})
    options = build.AttachOptions(cuts="auto:3", heldout_size=40, progress=False)
    spec = build.PreprocessingSpec(mean=[0.2860], std=[0.3530])
    with pytest.raises(AttachError, match=r"^exit 4 differs from the original model's output \(max abs "):
        build.attach_exits([plain_onnx], data_dir, tmp_path / "a", spec, options)
    assert not (tmp_path / "a").exists()


def test_image_folder_dataset(tmp_path: Path, plain_onnx: Path, data_dir: Path) -> None:
    """The user's case of the issue: an ONNX file and a labelled image folder (train/<class>/, test/<class>/)."""
    from PIL import Image

    from models.data import load_arrays
    from service.core.artifact import load_manifest

    xtr, ytr, xte, yte, _, _ = load_arrays(data_dir)
    root = tmp_path / "folder"
    for split, images, labels in (("train", xtr, ytr), ("test", xte, yte)):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            target = root / split / f"class_{int(label):02d}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(target / f"{i}.png")
    out = tmp_path / "art"
    args = ["attach-exits", "--model", str(plain_onnx), "--data", str(root), "--out", str(out), "--cuts", "auto:1"]
    assert main([*args, "--mean", MEAN, "--std", STD, "--heldout-size", "40", "--threads", "1", "--quiet"]) == 0
    manifest = load_manifest(out)
    assert manifest.num_stages == 2 and manifest.classes == [f"class_{k:02d}" for k in range(10)]
    assert manifest.provenance.model_dump()["dataset"]["dataset"] == "imagefolder"
