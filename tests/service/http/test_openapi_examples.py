"""Every example in the OpenAPI document is accepted by the server, and the example answer adds up.

Why: /docs is where users copy requests from; an example that the server refuses (as the old
`"policy": "budgeted_batch"` PUT body was) or an answer whose numbers contradict each other
teaches the wrong API. Run against the embedded model, the one the examples describe.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.http.settings import EMBEDDED_MODEL_DIR, Settings

TOKEN = "openapi-example-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PNG = (Path(__file__).resolve().parents[3] / "examples" / "images" / "00000_ankle-boot.png").read_bytes()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(artifacts_dir=EMBEDDED_MODEL_DIR, providers=["cpu"], gc_freeze=False, admin_token=TOKEN)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    return dict(client.get("/openapi.json").json())


def _text(value: Any) -> str:
    """A knob example in its query-string spelling."""
    if isinstance(value, list):
        return ",".join("never" if v is None else f"{v:g}" for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_every_query_parameter_example_is_accepted(client: TestClient, spec: dict[str, Any]) -> None:
    parameters = spec["paths"]["/v1/classify"]["post"]["parameters"]
    assert {p["name"] for p in parameters} >= {"budget_macs", "max_accuracy_drop", "thresholds", "top_k"}
    for parameter in parameters:
        (example,) = parameter["schema"]["examples"]
        query = f"{parameter['name']}={_text(example)}"
        if parameter["name"] == "policy":  # a policy refines a budget knob that takes one
            query += "&budget_macs=5e6"
        if parameter["name"] == "drop_confidence":  # refines max_accuracy_drop
            query += "&max_accuracy_drop=0.01"
        response = client.post(f"/v1/classify?{query}", content=PNG, headers={"content-type": "image/png"})
        assert response.status_code == 200, (query, response.text)


def test_every_put_budget_example_is_accepted(client: TestClient, spec: dict[str, Any]) -> None:
    body = spec["paths"]["/v1/budget"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    before = client.get("/v1/budget").json()
    try:
        for example in body["examples"]:
            response = client.put("/v1/budget", json=example, headers=AUTH)
            assert response.status_code == 200, (example, response.text)
            shown = response.json()
            for name, value in example.items():
                assert (shown["early_exit"] if name == "early_exit" else shown["budget"][name]) == value
    finally:
        restore = {**before["budget"], "early_exit": before["early_exit"]}
        assert client.put("/v1/budget", json=restore, headers=AUTH).status_code == 200


def test_every_classify_json_example_is_accepted(client: TestClient, spec: dict[str, Any]) -> None:
    image = base64.b64encode(PNG).decode()
    examples = spec["components"]["schemas"]["ClassifyJSON"]["examples"]
    assert examples
    for example in examples:
        body = {**example}
        if "image" in body:
            body["image"] = image
        if "images" in body:
            body["images"] = [image] * len(body["images"])
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 200, (example, response.text)


def test_the_v2_request_example_is_accepted(client: TestClient, spec: dict[str, Any]) -> None:
    (example,) = spec["components"]["schemas"]["InferenceRequest"]["examples"]
    model = client.app.state.service.manifest.name  # type: ignore[attr-defined]
    response = client.post(f"/v2/models/{model}/infer", json=example)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == example["id"]


def test_the_example_answer_is_self_consistent(client: TestClient, spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    result = {name: p["examples"][0] for name, p in schemas["ImageResult"]["properties"].items() if "examples" in p}
    manifest = client.app.state.service.manifest  # type: ignore[attr-defined]
    assert result["exits_total"] == manifest.num_stages
    assert 1 <= result["exit"] <= result["exits_total"]
    assert result["macs"] == manifest.cumulative_macs[result["exit"] - 1]
    assert result["macs_fraction"] == pytest.approx(result["macs"] / manifest.full_macs, rel=1e-3)
    assert result["class_name"] == manifest.classes[result["label"]]
    assert result["deadline_hit"] is False
    info = {name: p["examples"][0] for name, p in schemas["BudgetInfo"]["properties"].items() if "examples" in p}
    assert len(info["thresholds"]) == manifest.num_stages and info["thresholds"][-1] == 0.0
    assert client.put("/v1/budget", json=info["budget"], headers=AUTH).status_code == 200
    assert info["policy"] in ("optimal", "reference")
