"""`boostserve recalibrate`: an artifact calibrated with the old float64 confidence is brought to the
serving rule without re-export, deterministically, and nothing but confidences may change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from boostserve.cli import main
from export.errors import ExportError
from export.pipeline import validated_manifest
from export.recalibrate import recalibrate
from service.core.artifact import load_manifest, save_calibration_npz, sha256_file, write_manifest


def _older_confidence(logits_conf: np.ndarray) -> np.ndarray:
    """Stand-in for the old calibration: confidences a few ulps off the serving ones (E, n)."""
    return np.nextafter(logits_conf, np.float32(0.0))


def _age(art: Path, edit: str = "confidence") -> str:
    """Rewrite the artifact as an older export would have left it; returns its (new) version."""
    path = art / "calibration.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if edit == "confidence":
        for split in ("heldout", "test"):
            arrays[f"{split}_confidence"] = _older_confidence(arrays[f"{split}_confidence"])
    else:
        arrays["heldout_correct"] = arrays["heldout_correct"].copy()
        arrays["heldout_correct"][0, 0] ^= True
    save_calibration_npz(path, arrays)
    body = json.loads((art / "manifest.json").read_text())
    body["calibration"]["sha256"] = sha256_file(path)
    manifest = validated_manifest(body)
    write_manifest(art, manifest)
    return manifest.version


def test_recalibrate_restores_the_serving_confidences(
    tmp_path: Path, tiny_artifacts: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tiny_artifacts["compact"]
    art = tmp_path / "aged"
    shutil.copytree(fresh, art)
    aged_version = _age(art)
    assert aged_version != load_manifest(fresh).version

    assert main(["recalibrate", str(art), "--data", str(tiny_data), "--check"]) == 0
    assert "would change" in capsys.readouterr().out
    assert load_manifest(art).version == aged_version  # --check writes nothing

    assert main(["recalibrate", str(art), "--data", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "heldout: 120 of 120 confidences differ" in out and "test: 180 of 180" in out
    manifest = load_manifest(art, verify=True)
    # Same arrays as a fresh export with the serving rule: same bytes, so the same content version.
    assert sha256_file(art / "calibration.npz") == sha256_file(fresh / "calibration.npz")
    assert manifest.version == load_manifest(fresh).version
    record = (manifest.provenance.model_extra or {})["recalibration"]
    assert record["previous_version"] == aged_version
    assert record["changed_confidences"] == {"heldout": 120, "test": 180}

    again = recalibrate(art, tiny_data)  # idempotent: nothing left to change, nothing written
    assert not again.written and all(c.changed == 0 for c in again.changes)
    assert again.manifest.version == manifest.version


def test_recalibrate_refuses_changed_correctness(
    tmp_path: Path, tiny_artifacts: dict[str, Path], tiny_data: Path
) -> None:
    art = tmp_path / "tampered"
    shutil.copytree(tiny_artifacts["compact"], art)
    version = _age(art, edit="correct")
    before = sha256_file(art / "calibration.npz")
    with pytest.raises(ExportError, match="correctness"):
        recalibrate(art, tiny_data)
    assert sha256_file(art / "calibration.npz") == before and load_manifest(art).version == version
