"""Shared fixtures for service tests: one seeded synthetic artifact per session (see tests/fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.synthetic_artifact import build_synthetic_artifact


@pytest.fixture(scope="session")
def synthetic_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-stage, 4-class, 1x8x8 artifact with calibration.npz (read-only: do not modify it)."""
    return build_synthetic_artifact(tmp_path_factory.mktemp("synthetic_artifact"))


@pytest.fixture(scope="session")
def synthetic_artifact_rgb_cascade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-stage RGB 3x8x8 artifact whose stage 2 (index 2) reads the image again (cascade)."""
    return build_synthetic_artifact(
        tmp_path_factory.mktemp("synthetic_artifact_rgb"), num_stages=4, channels=3, cascade_stage=2, seed=1
    )
