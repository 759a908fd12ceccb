"""/livez, /readyz, /metrics: series and labels exactly as docs/architecture.md names them."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.service.http import images

DOCUMENTED = {
    "boostserve_request_duration_seconds": ("histogram", {"route", "method", "status_class", "protocol"}),
    "boostserve_requests": ("counter", {"route", "method", "status_class", "protocol"}),
    "boostserve_errors": ("counter", {"error_type"}),
    "boostserve_images": ("counter", set()),
    "boostserve_exits": ("counter", {"stage"}),
    "boostserve_image_macs": ("histogram", set()),
    "boostserve_exit_confidence": ("histogram", {"stage"}),
    "boostserve_stage_duration_seconds": ("histogram", {"stage"}),
    "boostserve_stage_batch_size": ("histogram", {"stage"}),
    "boostserve_multi_request_batches": ("counter", {"stage"}),
    "boostserve_merged_batches": ("counter", {"stage"}),
    "boostserve_merged_batch_images": ("counter", {"stage"}),
    "boostserve_queue_depth": ("gauge", {"stage"}),
    "boostserve_inflight_requests": ("gauge", set()),
    "boostserve_decode_events": ("counter", {"event"}),
    "boostserve_decode_workers": ("gauge", set()),
    "boostserve_decode_queue_depth": ("gauge", set()),
    "boostserve_event_loop_lag_seconds": ("histogram", set()),
    "boostserve_event_loop_lag_max_seconds": ("gauge", set()),
    "boostserve_deadline_hits": ("counter", set()),
    "boostserve_budget_expected_macs": ("gauge", set()),
    "boostserve_budget_expected_accuracy": ("gauge", set()),
    "boostserve_calibrated_exit_fraction": ("gauge", {"stage"}),
    "boostserve_full_macs": ("gauge", set()),
    "boostserve_ready": ("gauge", set()),
    "boostserve_model_info": ("gauge", {"model", "version", "stages", "providers", "exit_rule"}),
}


def test_probes(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_metrics_after_traffic(client: TestClient) -> None:
    png = {"content-type": "image/png"}
    files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(3)]
    assert client.post("/v1/classify", files=files).status_code == 200
    assert client.post("/v1/classify?max_exit=1", content=images.png(), headers=png).status_code == 200
    assert client.post("/v1/classify", content=b"junk", headers=png).status_code == 400
    jpeg = {"content-type": "image/jpeg"}
    jpeg_body = images.encode(images.gray(), "JPEG")
    assert client.post("/v1/classify", content=jpeg_body, headers=jpeg).status_code == 200  # a decode worker
    assert client.get("/no/such/path/12345").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name, (kind, labels) in DOCUMENTED.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)

    def value(name: str, sample_name: str | None = None, **labels: str) -> float:
        for sample in families[name].samples:
            if sample.name == (sample_name or name) and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"no {name} {labels}")

    routes = {s.labels["route"] for s in families["boostserve_requests"].samples}
    assert "/v1/classify" in routes and "other" in routes
    assert not any("12345" in r for r in routes)
    assert value("boostserve_requests", "boostserve_requests_total", route="/v1/classify", status_class="2xx") >= 2
    assert value("boostserve_errors", "boostserve_errors_total", error_type="invalid_image") >= 1
    assert value("boostserve_errors", "boostserve_errors_total", error_type="not_found") >= 1
    assert value("boostserve_images", "boostserve_images_total") >= 4
    assert value("boostserve_exits", "boostserve_exits_total", stage="1") >= 1
    assert {s.labels["stage"] for s in families["boostserve_exits"].samples} == {"1", "2", "3"}
    assert value("boostserve_stage_batch_size", "boostserve_stage_batch_size_count", stage="1") >= 2
    assert value("boostserve_image_macs", "boostserve_image_macs_count") >= 4
    assert value("boostserve_ready") == 1
    assert value("boostserve_full_macs") > 0
    assert value("boostserve_model_info", stages="3", model="synthetic-boostnet") == 1
    assert 0 <= value("boostserve_budget_expected_accuracy") <= 1
    assert value("boostserve_inflight_requests") == 0
    assert value("boostserve_decode_events", "boostserve_decode_events_total", event="decoded") == 1
    assert value("boostserve_decode_events", "boostserve_decode_events_total", event="killed") == 0
    assert value("boostserve_decode_workers") == 2  # started with the first image that needed one
    assert value("boostserve_decode_queue_depth") == 0


def test_two_apps_do_not_share_series(client: TestClient, make_client) -> None:  # type: ignore[no-untyped-def]
    with make_client() as other:
        text = other.get("/metrics").text
        assert 'route="/v1/classify"' not in text


def test_openapi_documents_every_route_and_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/classify", "/v1/budget", "/v2/models/{name}/infer", "/livez", "/readyz", "/metrics"):
        assert path in paths
    schemas = spec["components"]["schemas"]
    assert {"ClassifyJSON", "BudgetFields", "InferenceRequest", "ClassifyResponse", "ErrorResponse"} <= set(schemas)
    body = paths["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(body)
    assert not any(p["name"] == "version" for p in paths["/v2/models/{name}"]["get"].get("parameters", []))
    assert client.get("/docs").status_code == 200


def test_shutdown_flips_readiness_and_stops_the_scheduler(make_client) -> None:  # type: ignore[no-untyped-def]
    with make_client() as c:
        app = c.app
        assert c.get("/readyz").status_code == 200
        runtime = app.state.service  # type: ignore[attr-defined]
    assert runtime.ready is False and runtime.closing is True
    assert runtime.scheduler.running is False
    assert "boostserve_ready 0.0" in app.state.metrics.render().decode()  # type: ignore[attr-defined]
