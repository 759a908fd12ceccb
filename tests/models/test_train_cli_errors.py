"""`boostserve train` reports user errors in one line with exit 2, not a traceback.

Through a subprocess: what matters is what the operator's terminal shows (stderr) and the exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boostserve", "train", "--threads", "1", "--quiet", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("boostserve train: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_preset(tmp_path: Path) -> None:
    result = _train("--config", "no-such-preset", "--out", str(tmp_path / "run"))
    _assert_one_line(result, "unknown model config 'no-such-preset'", "compact-fashion-mnist")


def test_channel_mismatch(idx_dir: Path, tmp_path: Path) -> None:
    """A 3-channel CIFAR preset on 1-channel Fashion-MNIST-layout data."""
    result = _train(
        "--config", "compact-cifar10", "--data", str(idx_dir), "--out", str(tmp_path / "run"), "--epochs", "1"
    )
    _assert_one_line(result, "channels")


def test_missing_data_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = _train("--config", "compact-fashion-mnist", "--data", str(missing), "--out", str(tmp_path / "run"))
    _assert_one_line(result, f"data directory {missing} does not exist")
