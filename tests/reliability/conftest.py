"""Fixtures for the reliability and security suites (issue 8).

- `rel_artifact`: a seeded synthetic artifact (real ONNX stage graphs + manifest + calibration),
  28x28 grayscale like the embedded Fashion-MNIST model, small enough for the default suite.
- `heavy_artifact`: the same interface with compute-bound stages (tests/reliability/_heavy.py), so
  capacity is set by the model, not by HTTP overhead, and the Python load generator can reach 4x
  capacity on a 2-core machine.
- `make_app` / `app_client`: `service.http.app.create_app(Settings(...))` in process (FastAPI TestClient,
  lifespan run), for tests that need to monkeypatch the engine or capture logs.
- `live_server`: a factory for real `boostserve serve` processes (tests/reliability/_server.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.synthetic_artifact import build_synthetic_artifact
from tests.reliability._heavy import build_heavy_artifact
from tests.reliability._server import LiveServer

IMAGE_SIDE = 28
HEAVY_DEPTH = 150
LOAD_DEPTH = 1200

#: Tiny settings for in-process apps: one ORT thread, small limits so limit tests are cheap.
BASE_SETTINGS: dict[str, Any] = {
    "intra_op_threads": 1,
    "inter_op_threads": 1,
    "max_batch_size": 8,
    "max_batch_wait_ms": 1.0,
    "max_body_bytes": 256 * 1024,
    "max_image_pixels": 4096 * 4096,
    "log_level": "warning",
}


@pytest.fixture(scope="session")
def rel_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_artifact(
        tmp_path_factory.mktemp("rel_artifact"),
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        num_classes=10,
        seed=8,
    )


@pytest.fixture(scope="session")
def heavy_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compute-bound stages (see _heavy.py): ~5-10 ms of ORT time per image at batch 8."""
    return build_heavy_artifact(tmp_path_factory.mktemp("heavy_artifact"), depth=HEAVY_DEPTH, hidden=512)


@pytest.fixture(scope="session")
def load_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For overload/soak: ~20 ms of single-threaded ORT time per image at batch 8 (all stages), so
    capacity is ~40-50 req/s and 4x of it stays within reach of the Python load generator."""
    return build_heavy_artifact(tmp_path_factory.mktemp("load_artifact"), depth=LOAD_DEPTH, hidden=512)


def make_settings(artifacts: Path, **overrides: Any) -> Any:
    from service.http.settings import Settings

    # gc_freeze off in process: it would freeze the whole pytest session's objects.
    values = {**BASE_SETTINGS, "artifacts_dir": artifacts, "gc_freeze": False, **overrides}
    return Settings(**values)


@pytest.fixture
def make_app(rel_artifact: Path) -> Callable[..., Any]:
    """make_app(**settings) -> FastAPI app (not started)."""
    from service.http.app import create_app

    def factory(artifacts: Path | None = None, **overrides: Any) -> Any:
        return create_app(make_settings(artifacts or rel_artifact, **overrides))

    return factory


@pytest.fixture
def app_client(make_app: Callable[..., Any]) -> Iterator[Any]:
    """A started in-process app (lifespan run) with a TestClient; default test settings."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """live_server(artifacts, **settings) -> started LiveServer; all stopped at teardown."""
    servers: list[LiveServer] = []

    def start(artifacts: Path, *, timeout: float = 60.0, cpus: set[int] | None = None, **settings: Any) -> LiveServer:
        merged = {"intra_op_threads": 1, "inter_op_threads": 1, "log_level": "warning", **settings}
        server = LiveServer(artifacts, tmp_path / "logs", cpus=cpus, **merged)
        servers.append(server)
        return server.start(timeout=timeout)

    yield start
    for server in servers:
        server.stop()
