"""The raw-image fast path answers exactly what the FastAPI route answers, and only takes what it should."""

from __future__ import annotations

import json
from typing import Any

import pytest

import service.http.v1.fast_path as fast_path
from service.http.v1.fast_path import parse_simple_query
from tests.service.http import images
from tests.service.http.conftest import ClientFactory

PNG = {"content-type": "image/png"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {}),
        (b"max_exit=2", {"max_exit": 2}),
        (b"budget_macs=1.5e3", {"budget_macs": 1500.0}),
        (b"max_accuracy_drop=.01&top_k=3", {"max_accuracy_drop": 0.01, "top_k": 3}),
        (b"early_exit=FALSE&deadline_ms=250", {"early_exit": False, "deadline_ms": 250.0}),
        (b"thresholds=0.9%2C0.8%2C0&policy=optimal", {"thresholds": "0.9,0.8,0", "policy": "optimal"}),
        (b"thresholds=", {"thresholds": ""}),
    ],
)
def test_simple_queries_are_parsed(query: bytes, expected: dict[str, Any]) -> None:
    parsed = parse_simple_query(query)
    assert parsed is not None
    flat = {**parsed["budget"], **{k: v for k, v in parsed.items() if k != "budget"}}
    assert {k: v for k, v in flat.items() if v is not None} == expected


@pytest.mark.parametrize(
    "query",
    [
        b"max_exit=0",  # ge=1
        b"max_exit=1.0",  # FastAPI decides what a float max_exit means
        b"max_exit=",  # blank
        b"top_k=1001",  # le=1000
        b"budget_macs=0",  # gt=0
        b"budget_macs=nan",
        b"budget_macs=inf",
        b"max_accuracy_drop=1.5",  # le=1
        b"deadline_ms=600001",  # le=600000
        b"early_exit=maybe",
        b"early_exit=yes",  # valid for FastAPI, but not in our narrow form: FastAPI parses it
        b"max_exit=1&max_exit=2",  # repeated
        b"unknown=1",
    ],
)
def test_anything_unusual_goes_to_fastapi(query: bytes) -> None:
    assert parse_simple_query(query) is None


CASES: list[tuple[str, dict[str, Any]]] = [
    ("", {"content": images.png(seed=1)}),
    ("?max_exit=1", {"content": images.png(seed=2)}),
    ("?thresholds=0.9,0.5,0&top_k=2", {"content": images.png(seed=3)}),
    ("?early_exit=false", {"content": images.png(seed=4)}),
    ("?max_accuracy_drop=0.05", {"content": images.png(seed=5)}),
    ("?budget_macs=1000", {"content": images.png(seed=6)}),
    ("?deadline_ms=5000&policy=optimal&budget_macs=2000", {"content": images.png(seed=7)}),
    ("?thresholds=0.9,abc,0", {"content": images.png()}),  # 422 from the shared parser
    ("?max_exit=9", {"content": images.png()}),  # 422: more exits than the model has
    ("?budget_macs=5&max_exit=1", {"content": images.png()}),  # 422: two budgets
    ("?policy=nope&budget_macs=1000", {"content": images.png()}),  # 422: unknown policy
    ("", {"content": b"not an image"}),  # 400
    ("", {"content": b""}),  # 400, empty body
    ("?max_exit=0", {"content": images.png()}),  # delegated: FastAPI's 422
]


def _normalised(response: Any) -> tuple[int, str, Any]:
    body = response.json()
    if response.status_code == 200:
        body.pop("latency_ms")
    return response.status_code, response.headers["content-type"], body


@pytest.mark.parametrize(("query", "kwargs"), CASES, ids=[f"{q or 'none'}-{i}" for i, (q, _) in enumerate(CASES)])
def test_fast_path_answers_like_the_fastapi_route(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, query: str, kwargs: dict[str, Any]
) -> None:
    decisions: list[bool] = []  # True: the fast path served it; False: handed to FastAPI
    real = fast_path.parse_simple_query

    def spy(query_string: bytes) -> dict[str, Any] | None:
        parsed = real(query_string)
        decisions.append(parsed is not None)
        return parsed

    monkeypatch.setattr(fast_path, "parse_simple_query", spy)
    answers = []
    for enabled in (True, False):
        with make_client(fast_path=enabled) as client:
            answers.append(_normalised(client.post(f"/v1/classify{query}", headers=PNG, **kwargs)))
    assert answers[0] == answers[1], json.dumps(answers, indent=1)[:2000]
    assert decisions == [query != "?max_exit=0"]  # asked once: the disabled app never looks


def test_fast_path_requests_are_counted_under_the_route_template(make_client: ClientFactory) -> None:
    with make_client() as client:
        assert client.post("/v1/classify?max_exit=1", content=images.png(), headers=PNG).status_code == 200
        metrics = client.get("/metrics").text
    assert 'boostserve_requests_total{method="POST",route="/v1/classify",status_class="2xx"} 1.0' in metrics


def test_body_limit_and_request_id_still_apply(make_client: ClientFactory) -> None:
    with make_client(max_body_bytes=1024) as client:
        response = client.post(
            "/v1/classify", content=b"\x89PNG" + b"\0" * 4096, headers={**PNG, "x-request-id": "abc-1"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"
    assert response.headers["x-request-id"] == "abc-1"


def test_the_no_escape_query_split_equals_parse_qsl() -> None:
    """split_query skips parse_qsl when there is nothing to unquote; the pairs must not change."""
    import random
    from urllib.parse import parse_qsl

    from service.http.v1.fast_path import split_query

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab=&;1.%+") for _ in range(rng.randint(0, 12)))
        assert split_query(text) == parse_qsl(text, keep_blank_values=True), text


def test_a_repeated_query_is_parsed_once_and_answered_alike(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed options are memoised per query string, so nothing may mutate them between requests."""
    calls: list[bytes] = []
    real = fast_path.parse_simple_query

    def spy(query_string: bytes) -> dict[str, Any] | None:
        calls.append(query_string)
        return real(query_string)

    monkeypatch.setattr(fast_path, "parse_simple_query", spy)
    with make_client() as client:
        good = [client.post("/v1/classify?thresholds=0.9,0.5,0", content=images.png(), headers=PNG) for _ in range(3)]
        bad = [client.post("/v1/classify?thresholds=0.9,x,0", content=images.png(), headers=PNG) for _ in range(2)]
    assert [r.status_code for r in good] == [200] * 3 and [r.status_code for r in bad] == [422] * 2
    assert all(r.json()["budget"]["thresholds"] == [0.9, 0.5, 0.0] for r in good)
    assert len({r.json()["error"]["message"] for r in bad}) == 1
    assert calls == [b"thresholds=0.9,0.5,0", b"thresholds=0.9,x,0"]
