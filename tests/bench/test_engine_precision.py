"""The engine suite with an int8 artifact beside the fp32 one: per-precision cells, time-ideal, targets.

The artifacts are the tiny seeded export (tests/fixtures/tiny_export.py) and its int8 version
(every stage forced to int8: the tiny stages are not faster in int8, see tests/export/test_quantize.py).
Timing values are never asserted (no bound a loaded machine can break); the wiring and arithmetic are.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.common import Progress, load_artifact, write_json
from bench.data import synthetic_test_set
from bench.engine_suite import EngineSettings, fp32_source, int8_variant, run_engine, time_ideal
from bench.report import write_report
from bench.targets import evaluate_engine, served_time_ideal
from tests.fixtures.tiny_export import export_tiny_artifact


def test_time_ideal_is_all_stages_over_expected_cumulative_time() -> None:
    # C = (1, 3, 6); expected = 0.5*1 + 0.25*3 + 0.25*6 = 2.75
    assert time_ideal([1.0, 2.0, 3.0], [0.5, 0.25, 0.25]) == pytest.approx(6 / 2.75)
    assert time_ideal([1.0, 2.0, 3.0], [0.0, 0.0, 1.0]) == pytest.approx(1.0)  # nobody leaves early
    assert math.isnan(time_ideal([1.0], [0.0]))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fp32 artifact, its int8 version beside it)."""
    from export.quantize import QuantizeOptions, quantize_artifact

    root = tmp_path_factory.mktemp("precisions")
    fp32 = export_tiny_artifact(root / "art", kind="compact", logit_scale=4.0)
    options = QuantizeOptions(
        precisions=("int8", "int8", "int8"), rounds=1, round_seconds=0.0, calibration_images=48, progress=False,
        min_agreement=0.5,
    )  # fmt: skip
    quantize_artifact(fp32, root / "art_int8", None, options)
    return fp32, root / "art_int8"


def test_an_int8_artifact_finds_its_fp32_source_beside_it(pair: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = pair
    assert int8_variant(fp32) == int8 and int8_variant(int8) is None
    assert fp32_source(load_artifact(int8)) == fp32
    assert fp32_source(load_artifact(fp32)) is None  # not a quantized artifact
    # an fp32 directory of that name that is not the recorded source is not taken for it
    other = tmp_path / "art_int8"
    shutil.copytree(int8, other)
    export_tiny_artifact(tmp_path / "art", kind="compact", logit_scale=2.0)
    assert fp32_source(load_artifact(other)) is None


def test_given_the_int8_artifact_the_suite_measures_the_same_pair(pair: tuple[Path, Path]) -> None:
    """The bench's default is the served int8 embedded model: fp32 stays the reference."""
    fp32, int8 = pair
    settings = EngineSettings(
        batch_sizes=(1,), rounds=1, round_seconds=0.0, min_calls=1, max_calls=2, images=8,
        intra_op_threads=1, inter_op_threads=1, providers=None,
    )  # fmt: skip
    r = run_engine(load_artifact(int8), synthetic_test_set(8, 28, 28, 10), settings, fp32.parent / "w2",
                   Progress(enabled=False))  # fmt: skip
    assert {c["mode"]: c["precision"] for c in r["cells"]}["full_onnx"] == "fp32"
    assert {r["precisions"][p]["version"] for p in ("fp32", "int8")} == {
        load_artifact(fp32).manifest.version,
        load_artifact(int8).manifest.version,
    }


@pytest.fixture(scope="module")
def engine_result(pair: tuple[Path, Path]) -> dict[str, Any]:
    fp32, _ = pair
    root = fp32.parent
    settings = EngineSettings(
        batch_sizes=(1, 32), rounds=2, round_seconds=0.01, min_calls=2, max_calls=50, images=64,
        intra_op_threads=1, inter_op_threads=1, providers=None,
    )  # fmt: skip
    artifact = load_artifact(fp32)
    test = synthetic_test_set(64, 28, 28, 10)
    return run_engine(artifact, test, settings, root / "work", Progress(enabled=False))


def test_both_precisions_are_measured_in_the_same_rounds(engine_result: dict[str, Any]) -> None:
    r = engine_result
    modes = {"early_exit", "all_stages", "full_onnx"}
    assert {(c["batch_size"], c["mode"]) for c in r["cells"]} == {
        (b, m + s) for b in (1, 32) for m in modes for s in ("", "_int8")
    }
    assert {c["precision"] for c in r["cells"] if c["mode"].endswith("_int8")} == {"int8"}
    assert set(r["precisions"]) == {"fp32", "int8"}
    assert r["precisions"]["int8"]["stage_precisions"] == ["int8"] * 3
    for info in r["precisions"].values():
        assert info["parity"]["early_exit_label_mismatches"] == 0
        assert info["parity"]["full_onnx_vs_all_stages_max_abs_diff"] < 1e-4
        acc = info["test_accuracy"]
        assert len(acc["per_exit"]) == 3 and acc["all_stages"] == acc["per_exit"][-1]
        assert [b["batch_size"] for b in info["batching"] if b["mode"].startswith("early_exit")] == [32]
    assert {(c["precision"], c["batch_size"]) for c in r["stage_costs"]} == {
        (p, b) for p in ("fp32", "int8") for b in (1, 32)
    }


def test_speedups_carry_time_ideal_from_the_measured_stage_times(engine_result: dict[str, Any]) -> None:
    r = engine_result
    for sp in r["speedups"]:
        p, b = sp["precision"], sp["batch_size"]
        cell = next(
            c
            for c in r["cells"]
            if c["batch_size"] == b and c["mode"] == ("early_exit" + ("_int8" if p == "int8" else ""))
        )
        stage_ms = [c["ms_per_image"] for c in r["stage_costs"] if c["precision"] == p and c["batch_size"] == b]
        assert sp["time_ideal"] == pytest.approx(time_ideal(stage_ms, cell["exit_fractions"]))
        assert sp["of_time_ideal"] == pytest.approx(sp["early_exit_vs_all_stages"] / sp["time_ideal"])
        full = next(c for c in r["cells"] if c["batch_size"] == b and c["mode"] == "full_onnx")
        assert sp["early_exit_vs_fp32_full_onnx"] == pytest.approx(
            cell["images_per_s"]["median"] / full["images_per_s"]["median"]
        )


def test_engine_targets_and_report(engine_result: dict[str, Any], tmp_path: Path) -> None:
    rows = {t.key: t for t in evaluate_engine(engine_result)}
    assert {"engine_vs_full", "engine_of_ideal_fp32", "engine_of_ideal_int8"} <= set(rows)
    assert all(t.passed is not None for t in rows.values()), [t.measured_text for t in rows.values()]
    assert evaluate_engine(None)[0].verdict == "N/A"
    # The served HTTP early exit (fp32 here, matched by version) gets its time-ideal from the engine's stage times.
    http = {"version": engine_result["version"]}
    ee = {"exit_histogram": [3, 1, 0], "avg_stage1_batch": 20.0}
    ideal, at = served_time_ideal(http, ee, engine_result)
    stage_ms = [
        c["ms_per_image"] for c in engine_result["stage_costs"] if c["precision"] == "fp32" and c["batch_size"] == 32
    ]
    assert ideal == pytest.approx(time_ideal(stage_ms, [0.75, 0.25, 0.0])) and at == "fp32 stage times at batch 32"
    other, none = served_time_ideal({"version": "other"}, ee, engine_result)  # not an artifact the engine measured
    assert math.isnan(other) and none is None
    doc = {"suite": "engine", "command": "test", "started_at": "t", "duration_s": 1.0, "machine": {},
           "settings": {"rounds": 2, "round_seconds": 0.01, "intra_op_threads": 1, "inter_op_threads": 1},
           "result": engine_result}  # fmt: skip
    write_json(tmp_path / "engine.json", json.loads(json.dumps(doc, default=str)))
    markdown, _ = write_report(tmp_path, tmp_path / "README.md", "test")
    text = markdown.read_text()
    assert "| int8 |" in text and "time-ideal" in text and "early_exit_int8" in text


def test_equal_cost_picks_the_best_affordable_point() -> None:
    from bench.engine_suite import equal_cost

    def pt(drop: float, acc: float, ms: float) -> dict[str, Any]:
        return {"drop": drop, "test_accuracy": acc, "ms_per_image": ms}

    fp32 = [pt(0.0, 0.92, 0.9), pt(0.01, 0.91, 0.3)]
    int8 = [pt(0.0, 0.921, 0.35), pt(0.005, 0.915, 0.2), pt(0.01, 0.90, 0.1)]
    pairs = equal_cost(fp32, int8)
    assert [(q["other_accuracy"], q["other_drop"]) for q in pairs] == [(0.921, 0.0), (0.915, 0.005)]
    assert equal_cost([pt(0.0, 0.9, 0.05)], int8)[0]["other_accuracy"] is None  # nothing that cheap


def test_frontier_prices_the_drop_points_with_measured_stage_times(engine_result: dict[str, Any]) -> None:
    for p, info in engine_result["precisions"].items():
        stage_ms = [
            c["ms_per_image"] for c in engine_result["stage_costs"] if c["precision"] == p and c["batch_size"] == 32
        ]
        cumulative = [sum(stage_ms[: k + 1]) for k in range(len(stage_ms))]
        assert len(info["frontier"]) >= 5
        for q in info["frontier"]:
            assert q["ms_per_image"] == pytest.approx(
                sum(f * c for f, c in zip(q["exit_fractions"], cumulative, strict=True))
            )
    assert len(engine_result["equal_cost"]) == len(engine_result["precisions"]["fp32"]["frontier"])


def test_exit_one_ceiling_bound(engine_result: dict[str, Any]) -> None:
    from bench.targets import limits_bounds

    bounds = dict(limits_bounds([], engine_result))
    full = next(c for c in engine_result["cells"] if c["batch_size"] == 32 and c["mode"] == "full_onnx")
    for p in ("fp32", "int8"):
        stage1 = next(
            c["ms_per_image"]
            for c in engine_result["stage_costs"]
            if c["precision"] == p and c["batch_size"] == 32 and c["stage"] == 1
        )
        key = next(k for k in bounds if k.startswith(f"engine ({p}): fp32 full network ms/image"))
        assert bounds[key] == pytest.approx(1e3 / full["images_per_s"]["median"] / stage1)
