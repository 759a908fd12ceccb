"""`drop_confidence` through HTTP: the knob table's row reaches v1 query strings and v2 parameters.

Exact bodies: the budget member of a v1 answer and the 422s of both route families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core import policies as P
from service.core.artifact import load_calibration, load_manifest
from tests.service.http import images
from tests.service.http.test_v2 import MODEL, fp32_input, infer

DROP = 0.05  # the synthetic artifact (200 held-out images): 0.5 certifies more than 0.95 here


def _post(client: TestClient, query: str) -> Any:
    return client.post(f"/v1/classify?{query}", content=images.png(), headers={"content-type": "image/png"})


def _expected(artifact: Path, confidence: float) -> dict[str, Any]:
    manifest = load_manifest(artifact)
    return P.max_accuracy_drop(load_calibration(artifact, manifest), DROP, "optimal", confidence).to_json()


def test_v1_query_passes_drop_confidence_to_the_policy(client: TestClient, synthetic_artifact: Path) -> None:
    low, default = _expected(synthetic_artifact, 0.5), _expected(synthetic_artifact, 0.95)
    assert low["thresholds"] != default["thresholds"]  # the knob matters on this artifact
    response = _post(client, f"max_accuracy_drop={DROP}&drop_confidence=0.5")
    assert response.status_code == 200, response.text
    budget = response.json()["budget"]
    assert budget["budget"] == {"max_accuracy_drop": DROP, "policy": "optimal", "drop_confidence": 0.5}
    assert budget["thresholds"] == low["thresholds"]
    assert budget["expected_macs"] == low["expected_macs"]
    plain = _post(client, f"max_accuracy_drop={DROP}").json()["budget"]
    assert plain["budget"] == {"max_accuracy_drop": DROP, "policy": "optimal"}
    assert plain["thresholds"] == default["thresholds"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            "budget_macs=5e6&drop_confidence=0.9",
            "drop_confidence applies to max_accuracy_drop only, not to budget_macs",
        ),
        ("max_accuracy_drop=0.01&drop_confidence=1", "drop_confidence must be in (0, 1), got '1'"),
        ("drop_confidence=0.9", "drop_confidence needs a budget knob that takes it: max_accuracy_drop"),
    ],
)
def test_v1_refusals_exact_body(client: TestClient, query: str, message: str) -> None:
    response = _post(client, query)
    assert response.status_code == 422
    assert response.json() == {"error": {"type": "validation_error", "message": message}}


def test_v2_parameters(client: TestClient, synthetic_artifact: Path) -> None:
    body = {"inputs": [fp32_input()], "parameters": {"max_accuracy_drop": DROP, "drop_confidence": 0.5}}
    assert infer(client, body).status_code == 200
    body["parameters"] = {"max_exit": 1, "drop_confidence": 0.5}
    response = infer(client, body, MODEL)
    assert response.status_code == 422
    assert response.json() == {
        "error": "drop_confidence applies to max_accuracy_drop only, not to max_exit",
        "error_type": "validation_error",
    }


def test_v1_json_budget_object_carries_drop_confidence(client: TestClient, synthetic_artifact: Path) -> None:
    """The JSON `budget` object takes every budget field of the knob table, drop_confidence included."""
    import base64

    low = _expected(synthetic_artifact, 0.5)
    payload = {
        "image": base64.b64encode(images.png()).decode(),
        "budget": {"max_accuracy_drop": DROP, "drop_confidence": 0.5},
    }
    response = client.post("/v1/classify", json=payload)
    assert response.status_code == 200, response.text
    budget = response.json()["budget"]
    assert budget["budget"] == {"max_accuracy_drop": DROP, "policy": "optimal", "drop_confidence": 0.5}
    assert budget["thresholds"] == low["thresholds"]


def test_put_budget_carries_drop_confidence(client: TestClient, synthetic_artifact: Path) -> None:
    from tests.service.http.conftest import ADMIN_TOKEN

    low = _expected(synthetic_artifact, 0.5)
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    before = client.get("/v1/budget").json()
    try:
        response = client.put("/v1/budget", json={"max_accuracy_drop": DROP, "drop_confidence": 0.5}, headers=auth)
        assert response.status_code == 200, response.text
        assert response.json()["budget"] == {"max_accuracy_drop": DROP, "policy": "optimal", "drop_confidence": 0.5}
        assert response.json()["thresholds"] == low["thresholds"]
    finally:
        assert client.put("/v1/budget", json=before["budget"], headers=auth).status_code == 200
