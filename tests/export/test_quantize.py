"""int8 stage graphs (export.quantize): the tiny seeded model exported, quantized, served and recalibrated.

The tiny random-weight stages are too small for int8 to be faster (measured: the per-stage rule keeps
them fp32), so the served int8 artifact here fixes every stage to int8 (`precisions`); the rule
itself is tested on fake timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from boostserve.cli import main
from export.errors import ExportError
from export.pipeline import HashingBatches, dataset_batches
from export.quantize import QuantizeOptions, QuantizeResult, quantize_artifact, training_images
from export.quantize_rule import StageTiming, choose_precisions, parse_precisions
from export.source import SplitSettings, load_export_data
from service.core.artifact import (
    ArtifactError,
    Manifest,
    content_version,
    load_calibration,
    load_manifest,
)
from service.core.engine import CPU, Engine
from service.core.exit_rule import max_softmax
from service.http.settings import EMBEDDED_FP32_MODEL_DIR

#: The tiny random-weight model's int8 labels must agree with fp32's on at least this share of the
#: 100 held-out + test images at every exit (measured 100 %; random weights give small logit gaps,
#: so a few flips would be legitimate, a broken graph agrees on ~10 %).
MIN_AGREEMENT = 0.9
FAST = {"rounds": 1, "round_seconds": 0.0, "calibration_images": 48, "progress": False}


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_checkpoints: dict[str, Path]) -> Path:
    from export.pipeline import ExportOptions
    from export.source import export_from_checkpoint

    out = tmp_path_factory.mktemp("quantize") / "fp32"
    return export_from_checkpoint(tiny_checkpoints["compact"], tiny_data, out, ExportOptions(progress=False)).path


@pytest.fixture(scope="module")
def int8(fp32_artifact: Path) -> QuantizeResult:
    options = QuantizeOptions(precisions=("int8", "int8", "int8"), min_agreement=MIN_AGREEMENT, **FAST)  # type: ignore[arg-type]
    return quantize_artifact(fp32_artifact, fp32_artifact.with_name("int8"), None, options)


def _heldout_images(manifest: Manifest) -> np.ndarray:
    recorded = manifest.provenance.dataset
    split = SplitSettings(recorded["kind"], int(recorded["heldout_size"]), int(recorded["split_seed"]))
    pre = manifest.preprocessing
    data, _ = load_export_data(
        recorded["data_dir"], split, image_size=pre.height, num_classes=len(manifest.classes),
        mean=tuple(pre.mean), std=tuple(pre.std),
    )  # fmt: skip
    assert data.heldout is not None
    hashing = HashingBatches(dataset_batches(data.heldout, 16))
    images = np.concatenate([x for x, _ in hashing])  # (n, C, H, W)
    assert hashing.hexdigest() == recorded["heldout_sha256"]
    return images


# -- the per-stage rule -------------------------------------------------------------------------------


def _t(stage: int, batch: int, fp32: float, int8: float) -> StageTiming:
    return StageTiming(stage=stage, batch_size=batch, fp32_ms=fp32, int8_ms=int8)


def test_rule_keeps_fp32_where_int8_is_slower_at_any_decision_batch() -> None:
    timings = [
        _t(0, 1, 0.042, 0.100), _t(0, 32, 0.071, 0.060),  # stage 1: slower alone -> fp32
        _t(1, 1, 0.225, 0.105), _t(1, 32, 0.222, 0.071),  # faster everywhere -> int8
        _t(2, 1, 0.100, 0.096), _t(2, 32, 0.100, 0.050),  # 4 % faster at batch 1: within the margin
        _t(3, 1, 0.100, 0.095), _t(3, 32, 0.100, 0.095),  # exactly 5 % faster: switches
    ]  # fmt: skip
    assert choose_precisions(timings, 4, (1, 32), margin=0.05) == ["fp32", "int8", "fp32", "int8"]
    assert choose_precisions(timings, 4, (32,), margin=0.05) == ["int8", "int8", "int8", "int8"]
    assert choose_precisions(timings, 4, (1, 32), margin=0.0) == ["fp32", "int8", "int8", "int8"]


def test_rule_keeps_fp32_without_a_measurement() -> None:
    timings = [_t(0, 1, 1.0, 0.1), _t(1, 1, 1.0, 0.1), _t(1, 32, 1.0, 0.1)]
    assert choose_precisions(timings, 3, (1, 32)) == ["fp32", "int8", "fp32"]
    assert choose_precisions(timings, 2, ()) == ["fp32", "fp32"]
    with pytest.raises(ValueError, match="margin"):
        choose_precisions(timings, 2, (1,), margin=1.0)


def test_parse_precisions_is_strict() -> None:
    assert parse_precisions("fp32,int8, int8") == ("fp32", "int8", "int8")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        parse_precisions("fp32,fp16")
    with pytest.raises(ValueError, match="2 precisions for 3 stages"):
        parse_precisions("fp32,int8", 3)


# -- the manifest field -------------------------------------------------------------------------------


def test_old_manifests_load_as_fp32_with_their_published_version() -> None:
    body = json.loads((EMBEDDED_FP32_MODEL_DIR / "manifest.json").read_text())
    assert all("precision" not in s for s in body["stages"]), "the shipped fp32 manifest predates the field"
    manifest = load_manifest(EMBEDDED_FP32_MODEL_DIR)
    assert manifest.precisions == ["fp32"] * manifest.num_stages
    normalised = manifest.model_dump(mode="json")  # now with precision: fp32 on every stage
    assert normalised["stages"][0]["precision"] == "fp32"
    version = normalised.pop("version")
    assert content_version(normalised) == version == body["version"]
    normalised["stages"][1]["precision"] = "int8"
    assert content_version(normalised) != version


def test_manifest_precision_round_trip(int8: QuantizeResult, tmp_path: Path) -> None:
    manifest = load_manifest(int8.path)
    assert manifest.precisions == ["int8", "int8", "int8"] == int8.precisions
    assert manifest == int8.manifest
    body = json.loads((int8.path / "manifest.json").read_text())
    assert [s["precision"] for s in body["stages"]] == ["int8"] * 3
    body["stages"][0]["precision"] = "int4"
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="precision"):
        load_manifest(tmp_path, verify=False)


def test_int8_graphs_are_quantized_with_float_logits(int8: QuantizeResult) -> None:
    for stage in int8.manifest.stages:
        graph = onnx.load(str(int8.path / stage.file)).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2, stage.file
        producer = {o: n for n in graph.node for o in n.output}
        assert producer[stage.logits_output].op_type != "DequantizeLinear", "logits would be uint8-rounded"


# -- served, checked, recalibrated ---------------------------------------------------------------------


def test_int8_served_labels_agree_with_fp32(int8: QuantizeResult, fp32_artifact: Path) -> None:
    fp32 = load_manifest(fp32_artifact)
    images = _heldout_images(fp32)
    served = Engine(int8.manifest, int8.path, providers=[CPU])
    reference = Engine(fp32, fp32_artifact, providers=[CPU])
    a, b = served.run_all_stages(images), reference.run_all_stages(images)
    for k, (za, zb) in enumerate(zip(a, b, strict=True)):
        agreement = float((za.argmax(-1) == zb.argmax(-1)).mean())
        assert agreement >= MIN_AGREEMENT, (k, agreement)
    assert any(not np.array_equal(za, zb) for za, zb in zip(a, b, strict=True)), "the int8 graphs compute fp32"
    answers = served.classify(images, [0.0] * 3)  # everyone leaves at exit 1
    assert [r.exit_index for r in answers] == [0] * len(images)
    # The recorded parity is over held-out + test (40 + 60 images) and matches this run.
    assert [p.images for p in int8.parity] == [100, 100, 100]
    assert all(p.agreement >= MIN_AGREEMENT and p.max_abs_logits > 0 for p in int8.parity)
    recorded = int8.manifest.provenance.model_dump()["quantization"]
    assert recorded["parity_vs_fp32"] == [p.to_dict() for p in int8.parity]
    assert recorded["precisions"] == ["int8"] * 3 and recorded["rule"] == "fixed by the caller"


def test_calibration_is_recomputed_through_the_int8_engine(int8: QuantizeResult, fp32_artifact: Path) -> None:
    manifest = int8.manifest
    images = _heldout_images(manifest)
    served = [max_softmax(z) for z in Engine(manifest, int8.path, providers=[CPU]).run_all_stages(images)]
    stored = load_calibration(int8.path, manifest, "heldout")
    np.testing.assert_array_equal(np.stack(served), stored.confidence)  # bit for bit what is served
    fp32 = load_calibration(fp32_artifact, load_manifest(fp32_artifact), "heldout")
    assert not np.array_equal(fp32.confidence, stored.confidence)
    assert load_calibration(int8.path, manifest, "test").num_samples == 60


def test_calibration_images_come_from_the_training_split(fp32_artifact: Path) -> None:
    manifest = load_manifest(fp32_artifact)
    images, record = training_images(manifest, Path(manifest.provenance.dataset["data_dir"]), 1000, seed=0)
    assert record["images"] == record["of"] == 80 == len(images)  # 120 training images minus 40 held-out
    heldout = _heldout_images(manifest).reshape(40, -1)
    drawn = images.reshape(len(images), -1)
    assert not (drawn[:, None, :] == heldout[None, :, :]).all(axis=-1).any(), "a held-out image was drawn"
    again, _ = training_images(manifest, Path(manifest.provenance.dataset["data_dir"]), 16, seed=0)
    other, _ = training_images(manifest, Path(manifest.provenance.dataset["data_dir"]), 16, seed=1)
    assert not np.array_equal(again, other)


def test_refusals_leave_nothing_behind(int8: QuantizeResult, fp32_artifact: Path, tmp_path: Path) -> None:
    strict = QuantizeOptions(precisions=("int8", "int8", "int8"), min_agreement=1.01, **FAST)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="agree with fp32 below"):
        quantize_artifact(fp32_artifact, tmp_path / "strict", None, strict)
    with pytest.raises(ExportError, match="already quantized"):
        quantize_artifact(int8.path, tmp_path / "twice", None, QuantizeOptions(**FAST))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_and_export_int8(
    fp32_artifact: Path,
    tiny_checkpoints: dict[str, Path],
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fast = ["--calibration-images", "32", "--timing-rounds", "1", "--timing-round-seconds", "0", "--quiet"]
    out = tmp_path / "q"
    assert main(["quantize", "--artifacts", str(fp32_artifact), "--out", str(out), *fast]) == 0
    printed = capsys.readouterr().out
    assert "stage precision:" in printed and "label agreement" in printed
    # Whatever this machine measured, the manifest holds the rule's answer to the recorded timings.
    manifest = load_manifest(out)
    recorded = manifest.provenance.model_dump()["quantization"]
    timings = [StageTiming(**{**t, "fp32_range": tuple(t["fp32_range"]), "int8_range": tuple(t["int8_range"])})
               for t in recorded["timings"]]  # fmt: skip
    assert {(t.stage, t.batch_size) for t in timings} == {(k, b) for k in range(3) for b in (1, 32)}
    assert manifest.precisions == choose_precisions(timings, 3, (1, 32)) == recorded["precisions"]
    with pytest.raises(SystemExit) as refused:
        main(["quantize", "--artifacts", str(fp32_artifact), "--stage-precision", "int8,int9"])
    assert refused.value.code == 2 and "unknown precision 'int9'" in capsys.readouterr().err
    exported = tmp_path / "e"
    code = main([
        "export", "--checkpoint", str(tiny_checkpoints["compact"]), "--data", str(tiny_data), "--out", str(exported),
        "--precision", "int8", "--stage-precision", "fp32,int8,int8", "--batch-size", "32", *fast,
    ])  # fmt: skip
    assert code == 0
    manifest = load_manifest(exported)
    assert manifest.precisions == ["fp32", "int8", "int8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "q"]  # the fp32 scratch export is gone
