"""Session fixtures for export tests: one tiny dataset, one checkpoint and one artifact per kind.

Everything is seeded and random-weight (nothing is trained), so the whole export suite stays
within a few seconds of CPU on a shared machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_export import Kind, save_tiny_checkpoint, write_tiny_idx

KINDS: tuple[Kind, ...] = ("compact", "msdnet", "cascade")


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_idx(tmp_path_factory.mktemp("tiny_data"), n_train=120, n_test=60, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {
        kind: save_tiny_checkpoint(root / f"{kind}.pt", kind=kind, seed=0, data_dir=tiny_data, heldout_size=40)
        for kind in KINDS
    }


@pytest.fixture(scope="session")
def tiny_artifacts(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_checkpoints: dict[str, Path]
) -> dict[str, Path]:
    """Read-only: calibrated artifacts exported from the tiny checkpoints."""
    from export.pipeline import ExportOptions
    from export.source import export_from_checkpoint

    root = tmp_path_factory.mktemp("tiny_artifacts")
    options = ExportOptions(progress=False, batch_size=32)
    return {
        kind: export_from_checkpoint(path, tiny_data, root / kind, options).path
        for kind, path in tiny_checkpoints.items()
    }
