"""`boostserve thresholds` on a small artifact directory (dummy stage files, real hashes)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from boostserve.cli import main
from service.commands.thresholds import _knob_type, parse_drop, parse_macs
from service.core import policies as P
from service.core.artifact import (
    CalibrationData,
    Manifest,
    content_version,
    save_calibration_npz,
    sha256_file,
    write_manifest,
)
from service.core.knobs import KNOB_BY_NAME
from tests.fixtures.synthetic_calibration import synthetic_calibration


def build_manifest(
    cal: CalibrationData,
    root: Path | None = None,
    *,
    with_calibration: bool = True,
    name: str = "policy-test",
) -> Manifest:
    """A valid manifest for ``cal``'s exits; with ``root``, also dummy stage files + calibration.npz."""
    num = cal.num_exits
    cumulative = [int(m) for m in cal.cumulative_macs]
    stages: list[dict[str, Any]] = []
    for k in range(num):
        file = f"stage_{k + 1:02d}.onnx"
        sha = "0" * 64
        if root is not None:
            (root / file).write_bytes(f"dummy stage {k}".encode())
            sha = sha256_file(root / file)
        inputs: list[dict[str, Any]] = [{"name": "image", "shape": [None, 1, 8, 8], "source": "image"}]
        if k > 0:
            inputs = [
                {"name": "feat_in_0", "shape": [None, 4], "source": "prev:feat_out_0"},
                {"name": "logits_in", "shape": [None, 3], "source": "prev:logits"},
            ]
        outputs: list[dict[str, Any]] = [{"name": "logits", "shape": [None, 3]}]
        if k < num - 1:
            outputs.insert(0, {"name": "feat_out_0", "shape": [None, 4]})
        stages.append(
            {
                "index": k,
                "file": file,
                "sha256": sha,
                "inputs": inputs,
                "outputs": outputs,
                "macs": cumulative[k] - (cumulative[k - 1] if k else 0),
                "cumulative_macs": cumulative[k],
                "params": 10,
                "cumulative_params": 10 * (k + 1),
            }
        )
    body: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "stages": stages,
        "preprocessing": {
            "height": 8,
            "width": 8,
            "channels": 1,
            "color_mode": "L",
            "mean": [0.5],
            "std": [0.25],
        },
        "classes": ["a", "b", "c"],
        "exit_rule": {"t": 0.5},
    }
    if with_calibration:
        sha = "0" * 64
        if root is not None:
            save_calibration_npz(
                root / "calibration.npz",
                {
                    "heldout_confidence": cal.confidence,
                    "heldout_correct": cal.correct,
                    "heldout_labels": np.zeros(cal.num_samples, dtype=np.int64),
                },
            )
            sha = sha256_file(root / "calibration.npz")
        body["calibration"] = {
            "file": "calibration.npz",
            "sha256": sha,
            "num_samples": cal.num_samples,
            "heldout_accuracy": [float(a) for a in cal.correct.mean(axis=1)],
        }
    body["version"] = content_version(body)
    return Manifest.model_validate(body)


def write_artifact(root: Path, cal: CalibrationData, *, with_calibration: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, build_manifest(cal, root, with_calibration=with_calibration))
    return root


CAL = synthetic_calibration(5, 600, 3, cumulative_macs=[10_000_000, 20_000_000, 30_000_000, 40_000_000, 50_000_000])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_artifact(tmp_path_factory.mktemp("art"), CAL)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["thresholds", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object, one line
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_budget_macs_json(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--artifacts", str(artifact), "--budget-macs", "25M")
    expected = P.budget_macs(CAL, 25e6, "reference")  # budget_macs' default policy (the knob table)
    assert data["policy"] == "reference"
    assert data["budget"] == {"budget_macs": 25e6, "policy": "reference"}
    assert len(data["thresholds"]) == 5 and data["thresholds"][-1] == 0.0
    assert data["expected_accuracy"] == pytest.approx(expected.expected_accuracy, abs=1e-6)
    assert data["expected_macs"] == pytest.approx(expected.expected_macs, abs=0.1)
    assert data["expected_macs"] <= 25e6
    assert sum(data["exit_fractions"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= data["expected_accuracy"] <= 1.0
    back = [math.inf if t is None else t for t in data["thresholds"]]
    assert P.evaluate_thresholds(CAL, back).expected_accuracy == expected.expected_accuracy


def test_optimal_policy_and_scientific_form(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--artifacts", str(artifact), "--budget-macs", "2.5e7", "--policy", "optimal")
    assert data["policy"] == "optimal"
    assert data["expected_macs"] <= 2.5e7


def test_other_knobs_json(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drop = run_json(capsys, "--artifacts", str(artifact), "--max-accuracy-drop", "1%")
    assert drop["budget"]["max_accuracy_drop"] == pytest.approx(0.01)
    assert drop["expected_accuracy"] >= float(CAL.correct[-1].mean()) - 0.01 - 1e-6
    anytime = run_json(capsys, "--artifacts", str(artifact), "--max-exit", "2")
    assert anytime["thresholds"] == [None, 0.0, 0.0, 0.0, 0.0]
    assert anytime["exit_fractions"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert anytime["expected_macs"] == 20e6
    explicit = run_json(capsys, "--artifacts", str(artifact), "--thresholds", "0.9,none,0.8,inf,0")
    assert explicit["thresholds"][1] is None and explicit["thresholds"][3] is None
    assert explicit["policy"] == "explicit"


def test_drop_confidence_flag(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--drop-confidence comes from the knob table and reaches the policy (0.5 is cheaper here)."""
    low = run_json(capsys, "--artifacts", str(artifact), "--max-accuracy-drop", "10%", "--drop-confidence", "0.5")
    assert low["budget"] == {"max_accuracy_drop": 0.1, "policy": "optimal", "drop_confidence": 0.5}
    assert low["budget_description"] == "max_accuracy_drop=10% (optimal, drop_confidence=0.5)"
    expected = P.max_accuracy_drop(CAL, 0.1, "optimal", 0.5)
    assert low["expected_macs"] == pytest.approx(expected.expected_macs, abs=0.1)
    default = run_json(capsys, "--artifacts", str(artifact), "--max-accuracy-drop", "10%")
    assert default["expected_macs"] > low["expected_macs"]


def test_human_output(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["thresholds", "--artifacts", str(artifact), "--budget-macs", "30M"]) == 0
    out = capsys.readouterr().out
    assert "budget_macs=30M (reference)" in out
    assert "% of the full network" in out
    assert out.count("\n") > 8 and "exiting" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--budget-macs", "1M"], "below the cost of the first exit"),
        (["--max-exit", "9"], "between 1 and 5"),
        (["--max-accuracy-drop", "150%"], "max_accuracy_drop must be in [0, 1], got 1.5"),
        (["--thresholds", "0.5,0.5"], "one value per exit"),
        (["--thresholds=-0.5,0.5,0.5,0.5,0.5"], "thresholds[1] must be >= 0 or never, got '-0.5'"),
        (["--max-exit", "2", "--policy", "reference"], "policy applies to budget_macs, max_accuracy_drop only"),
        (["--max-accuracy-drop", "1%", "--drop-confidence", "1"], "drop_confidence must be in (0, 1), got '1'"),
        (["--budget-macs", "30M", "--drop-confidence", "0.9"], "drop_confidence applies to max_accuracy_drop only"),
    ],
)
def test_errors_exit_2(artifact: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    """Range and spelling errors are the table's (argparse reports them), the others the resolver's."""
    try:
        code = main(["thresholds", "--artifacts", str(artifact), *argv, "--json"])
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in captured.err


def test_corrupted_artifact_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_artifact(tmp_path / "art", CAL)
    (root / "stage_02.onnx").write_bytes(b"tampered")
    assert main(["thresholds", "--artifacts", str(root), "--max-exit", "1"]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["thresholds", "--artifacts", str(tmp_path / "missing"), "--max-exit", "1"]) == 2


def test_without_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_artifact(tmp_path / "bare", CAL, with_calibration=False)
    data = run_json(capsys, "--artifacts", str(root), "--max-exit", "3")
    assert data["expected_accuracy"] is None and data["exit_fractions"] is None
    assert main(["thresholds", "--artifacts", str(root), "--budget-macs", "30M"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_budget_is_required_and_exclusive(artifact: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["thresholds", "--artifacts", str(artifact)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["thresholds", "--artifacts", str(artifact), "--max-exit", "1", "--budget-macs", "3e7"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("30M", 3e7),
        ("3e7", 3e7),
        ("1.5e7", 1.5e7),
        ("500k", 5e5),
        ("1.2G", 1.2e9),
        ("30 MMACs", 3e7),
        ("42", 42.0),
    ],
)
def test_parse_macs(text: str, value: float) -> None:
    assert parse_macs(text) == pytest.approx(value)


def test_parsers_reject_garbage() -> None:
    for bad in ("M30", "abc", "-5M", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_macs(bad)
    assert parse_drop("1%") == pytest.approx(0.01) and parse_drop("0.02") == 0.02
    with pytest.raises(argparse.ArgumentTypeError):
        parse_drop("one")
    thresholds = _knob_type(KNOB_BY_NAME["thresholds"])
    assert thresholds("0.9, none,never,inf,0") == (0.9, None, None, None, 0.0)  # the server's spellings
    for bad in ("0.9,x", "0.9,-,0", "0.9,-1,0"):
        with pytest.raises(argparse.ArgumentTypeError):
            thresholds(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="max_exit must be >= 1"):
        _knob_type(KNOB_BY_NAME["max_exit"])("0")


def test_command_module_imports_are_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, service.commands.thresholds as t; "
        "bad = [m for m in ('numpy', 'pydantic', 'onnxruntime', 'torch') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
