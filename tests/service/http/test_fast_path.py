"""The raw-image fast path answers exactly what the FastAPI route answers, and only takes what it should."""

from __future__ import annotations

import json
from typing import Any

import pytest

import service.http.v1.fast_path as fast_path
from service.core.errors import ValidationFailedError
from service.http.v1 import request as wire
from tests.service.http import images
from tests.service.http.conftest import ClientFactory

PNG = {"content-type": "image/png"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {}),
        (b"max_exit=2", {"max_exit": "2"}),
        (b"thresholds=0.9%2C0.8%2C0&policy=optimal", {"thresholds": "0.9,0.8,0", "policy": "optimal"}),
        (b"thresholds=", {"thresholds": ""}),
        (b"a+b=c%20d", {"a b": "c d"}),
    ],
)
def test_the_query_becomes_knobs_as_text(query: bytes, expected: dict[str, str]) -> None:
    assert wire.query_options(query) == expected


def test_a_query_parameter_given_twice_is_refused() -> None:
    with pytest.raises(ValidationFailedError, match="'max_exit' is given more than once"):
        wire.query_options(b"max_exit=1&max_exit=2")


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
    ("?max_exit=0", {"content": images.png()}),  # 422: exits are 1-based
    ("?max_exit=1.0", {"content": images.png()}),  # 422: a whole number
    ("?top_k=1001", {"content": images.png()}),  # 422: top_k <= 1000
    ("?budget_macs=nan", {"content": images.png()}),  # 422: finite
    ("?deadline_ms=600001", {"content": images.png()}),  # 422: at most ten minutes
    ("?early_exit=yes", {"content": images.png()}),  # 422: true/false/1/0 only
    ("?max_acuracy_drop=0.001", {"content": images.png()}),  # 422: misspelt knob
    ("?foo=bar", {"content": images.png()}),  # 422: unknown parameter
    ("?early_exit=false&max_exit=1", {"content": images.png()}),  # 422: the budget would be ignored
    ("?policy=reference&max_exit=1", {"content": images.png()}),  # 422: max_exit takes no policy
    ("?max_exit=1&max_exit=2", {"content": images.png()}),  # 422: given twice
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
    served: list[str] = []  # one entry per request the fast path handled
    real = fast_path.RawClassifyFastPath.__call__

    async def spy(self: Any, scope: Any, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(fast_path.RawClassifyFastPath, "__call__", spy)
    answers = []
    for enabled in (True, False):
        with make_client(fast_path=enabled) as client:
            answers.append(_normalised(client.post(f"/v1/classify{query}", headers=PNG, **kwargs)))
    assert answers[0] == answers[1], json.dumps(answers, indent=1)[:2000]
    assert served == ["/v1/classify"]  # every raw-image request: the disabled app never takes it


def test_unknown_parameters_name_the_key_and_list_the_accepted_ones(make_client: ClientFactory) -> None:
    with make_client() as client:
        response = client.post("/v1/classify?max_acuracy_drop=0.001", content=images.png(), headers=PNG)
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "type": "validation_error",
            "message": "unknown query parameter 'max_acuracy_drop'; accepted: budget_macs, max_accuracy_drop, "
            "max_exit, thresholds, policy, drop_confidence, early_exit, deadline_ms, top_k",
        }
    }


def test_fast_path_requests_are_counted_under_the_route_template(make_client: ClientFactory) -> None:
    with make_client() as client:
        assert client.post("/v1/classify?max_exit=1", content=images.png(), headers=PNG).status_code == 200
        metrics = client.get("/metrics").text
    series = 'boostserve_requests_total{method="POST",protocol="http",route="/v1/classify",status_class="2xx"}'
    assert f"{series} 1.0" in metrics


def test_body_limit_and_request_id_still_apply(make_client: ClientFactory) -> None:
    with make_client(max_body_bytes=1024) as client:
        response = client.post(
            "/v1/classify", content=b"\x89PNG" + b"\0" * 4096, headers={**PNG, "x-request-id": "abc-1"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"
    assert response.headers["x-request-id"] == "abc-1"


def test_the_no_escape_query_split_equals_parse_qsl() -> None:
    """query_options skips parse_qsl when there is nothing to unquote; the knobs must not change."""
    import random
    from urllib.parse import parse_qsl

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab=&;1.%+") for _ in range(rng.randint(0, 12)))
        pairs = parse_qsl(text, keep_blank_values=True)
        if len({n for n, _ in pairs}) != len(pairs):
            continue  # a repeated name is refused, not split
        assert wire.query_options(text.encode()) == dict(pairs), text


def test_a_repeated_query_is_parsed_once_and_answered_alike(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed queries are memoised per query string, so nothing may mutate them between requests."""
    calls: list[bytes] = []
    real = wire.query_options

    def spy(query_string: bytes) -> dict[str, str]:
        calls.append(query_string)
        return real(query_string)

    monkeypatch.setattr(fast_path.wire, "query_options", spy)
    with make_client() as client:
        good = [client.post("/v1/classify?thresholds=0.9,0.5,0", content=images.png(), headers=PNG) for _ in range(3)]
        bad = [client.post("/v1/classify?thresholds=0.9,x,0", content=images.png(), headers=PNG) for _ in range(2)]
    assert [r.status_code for r in good] == [200] * 3 and [r.status_code for r in bad] == [422] * 2
    assert all(r.json()["budget"]["thresholds"] == [0.9, 0.5, 0.0] for r in good)
    assert len({r.json()["error"]["message"] for r in bad}) == 1
    assert calls == [b"thresholds=0.9,0.5,0", b"thresholds=0.9,x,0"]  # errors come from the core, not the split
