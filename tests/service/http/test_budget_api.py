"""GET/PUT /v1/budget: auth (403 unconfigured, 401 missing/wrong), changes visible, calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.http import images
from tests.service.http.conftest import ADMIN_TOKEN, ClientFactory, assert_error

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def test_get_budget(client: TestClient) -> None:
    response = client.get("/v1/budget")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["budget"] == {"max_accuracy_drop": 0.01, "policy": "optimal"}
    assert len(body["thresholds"]) == 3 and body["thresholds"][-1] == 0.0
    assert body["calibrated"] is True and body["early_exit"] is True
    assert 0 <= body["expected_accuracy"] <= 1
    assert 0 < body["expected_macs_fraction"] <= 1
    assert len(body["exit_fractions"]) == 3 and abs(sum(body["exit_fractions"]) - 1) < 1e-5


def test_put_without_configured_token_is_403(make_client: ClientFactory) -> None:
    with make_client() as client:
        response = client.put("/v1/budget", json={"max_exit": 1}, headers=AUTH)
        assert_error(response, 403, "forbidden", "BOOSTSERVE_ADMIN_TOKEN")


@pytest.mark.parametrize("blank", ["", "   "])
def test_put_with_blank_configured_token_is_403(make_client: ClientFactory, blank: str) -> None:
    """A blank BOOSTSERVE_ADMIN_TOKEN counts as unset: `Bearer ` must never unlock the budget."""
    with make_client(admin_token=blank) as client:
        response = client.put("/v1/budget", json={"max_exit": 1}, headers={"authorization": "Bearer "})
        assert_error(response, 403, "forbidden", "BOOSTSERVE_ADMIN_TOKEN")


def test_put_auth(client: TestClient) -> None:
    missing = client.put("/v1/budget", json={"max_exit": 1})
    assert_error(missing, 401, "unauthorized", "missing")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.put("/v1/budget", json={"max_exit": 1}, headers={"authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized", "invalid")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    basic = client.put("/v1/budget", json={"max_exit": 1}, headers={"authorization": "Basic abc"})
    assert_error(basic, 401, "unauthorized")
    # auth is checked before the body: a bad body without a token is still 401
    assert_error(client.put("/v1/budget", json={"max_exit": 0}), 401, "unauthorized")


def test_put_changes_the_global_budget(client: TestClient) -> None:
    before = client.get("/v1/budget").json()
    # answered (and memoised by Runtime.resolve_fields) under the old budget first
    out = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"}).json()
    assert out["budget"]["budget"] == before["budget"]
    try:
        response = client.put("/v1/budget", json={"max_exit": 1}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["budget"] == {"max_exit": 1}
        assert client.get("/v1/budget").json()["budget"] == {"max_exit": 1}
        out = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"}).json()
        assert out["results"][0]["exit"] == 1 and out["budget"]["budget"] == {"max_exit": 1}
        metrics = client.get("/metrics").text
        assert 'boostserve_calibrated_exit_fraction{stage="1"} 1.0' in metrics
        # the A/B switch alone
        response = client.put("/v1/budget", json={"early_exit": False}, headers=AUTH)
        assert response.status_code == 200 and response.json()["early_exit"] is False
        out = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"}).json()
        assert out["results"][0]["exit"] == 3
    finally:
        client.put("/v1/budget", json={**before["budget"], "early_exit": True}, headers=AUTH)
    assert client.get("/v1/budget").json()["budget"] == before["budget"]


def test_put_invalid_budget_is_422(client: TestClient) -> None:
    for body, contains in (
        ({"max_exit": 7}, "max_exit"),
        ({}, "give one of"),
        (
            {"max_exit": 1, "budget_macs": 5},
            "give at most one budget knob (budget_macs, max_accuracy_drop, max_exit, thresholds), "
            "got budget_macs, max_exit",
        ),
        ({"early_exit": False, "max_exit": 1}, "early_exit=false runs every stage, so max_exit would be ignored"),
        (
            {"max_exit": 1, "policy": "reference"},
            "policy applies to budget_macs, max_accuracy_drop only, not to max_exit",
        ),
        ({"max_exit": None}, "every field is null"),
        ({"bogus": 1}, "bogus"),
    ):
        assert_error(client.put("/v1/budget", json=body, headers=AUTH), 422, "validation_error", contains)


def test_uncalibrated_artifact(make_client: ClientFactory, uncalibrated_artifact: Path) -> None:
    with make_client(uncalibrated_artifact) as client:
        info = client.get("/v1/budget").json()
        # the default max_accuracy_drop needs calibration: fell back to the full network
        assert info["budget"] == {"max_exit": 3} and info["calibrated"] is False
        assert info["expected_accuracy"] is None
        raw = {"content-type": "image/png"}
        for query in ("budget_macs=1000000", "max_accuracy_drop=0.01"):
            response = client.post(f"/v1/classify?{query}", content=images.png(), headers=raw)
            assert_error(response, 422, "validation_error", "calibration")
        for query, exit_ in (("max_exit=2", 2), ("thresholds=0,0,0", 1), ("", 3)):
            response = client.post(f"/v1/classify?{query}", content=images.png(), headers=raw)
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["exit"] == exit_


def test_put_budget_with_a_broken_body_says_what_is_wrong(client: TestClient) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    assert_error(
        client.put("/v1/budget", content=b"{not json", headers=headers), 422, "validation_error", "not valid JSON"
    )
    assert_error(
        client.put("/v1/budget", content=b"max_exit=1", headers={**AUTH, "content-type": "text/plain"}),
        415,
        "unsupported_media_type",
        "unsupported Content-Type 'text/plain': send application/json",
    )
