"""`boostserve report` on tiny artifacts: files written, numbers consistent with the manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from boostserve.cli import main
from export.report import oracle_point
from service.core.artifact import CalibrationData, load_manifest


def test_report_two_artifacts(
    tmp_path: Path, tiny_artifacts: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    args = [
        "report",
        "--artifacts",
        str(tiny_artifacts["compact"]),
        "--artifacts",
        str(tiny_artifacts["msdnet"]),
        "--label",
        "boostnet",
        "--label",
        "baseline",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--budgets",
        "6",
    ]
    assert main(args) == 0
    assert "reused from the export" in capsys.readouterr().out  # same test split -> stored arrays
    for name in (
        "report.md",
        "report.json",
        "curves.csv",
        "budgeted.png",
        "anytime.png",
        "curves_boostnet.png",
        "curves_baseline.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "budgeted.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert [a["label"] for a in report["artifacts"]] == ["boostnet", "baseline"]
    for entry, kind in zip(report["artifacts"], ("compact", "msdnet"), strict=True):
        manifest = load_manifest(tiny_artifacts[kind])
        assert manifest.calibration is not None
        np.testing.assert_allclose(entry["per_exit_test_accuracy"], manifest.calibration.test_accuracy or [])
        anytime = [p for p in entry["points"] if p["curve"] == "anytime"]
        assert [p["test_macs"] for p in anytime] == [float(m) for m in manifest.cumulative_macs]
        np.testing.assert_allclose([p["test_accuracy"] for p in anytime], entry["per_exit_test_accuracy"])
        for p in entry["points"]:
            if p["curve"] in ("optimal", "reference"):
                assert p["heldout_macs"] <= p["knob"] * (1 + 1e-6)  # thresholds respect the budget on held-out
        oracle = next(p for p in entry["points"] if p["curve"] == "oracle")
        assert oracle["test_accuracy"] >= max(entry["per_exit_test_accuracy"])
        assert {p["curve"] for p in entry["points"]} == {
            "reference",
            "optimal",
            "reference_family",
            "accuracy_drop",
            "anytime",
            "oracle",
        }
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert len(rows) == sum(len(a["points"]) for a in report["artifacts"])
    markdown = (out / "report.md").read_text()
    assert "boostnet" in markdown and "Accuracy-drop knob" in markdown and "![budgeted.png]" in markdown


def test_report_reruns_the_engine(
    tmp_path: Path, tiny_artifacts: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rerun"
    assert (
        main(
            [
                "report",
                "--artifacts",
                str(tiny_artifacts["cascade"]),
                "--data",
                str(tiny_data),
                "--rerun",
                "--out",
                str(out),
                "--budgets",
                "3",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "run through the engine" in capsys.readouterr().out
    entry = json.loads((out / "report.json").read_text())["artifacts"][0]
    manifest = load_manifest(tiny_artifacts["cascade"])
    assert manifest.calibration is not None
    # Engine re-run on the same data gives the same per-exit accuracies as stored at export.
    np.testing.assert_allclose(entry["per_exit_test_accuracy"], manifest.calibration.test_accuracy or [])


def test_report_without_calibration_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--artifacts", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "report failed" in capsys.readouterr().err


def test_oracle_point() -> None:
    correct = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)  # 3 exits, 4 samples
    cal = CalibrationData(np.zeros((3, 4), np.float32), correct, np.array([10.0, 20.0, 30.0]))
    point = oracle_point(cal)
    assert point.test_accuracy == 0.5
    assert point.exit_fractions == [0.25, 0.25, 0.5]  # sample 0 -> exit 1, 1 -> 2, 2 and 3 -> last
    assert point.test_macs == pytest.approx(0.25 * 10 + 0.25 * 20 + 0.5 * 30)
