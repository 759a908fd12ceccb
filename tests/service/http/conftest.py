"""HTTP test fixtures: apps built by the factory on the session's synthetic artifact.

Clients are module-scoped where the settings are shared (one lifespan per module keeps the
suite fast); tests that need other settings build their own with `make_client`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.http.settings import Settings
from tests.error_bodies import error_fields
from tests.fixtures.synthetic_artifact import build_synthetic_artifact

ADMIN_TOKEN = "test-admin-token"

ClientFactory = Callable[..., AbstractContextManager[TestClient]]


def settings_for(artifacts: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "artifacts_dir": artifacts,
        "max_batch_wait_ms": 0.0,
        "max_batch_size": 8,
        "providers": ["cpu"],
        "gc_freeze": False,  # in process it would freeze the whole pytest session's objects
    }
    base.update(overrides)
    return Settings(**base)


@contextmanager
def _client(artifacts: Path, **overrides: Any) -> Iterator[TestClient]:
    app = create_app(settings_for(artifacts, **overrides))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def client(synthetic_artifact: Path) -> Iterator[TestClient]:
    """Calibrated 3-stage, 4-class, 1x8x8 model; admin token set; default settings otherwise."""
    with _client(synthetic_artifact, admin_token=ADMIN_TOKEN) as c:
        yield c


@pytest.fixture(scope="session")
def uncalibrated_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_artifact(tmp_path_factory.mktemp("uncalibrated"), with_calibration=False)


@pytest.fixture
def make_client(synthetic_artifact: Path) -> ClientFactory:
    def factory(artifacts: Path | None = None, **overrides: Any) -> AbstractContextManager[TestClient]:
        return _client(artifacts or synthetic_artifact, **overrides)

    return factory


def assert_error(response: Any, status: int, error_type: str, contains: str | None = None) -> dict[str, Any]:
    """Exact status, exact body shape for the route family (v1 envelope / OIP under /v2), type, message."""
    assert response.status_code == status, response.text
    body = response.json()
    got_type, message = error_fields(response.request.url.path, body)
    assert got_type == error_type, body
    if contains is not None:
        assert contains in message, body
    assert response.headers.get("x-request-id")
    return body
