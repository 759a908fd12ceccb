"""The `method` label of the request series is a closed set: made-up methods cannot grow /metrics.

Why: the method is request data, and h11 accepts any token as a method, so each new method would
add a request counter and a latency histogram (with every bucket) per route and status class.
"""

from __future__ import annotations

import random
import string

from prometheus_client.parser import text_string_to_metric_families

from service.http.metrics import STANDARD_METHODS
from tests.service.http.conftest import ClientFactory


def _request_series(text: str) -> set[tuple[tuple[str, str], ...]]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {tuple(sorted(s.labels.items())) for s in families["boostserve_requests"].samples}


def test_random_methods_share_one_label(make_client: ClientFactory) -> None:
    rng = random.Random(0)
    methods = {"".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))) for _ in range(50)}
    methods -= STANDARD_METHODS
    assert len(methods) == 50
    with make_client() as client:
        before = len(_request_series(client.get("/metrics").text))
        for method in sorted(methods):
            for path in ("/v1/classify", "/no/such/path"):
                assert client.request(method, path).status_code in (404, 405)
        client.request("PATCH", "/v1/classify")
        series = _request_series(client.get("/metrics").text)
    labels = {dict(s)["method"] for s in series}
    assert labels <= STANDARD_METHODS | {"other"}
    assert "other" in labels and "PATCH" in labels
    # 100 requests with 50 methods: one label value, so at most a few series (route x status class).
    assert len(series) - before <= 4, sorted(series)
