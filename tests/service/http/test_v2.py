"""Open Inference Protocol v2: health, metadata, infer (FP32 NCHW, UINT8 HWC), parameters, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.fixtures.synthetic_artifact import random_images
from tests.service.http import images
from tests.service.http.conftest import assert_error

MODEL = "synthetic-boostnet"


def infer(client: TestClient, body: dict[str, Any], name: str = MODEL) -> Any:
    return client.post(f"/v2/models/{name}/infer", json=body)


def fp32_input(batch: int = 2, nested: bool = False, seed: int = 0) -> dict[str, Any]:
    x = random_images(batch, seed=seed)
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "boostserve" and meta["extensions"] == ["binary_tensor_data"] and meta["version"]


def test_model_metadata_publishes_both_inputs(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and len(meta["versions"]) == 1
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert inputs["image"] == {"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {
        "probabilities": ("FP32", [-1, 4]),
        "label": ("INT64", [-1]),
        "exit": ("INT64", [-1]),
        "macs": ("INT64", [-1]),
    }
    version = meta["versions"][0]
    assert client.get(f"/v2/models/{MODEL}/versions/{version}").json() == meta
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/{version}/ready").status_code == 200


def test_unknown_model_or_version_is_404(client: TestClient) -> None:
    assert_error(client.get("/v2/models/nope"), 404, "not_found", "nope")
    assert_error(client.get(f"/v2/models/{MODEL}/versions/0"), 404, "not_found")
    assert_error(client.get("/v2/models/nope/ready"), 404, "not_found")
    assert_error(infer(client, {"inputs": [fp32_input()]}, name="nope"), 404, "not_found")


@pytest.mark.parametrize("nested", [False, True])
def test_infer_fp32(client: TestClient, nested: bool) -> None:
    response = infer(client, {"id": "req-7", "inputs": [fp32_input(nested=nested)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-7" and body["model_name"] == MODEL and body["model_version"]
    out = {o["name"]: o for o in body["outputs"]}
    assert list(out) == ["probabilities", "label", "exit", "macs"]
    probs = np.asarray(out["probabilities"]["data"], dtype=np.float32).reshape(out["probabilities"]["shape"])
    assert probs.shape == (2, 4) and out["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert out["label"]["data"] == probs.argmax(axis=1).tolist() and out["label"]["datatype"] == "INT64"
    assert out["exit"]["shape"] == [2] and all(1 <= e <= 3 for e in out["exit"]["data"])
    assert out["macs"]["datatype"] == "INT64"
    params = body["parameters"]
    assert params["exits_total"] == 3 and params["early_exit"] is True
    assert all(isinstance(v, str | int | float | bool) for v in params.values())


def test_infer_uint8_hwc_matches_v1(client: TestClient) -> None:
    image = images.gray(seed=3)
    pixels = np.asarray(image)[:, :, None]  # (8, 8, 1)
    for shape, data in (([1, 8, 8, 1], pixels[None].reshape(-1).tolist()), ([8, 8, 1], pixels.tolist())):
        body = {"inputs": [{"name": "image", "shape": shape, "datatype": "UINT8", "data": data}]}
        response = infer(client, {**body, "parameters": {"thresholds": "2,2,0"}})
        assert response.status_code == 200, response.text
        out = {o["name"]: o["data"] for o in response.json()["outputs"]}
        v1 = client.post(
            "/v1/classify?thresholds=2,2,0",
            content=images.encode(image),
            headers={"content-type": "image/png"},
        ).json()["results"][0]
        assert out["label"] == [v1["label"]] and out["exit"] == [3]
        assert out["probabilities"][v1["label"]] == pytest.approx(v1["confidence"], rel=1e-5)


def test_outputs_filter_and_budget_parameters(client: TestClient) -> None:
    body = {
        "inputs": [fp32_input(batch=3)],
        "outputs": [{"name": "exit"}, {"name": "label", "parameters": {"binary_data": False}}],
        "parameters": {"max_exit": 1},
    }
    response = infer(client, body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"]
    assert [o["name"] for o in out] == ["exit", "label"]
    assert out[0]["data"] == [1, 1, 1]
    body["parameters"] = {"early_exit": False}
    assert infer(client, body).json()["outputs"][0]["data"] == [3, 3, 3]
    body["parameters"] = {"thresholds": [0, 0, 0]}
    assert infer(client, body).json()["outputs"][0]["data"] == [1, 1, 1]


def test_versioned_infer(client: TestClient) -> None:
    version = client.get(f"/v2/models/{MODEL}").json()["versions"][0]
    response = client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json={"inputs": [fp32_input()]})
    assert response.status_code == 200, response.text
    assert_error(
        client.post(f"/v2/models/{MODEL}/versions/bad/infer", json={"inputs": [fp32_input()]}),
        404,
        "not_found",
    )


@pytest.mark.parametrize(
    ("tensor", "contains"),
    [
        ({"name": "input", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.0] * 64}, "NCHW"),
        ({"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 10}, "needs 64 values"),
        ({"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP64", "data": [0.0] * 64}, "datatype"),
        ({"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0] * 64}, "datatype"),
        ({"name": "image", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": [300] * 64}, "0..255"),
        ({"name": "image", "shape": [1, 8, 8, 2], "datatype": "UINT8", "data": [0] * 128}, "channels"),
        ({"name": "image", "shape": [8, 8], "datatype": "UINT8", "data": [0] * 64}, "shape"),
        ({"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}, "unknown input"),
        ({"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["a"] * 64}, "numbers"),
        (
            {
                "name": "input",
                "shape": [1, 1, 8, 8],
                "datatype": "FP32",
                "data": [[0.0] * 8] * 7 + [[0.0] * 7],
            },
            "data",
        ),
    ],
)
def test_bad_tensors_are_422(client: TestClient, tensor: dict[str, Any], contains: str) -> None:
    assert_error(infer(client, {"inputs": [tensor]}), 422, "validation_error", contains)


def test_nan_is_422(client: TestClient) -> None:
    data = [0.0] * 63 + [float("nan")]
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]}
    response = client.post(
        f"/v2/models/{MODEL}/infer",
        content=__import__("json").dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 422, "validation_error", "NaN")


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({"inputs": []}, "inputs"),
        ({"inputs": [fp32_input(), fp32_input()]}, "exactly one input"),
        ({"inputs": [fp32_input()], "outputs": [{"name": "logits"}]}, "unknown output"),
        ({"inputs": [fp32_input()], "parameters": {"max_exit": 0}}, "max_exit"),
        ({"inputs": [fp32_input()], "parameters": {"early_exit": "maybe"}}, "early_exit"),
        ({"inputs": [fp32_input()], "parameters": {"deadline_ms": -3}}, "deadline_ms"),
    ],
)
def test_bad_requests_are_422(client: TestClient, body: dict[str, Any], contains: str) -> None:
    assert_error(infer(client, body), 422, "validation_error", contains)


def test_v2_errors_have_the_oip_body_on_every_path(make_client: Any) -> None:
    """Domain, routing, validation and middleware errors under /v2: {"error": str, "error_type": str}."""
    with make_client(max_body_bytes=2048) as c:
        unknown = c.get("/v2/models/nope")
        assert unknown.status_code == 404
        assert unknown.json() == {
            "error": f"unknown model 'nope'; this server serves '{MODEL}'",
            "error_type": "not_found",
        }
        assert c.get("/v2/no/such/route").json() == {
            "error": "no route for GET /v2/no/such/route",
            "error_type": "not_found",
        }
        assert_error(
            c.post(f"/v2/models/{MODEL}/infer", content=b"{not json", headers={"content-type": "application/json"}),
            422,
            "validation_error",
        )
        too_big = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [fp32_input(batch=8)]})
        assert too_big.status_code == 413
        assert too_big.json()["error_type"] == "payload_too_large" and "2048" in too_big.json()["error"]
        # v1 keeps the richer envelope
        assert set(c.get("/v1/nope").json()["error"]) == {"type", "message"}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"max_acuracy_drop": 0.001},
            "unknown parameters key 'max_acuracy_drop'; accepted: budget_macs, max_accuracy_drop, max_exit, "
            "thresholds, policy, drop_confidence, early_exit, deadline_ms",
        ),
        (
            {"top_k": 3},
            "unknown parameters key 'top_k'; accepted: budget_macs, max_accuracy_drop, max_exit, "
            "thresholds, policy, drop_confidence, early_exit, deadline_ms",
        ),
        ({"deadline_ms": 600_001}, "deadline_ms must be in (0, 600000], got 600001"),
        ({"deadline_ms": "soon"}, "deadline_ms must be a number, got 'soon'"),
        ({"early_exit": "yes"}, "early_exit must be a boolean: true or false (in text also 1 or 0), got 'yes'"),
        (
            {"early_exit": False, "max_exit": 1},
            "early_exit=false runs every stage, so max_exit would be ignored: give one or the other",
        ),
        (
            {"max_exit": 1, "budget_macs": 5},
            "give at most one budget knob (budget_macs, max_accuracy_drop, "
            "max_exit, thresholds), got budget_macs, max_exit",
        ),
    ],
)
def test_v2_parameters_are_strict(client: TestClient, parameters: dict[str, Any], message: str) -> None:
    response = infer(client, {"inputs": [fp32_input()], "parameters": parameters})
    assert response.status_code == 422
    assert response.json() == {"error": message, "error_type": "validation_error"}


def test_v2_accepts_what_the_protocol_reserves_and_the_text_spellings(client: TestClient) -> None:
    """Triton/MLServer clients send these; the knobs take the same text forms as the v1 query string."""
    body = {
        "inputs": [fp32_input(batch=2)],
        "outputs": [{"name": "exit"}],
        "parameters": {"priority": 0, "timeout": 1000, "binary_data_output": False, "thresholds": "0,never,0"},
    }
    response = infer(client, body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1, 1]
    body["parameters"] = {"early_exit": "FALSE"}
    assert infer(client, body).json()["outputs"][0]["data"] == [3, 3]


def test_repeated_output_names_are_422(client: TestClient) -> None:
    body = {"inputs": [fp32_input()], "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]}
    response = infer(client, body)
    assert response.status_code == 422
    assert response.json() == {
        "error": "output(s) ['probabilities'] requested more than once",
        "error_type": "validation_error",
    }
