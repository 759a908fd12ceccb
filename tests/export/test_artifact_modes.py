"""Artifacts are readable by another user: the serving container (UID 10001) reads a mounted artifact.

`boostserve export` builds the artifact in a mkdtemp directory (0700) and renames it into place;
`boostserve recalibrate` writes a new calibration.npz. Both run here under umask 077, the most
restrictive a user may have, so the modes can only come from the code, not from the environment.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from boostserve.cli import main
from export.pipeline import ExportOptions
from export.source import export_from_checkpoint
from tests.export.test_recalibrate import _age


@pytest.fixture
def strict_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): stat.filemode(path.stat().st_mode) for path in [root, *sorted(root.rglob("*"))]
    }


def test_export_is_world_readable(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tiny_data: Path, strict_umask: None
) -> None:
    out = export_from_checkpoint(
        tiny_checkpoints["compact"], tiny_data, tmp_path / "art", ExportOptions(progress=False, batch_size=32)
    ).path
    modes = _modes(out)
    assert modes == {".": "drwxr-xr-x"} | {name: "-rw-r--r--" for name in modes if name != "."}
    assert {"manifest.json", "calibration.npz", "stage_01.onnx"} <= set(modes)


def test_recalibrate_writes_world_readable_files(
    tmp_path: Path, tiny_artifacts: dict[str, Path], tiny_data: Path, strict_umask: None
) -> None:
    art = tmp_path / "aged"
    shutil.copytree(tiny_artifacts["compact"], art)
    _age(art)
    assert main(["recalibrate", str(art), "--data", str(tiny_data)]) == 0
    assert stat.filemode((art / "calibration.npz").stat().st_mode) == "-rw-r--r--"
    assert stat.filemode((art / "manifest.json").stat().st_mode) == "-rw-r--r--"
