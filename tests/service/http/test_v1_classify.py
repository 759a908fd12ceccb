"""POST /v1/classify: every input form, per-request budgets, early_exit, response shape."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from tests.service.http import images

RESULT_FIELDS = {
    "label", "class_name", "confidence", "top_k", "exit", "exits_total",
    "macs", "macs_fraction", "deadline_hit",
}  # fmt: skip


def check_response(body: dict, count: int) -> list[dict]:
    assert set(body) == {"results", "latency_ms", "model_name", "model_version", "budget"}
    assert len(body["results"]) == count
    assert body["latency_ms"] > 0
    for result in body["results"]:
        assert set(result) == RESULT_FIELDS
        assert result["exits_total"] == 3
        assert 1 <= result["exit"] <= 3
        assert result["class_name"] == f"class_{result['label']}"
        assert result["top_k"][0]["label"] == result["label"]
        assert result["top_k"][0]["probability"] == pytest.approx(result["confidence"], rel=1e-6)
        assert 0 < result["macs_fraction"] <= 1
        assert result["deadline_hit"] is False
    assert {"budget", "thresholds", "calibrated", "early_exit"} <= set(body["budget"])
    return body["results"]


def test_multipart_single(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"file": ("a.png", images.png(), "image/png")})
    assert response.status_code == 200, response.text
    [result] = check_response(response.json(), 1)
    assert len(result["top_k"]) == 4  # default 5, capped at the 4 classes


def test_multipart_several_files(client: TestClient) -> None:
    files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(3)]
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 200, response.text
    check_response(response.json(), 3)


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream"])
def test_raw_body(client: TestClient, content_type: str) -> None:
    response = client.post("/v1/classify", content=images.png(), headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    check_response(response.json(), 1)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF", "BMP"])
def test_raw_other_formats(client: TestClient, fmt: str) -> None:
    data = images.encode(images.rgb(size=(30, 20)), fmt)
    response = client.post("/v1/classify", content=data, headers={"content-type": f"image/{fmt.lower()}"})
    assert response.status_code == 200, response.text


def test_json_base64_single_and_many(client: TestClient) -> None:
    one = base64.b64encode(images.png()).decode()
    response = client.post("/v1/classify", json={"image": one, "top_k": 2})
    assert response.status_code == 200, response.text
    [result] = check_response(response.json(), 1)
    assert len(result["top_k"]) == 2
    many = [base64.b64encode(images.png(seed=i)).decode() for i in range(4)]
    response = client.post("/v1/classify", json={"images": many})
    assert response.status_code == 200, response.text
    check_response(response.json(), 4)
    data_uri = "data:image/png;base64," + one
    assert client.post("/v1/classify", json={"image": data_uri}).status_code == 200


def test_same_image_same_answer_in_every_form(client: TestClient) -> None:
    data = images.png(seed=7)
    a = client.post("/v1/classify", files={"file": ("a.png", data, "image/png")}).json()["results"][0]
    b = client.post("/v1/classify", content=data, headers={"content-type": "image/png"}).json()["results"][0]
    c = client.post("/v1/classify", json={"image": base64.b64encode(data).decode()}).json()["results"][0]
    assert a == b == c


def test_query_max_exit_1_exits_at_1(client: TestClient) -> None:
    files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(5)]
    response = client.post("/v1/classify?max_exit=1", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {r["exit"] for r in body["results"]} == {1}
    assert body["budget"]["budget"] == {"max_exit": 1}
    macs = {r["macs"] for r in body["results"]}
    assert len(macs) == 1 and all(r["macs_fraction"] < 1 for r in body["results"])


def test_thresholds_above_one_run_to_the_last_exit(client: TestClient) -> None:
    files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(5)]
    response = client.post("/v1/classify?thresholds=2,2,2", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {r["exit"] for r in body["results"]} == {3}
    assert all(r["macs_fraction"] == pytest.approx(1.0) for r in body["results"])
    assert body["budget"]["thresholds"] == [None, None, 0.0]


def test_thresholds_zero_exit_at_1(client: TestClient) -> None:
    response = client.post("/v1/classify?thresholds=0,0,0", content=images.png(), headers={"content-type": "image/png"})
    assert response.json()["results"][0]["exit"] == 1


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/classify?early_exit=false", None),
        ("/v1/classify?early_exit=0", None),
        ("/v1/classify", {"early_exit": False}),
    ],
)
def test_early_exit_false_runs_every_stage(client: TestClient, url: str, body: dict | None) -> None:
    data = images.png()
    if body is None:
        response = client.post(url, content=data, headers={"content-type": "image/png"})
    else:
        response = client.post(url, json={**body, "image": base64.b64encode(data).decode()})
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["results"][0]["exit"] == 3
    assert out["budget"]["early_exit"] is False


def test_json_budget(client: TestClient) -> None:
    one = base64.b64encode(images.png()).decode()
    response = client.post("/v1/classify", json={"image": one, "budget": {"max_exit": 2}})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["exit"] == 2


def test_calibrated_budgets(client: TestClient) -> None:
    for query in ("max_accuracy_drop=0.05", "budget_macs=1e12", "budget_macs=1e12&policy=reference"):
        response = client.post(f"/v1/classify?{query}", content=images.png(), headers={"content-type": "image/png"})
        assert response.status_code == 200, (query, response.text)
        info = response.json()["budget"]
        assert info["calibrated"] is True and info["expected_accuracy"] is not None


def test_request_id_is_echoed_when_sane(client: TestClient) -> None:
    response = client.get("/livez", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    response = client.get("/livez", headers={"x-request-id": "bad id with spaces\x7f"})
    assert response.headers["x-request-id"] != "bad id with spaces\x7f"
    assert len(response.headers["x-request-id"]) == 32


def test_generated_request_ids_are_unique_hex(client: TestClient) -> None:
    png = {"content-type": "image/png"}
    ids = [client.get("/livez").headers["x-request-id"] for _ in range(3)]
    ids += [client.post("/v1/classify", content=images.png(), headers=png).headers["x-request-id"] for _ in range(3)]
    assert len(set(ids)) == 6
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        ("/v1/classify?early_exit=false&thresholds=0,0,0", None, "thresholds would be ignored"),
        ("/v1/classify", {"early_exit": False, "budget": {"max_exit": 1}}, "max_exit would be ignored"),
    ],
)
def test_early_exit_false_with_a_budget_is_refused(
    client: TestClient, url: str, body: dict | None, message: str
) -> None:
    data = images.png()
    if body is None:
        response = client.post(url, content=data, headers={"content-type": "image/png"})
    else:
        response = client.post(url, json={**body, "image": base64.b64encode(data).decode()})
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "type": "validation_error",
            "message": f"early_exit=false runs every stage, so {message}: give one or the other",
        }
    }


def test_json_options_come_from_the_body_or_the_query_not_both(client: TestClient) -> None:
    one = base64.b64encode(images.png()).decode()
    assert len(client.post("/v1/classify?top_k=1", json={"image": one}).json()["results"][0]["top_k"]) == 1
    assert len(client.post("/v1/classify", json={"image": one, "top_k": 3}).json()["results"][0]["top_k"]) == 3
    both = client.post("/v1/classify?top_k=1", json={"image": one, "top_k": 3})
    assert both.status_code == 422
    assert both.json() == {
        "error": {
            "type": "validation_error",
            "message": "top_k is given both in the JSON body and in the query: give it once",
        }
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"image": "x", "budgte": {"max_exit": 1}},
            "unknown field 'budgte'; accepted: image, images, budget, early_exit, deadline_ms, top_k",
        ),
        (
            {"image": "x", "budget": {"max_exits": 1}},
            "unknown budget field 'max_exits'; accepted: budget_macs, max_accuracy_drop, max_exit, thresholds, "
            "policy, drop_confidence",
        ),
        (
            {"image": "x", "early_exit": "yes"},
            "early_exit must be a boolean: true or false (in text also 1 or 0), got 'yes'",
        ),
    ],
)
def test_json_body_is_strict(client: TestClient, body: dict, message: str) -> None:
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 422
    assert response.json() == {"error": {"type": "validation_error", "message": message}}


def test_the_options_memo_keeps_json_types_apart(client: TestClient) -> None:
    """1 == True and 2.0 == 2 in Python: a memo keyed on values alone let a refused body through once an
    accepted look-alike had been seen."""
    one = base64.b64encode(images.png()).decode()
    for accepted, refused, message in (
        (
            {"early_exit": True},
            {"early_exit": 1},
            "early_exit must be a boolean: true or false (in text also 1 or 0), got 1",
        ),
        ({"budget": {"max_exit": 2}}, {"budget": {"max_exit": 2.0}}, "max_exit must be a whole number, got 2.0"),
    ):
        assert client.post("/v1/classify", json={"image": one, **accepted}).status_code == 200
        response = client.post("/v1/classify", json={"image": one, **refused})
        assert response.status_code == 422
        assert response.json() == {"error": {"type": "validation_error", "message": message}}
