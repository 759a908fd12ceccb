"""Unreadable artifact files: `serve` and `thresholds` exit 2 with one line naming the file.

Why the capability drop: the suite runs as root here, and root reads a chmod 000 file anyway
(CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH). When the tests run as root, the command runs as root
*without* those two capabilities (dropped from the bounding set before exec, so file modes apply to
it); as any other user the chmod alone is enough. (Running as `nobody` does not work here: the
interpreter lives under /root.) Either way the file is really unreadable to the process under test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.core.artifact import MANIFEST_FILE
from tests.fixtures.synthetic_artifact import stage_file

REPO = Path(__file__).resolve().parents[2]
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _drop_file_override() -> None:
    """preexec_fn: the exec'd root process gets no capability that bypasses file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_unprivileged() -> dict[str, Any]:
    """subprocess keyword arguments under which file modes apply to the child."""
    if os.geteuid() != 0:
        return {}
    try:
        subprocess.run(["true"], preexec_fn=_drop_file_override, check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no CAP_SETPCAP): file modes would not apply")
    return {"preexec_fn": _drop_file_override}


@pytest.fixture
def artifact_copy(synthetic_artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_artifact, tmp_path / "artifact"))


def _boostserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "boostserve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **_as_unprivileged(),
    )


def _unreadable_files() -> list[str]:
    return [MANIFEST_FILE, stage_file(0), stage_file(2), "calibration.npz"]


@pytest.mark.parametrize("name", _unreadable_files())
@pytest.mark.parametrize("command", ["serve", "thresholds"])
def test_unreadable_file_is_one_line_exit_2(artifact_copy: Path, name: str, command: str) -> None:
    target = artifact_copy / name
    assert target.is_file()
    target.chmod(0o000)
    if command == "serve":
        result = _boostserve("serve", "--artifacts", str(artifact_copy), "--port", "0")
        prefix = f"boostserve serve: cannot serve {artifact_copy}: "
    else:
        result = _boostserve("thresholds", "--artifacts", str(artifact_copy), "--max-exit", "2")
        prefix = "boostserve thresholds: error: "
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == f"{prefix}cannot read {target.resolve() if name != MANIFEST_FILE else target}: permission denied\n"
    )
    assert result.stdout == ""


def test_unreadable_calibration_after_verification(artifact_copy: Path) -> None:
    """load_calibration opens the .npz itself (the app loads it after verification): same one line."""
    target = artifact_copy / "calibration.npz"
    target.chmod(0o000)
    code = (
        "from service.core.artifact import ArtifactError, load_calibration, load_manifest\n"
        f"manifest = load_manifest({str(artifact_copy)!r}, verify=False)\n"
        "try:\n"
        "    load_calibration(" + repr(str(artifact_copy)) + ", manifest)\n"
        "except ArtifactError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **_as_unprivileged(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cannot read {target}: permission denied\n"
