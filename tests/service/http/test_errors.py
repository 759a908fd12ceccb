"""Every client error is an exact 4xx with the one envelope, and the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.errors import OverCapacityError
from service.http.v1 import request as v1_wire
from service.http.v2 import codec as v2_codec
from tests.service.http import images
from tests.service.http.conftest import ClientFactory, assert_error

PNG = {"content-type": "image/png"}


def post_raw(client: TestClient, data: bytes, url: str = "/v1/classify", **headers: str) -> Any:
    return client.post(url, content=data, headers={**PNG, **headers})


@pytest.mark.parametrize(
    ("data", "contains"),
    [
        (b"", "zero bytes"),
        (b"this is not an image at all", "not an image"),
        (images.png(size=(64, 64))[:80], "truncated"),
    ],
)
def test_bad_image_bytes_are_400(client: TestClient, data: bytes, contains: str) -> None:
    assert_error(post_raw(client, data), 400, "invalid_image", contains)


def test_decompression_bomb_is_413(client: TestClient) -> None:
    # 20000 x 20000 = 4e8 pixels declared in a ~50 KB PNG; refused from the header.
    assert_error(post_raw(client, images.bomb_png()), 413, "payload_too_large", "pixels")
    # under Pillow's own hard limit, over ours: our message with the size from the header
    body = assert_error(post_raw(client, images.bomb_png(5000, 5000)), 413, "payload_too_large")
    assert "5000x5000" in body["error"]["message"]


def test_bad_image_in_multipart_names_its_index(client: TestClient) -> None:
    files = [("file", ("a.png", images.png(), "image/png")), ("file", ("b.png", b"junk", "image/png"))]
    assert_error(client.post("/v1/classify", files=files), 400, "invalid_image", "image 1")


def test_bad_base64_is_400(client: TestClient) -> None:
    assert_error(client.post("/v1/classify", json={"image": "%%%not base64%%%"}), 400, "invalid_image", "base64")


def test_unknown_content_type_is_415(client: TestClient) -> None:
    response = client.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type", "text/plain")


def test_missing_content_type_is_415(client: TestClient) -> None:
    response = client.post("/v1/classify", content=b"hello", headers={"content-type": ""})
    assert_error(response, 415, "unsupported_media_type")


def test_too_many_images_is_413(make_client: ClientFactory) -> None:
    with make_client(max_images_per_request=2) as client:
        files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(3)]
        assert_error(client.post("/v1/classify", files=files), 413, "too_many_images", "limit is 2")
        many = [base64.b64encode(images.png()).decode()] * 3
        assert_error(client.post("/v1/classify", json={"images": many}), 413, "too_many_images")
        assert client.post("/v1/classify", files=files[:2]).status_code == 200


def test_body_over_the_limit_is_413(make_client: ClientFactory) -> None:
    with make_client(max_body_bytes=2048) as client:
        big = b"\x89PNG" + b"\0" * 4096
        assert_error(post_raw(client, big), 413, "payload_too_large", "2048")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(8):
                yield b"\0" * 1024

        assert_error(client.post("/v1/classify", content=chunks(), headers=PNG), 413, "payload_too_large")
        files = {"file": ("a.png", big, "image/png")}
        assert_error(client.post("/v1/classify", files=files), 413, "payload_too_large")
        assert post_raw(client, images.png()).status_code == 200


@pytest.mark.parametrize(
    ("query", "contains"),
    [
        ("max_exit=0", "max_exit"),
        ("max_exit=9", "max_exit"),
        ("max_exit=abc", "max_exit"),
        ("max_accuracy_drop=2", "max_accuracy_drop"),
        ("budget_macs=-5", "budget_macs"),
        ("thresholds=0.5,abc,0", "thresholds"),
        ("thresholds=0.5,0.5", "thresholds"),
        ("max_exit=1&budget_macs=1000", "give at most one budget knob"),
        ("budget_macs=1e6&policy=nonsense", "policy"),
        ("top_k=0", "top_k"),
        ("deadline_ms=-1", "deadline_ms"),
    ],
)
def test_invalid_budget_values_are_422(client: TestClient, query: str, contains: str) -> None:
    assert_error(post_raw(client, images.png(), f"/v1/classify?{query}"), 422, "validation_error", contains)


@pytest.mark.parametrize(
    ("payload", "contains"),
    [
        ({}, "no image"),
        ({"image": "", "images": []}, "not both"),
        ({"image": "x", "unknown_field": 1}, "unknown_field"),
        ({"image": "x", "budget": {"max_exit": 1, "thresholds": [0.5, 0.5, 0]}}, "give at most one budget knob"),
        ({"image": "x", "top_k": 0}, "top_k"),
    ],
)
def test_invalid_json_is_422(client: TestClient, payload: dict, contains: str) -> None:
    assert_error(client.post("/v1/classify", json=payload), 422, "validation_error", contains)


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "validation_error")


def test_routing_errors_use_the_envelope(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found", "/nope")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")
    assert_error(client.delete("/v1/budget"), 405, "method_not_allowed")


def test_over_capacity_is_429_with_retry_after(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OverCapacityError("queue full", retry_after=2.5)

    monkeypatch.setattr(client.app.state.service.scheduler, "submit", full)  # type: ignore[attr-defined]
    response = post_raw(client, images.png())
    assert_error(response, 429, "over_capacity", "queue full")
    assert response.headers["retry-after"] == "3"


def test_deadline_passing_during_stage_1_is_answered_by_exit_1(make_client: ClientFactory) -> None:
    """Stage 1 is held until the deadline timer has fired: the image is still answered by exit 1
    (anytime semantics), flagged deadline_hit, not a 504."""
    with make_client(stage_execution="thread") as client:
        scheduler = client.app.state.service.scheduler  # type: ignore[attr-defined]
        engine = scheduler.engine
        real = engine.run_stage_batch
        gate = threading.Event()

        def held(k: int, state: Any) -> Any:
            if k == 0:
                assert gate.wait(timeout=30)
            return real(k, state)

        def release_when_late() -> None:
            for _ in range(6000):  # the timer fires after 10 ms; give up (and fail below) after 30 s
                if scheduler.stats.deadline_late:
                    break
                time.sleep(0.005)
            gate.set()

        engine.run_stage_batch = held
        releaser = threading.Thread(target=release_when_late)
        releaser.start()
        response = post_raw(client, images.png(), "/v1/classify?thresholds=never,never,0&deadline_ms=10")
        releaser.join()
        engine.run_stage_batch = real
        reference = post_raw(client, images.png(), "/v1/classify?thresholds=0,0,0")
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [{**reference.json()["results"][0], "deadline_hit": True}]


def test_request_timeout_is_504_from_the_settings(make_client: ClientFactory) -> None:
    with make_client(request_timeout_s=0.2, stage_execution="thread") as client:
        engine = client.app.state.service.scheduler.engine  # type: ignore[attr-defined]
        real = engine.run_stage_batch

        def stuck(k: int, state: Any) -> Any:
            time.sleep(0.6)
            return real(k, state)

        engine.run_stage_batch = stuck
        response = post_raw(client, images.png())
        engine.run_stage_batch = real
    assert_error(response, 504, "deadline_exceeded", "request timeout of 0.2 s")


def test_internal_error_is_a_generic_500_with_request_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    with monkeypatch.context() as patch:
        patch.setattr(client.app.state.service.scheduler, "submit", boom)  # type: ignore[attr-defined]
        response = post_raw(client, images.png(), **{"x-request-id": "req-500"})
    body = assert_error(response, 500, "internal_error", "req-500")
    assert "secret" not in body["error"]["message"]
    assert response.headers["x-request-id"] == "req-500"
    assert any("req-500" in r.getMessage() and r.exc_info for r in caplog.records)
    # ... and the server keeps serving.
    assert post_raw(client, images.png()).status_code == 200


def test_not_ready_is_503_with_retry_after(make_client: ClientFactory, synthetic_artifact: Any) -> None:
    from service.http.app import create_app
    from tests.service.http.conftest import settings_for

    app = create_app(settings_for(synthetic_artifact))
    client = TestClient(app)  # no `with`: the lifespan never ran, the model is not loaded
    for url in ("/readyz", "/v2/health/ready"):
        response = client.get(url)
        assert_error(response, 503, "not_ready")
        assert response.headers["retry-after"] == "1"
    assert_error(post_raw(client, images.png()), 503, "not_ready")
    assert client.get("/livez").status_code == 200


@pytest.mark.parametrize("deadline_ms", ["0.001", "5e-324"])
def test_a_deadline_already_passed_is_answered_by_exit_1(client: TestClient, deadline_ms: str) -> None:
    """A client's own too-small deadline is no server fault (never a 5xx): the cheapest exit answers,
    flagged deadline_hit, with exactly exit 1's answer (v1 and v2)."""
    png = images.png()
    reference = post_raw(client, png, "/v1/classify?thresholds=0,0,0").json()["results"][0]
    assert (reference["exit"], reference["deadline_hit"]) == (1, False)
    v1 = post_raw(client, png, f"/v1/classify?thresholds=never,never,0&deadline_ms={deadline_ms}")
    assert v1.status_code == 200, v1.text
    assert v1.json()["results"] == [{**reference, "deadline_hit": True}]

    tensor = {"name": "image", "shape": [8, 8, 1], "datatype": "UINT8", "data": [7] * 64}
    url = "/v2/models/synthetic-boostnet/infer"
    ref2 = client.post(url, json={"inputs": [tensor], "parameters": {"thresholds": "0,0,0"}}).json()
    body = {"inputs": [tensor], "parameters": {"thresholds": "never,never,0", "deadline_ms": float(deadline_ms)}}
    v2 = client.post(url, json=body)
    assert v2.status_code == 200, v2.text
    got = v2.json()
    assert got["outputs"] == ref2["outputs"]  # exit 1's label, probabilities, exit, macs
    assert next(o for o in got["outputs"] if o["name"] == "exit")["data"] == [1]
    assert (got["parameters"]["deadline_hits"], ref2["parameters"]["deadline_hits"]) == (1, 0)


def test_generous_deadline_answers_normally(client: TestClient) -> None:
    response = post_raw(client, images.png(), "/v1/classify?deadline_ms=10000")
    assert response.status_code == 200
    assert response.json()["results"][0]["deadline_hit"] is False


def test_multipart_edge_cases(make_client: ClientFactory) -> None:
    with make_client(max_images_per_request=2) as client:
        files = [("file", (f"{i}.png", images.png(seed=i), "image/png")) for i in range(5)]
        assert_error(client.post("/v1/classify", files=files), 413, "too_many_images", "limit is 2")
        no_file = client.post("/v1/classify", data={"other": "x"}, files={"notfile": ("a.png", b"x", "image/png")})
        assert_error(
            no_file,
            422,
            "validation_error",
            "unknown multipart field 'notfile'; accepted: file (put knobs in the query)",
        )
        empty = client.post("/v1/classify", files={"file": ("a.png", b"", "image/png")})
        assert_error(empty, 400, "invalid_image", "empty image")
        broken = client.post(
            "/v1/classify",
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            headers={"content-type": "multipart/form-data"},
        )
        assert broken.status_code in (400, 422), broken.text
        assert broken.json()["error"]["type"] in ("validation_error", "invalid_image")


def test_a_deadline_hit_reaches_the_answer_in_v1_and_v2(make_client: ClientFactory) -> None:
    """Stage 2 is held until the test releases it: the images answer at their 1 s deadline from exit 1,
    flagged deadline_hit. Only stage 1 has to finish within the second, so load cannot flip it."""
    with make_client(stage_execution="thread") as client:
        engine = client.app.state.service.scheduler.engine  # type: ignore[attr-defined]
        real = engine.run_stage_batch
        gate = [threading.Event()]  # one gate per request: releasing one never holds the next

        def held_after_the_first(k: int, state: Any) -> Any:
            if k > 0:
                gate[0].wait(timeout=30)
            return real(k, state)

        engine.run_stage_batch = held_after_the_first
        v1 = post_raw(client, images.png(), "/v1/classify?thresholds=never,never,0&deadline_ms=1000")
        assert v1.status_code == 200, v1.text
        (result,) = v1.json()["results"]
        assert (result["exit"], result["deadline_hit"]) == (1, True)
        first, gate[0] = gate[0], threading.Event()
        first.set()  # the abandoned stage-2 batch finishes and frees the worker
        body = {
            "inputs": [{"name": "image", "shape": [8, 8, 1], "datatype": "UINT8", "data": [7] * 64}],
            "parameters": {"thresholds": "never,never,0", "deadline_ms": 1000},
        }
        v2 = client.post("/v2/models/synthetic-boostnet/infer", json=body)
        gate[0].set()
        assert v2.status_code == 200, v2.text
        assert v2.json()["parameters"]["deadline_hits"] == 1
        assert next(o for o in v2.json()["outputs"] if o["name"] == "exit")["data"] == [1]


@contextlib.contextmanager
def queue_held_full(client: TestClient) -> Iterator[Any]:
    """max_queue=1 and one admitted image whose stage is held: every other request is over capacity.

    Yields the service; on exit the held stage is released and the admitted request must get 200.
    """
    service = client.app.state.service  # type: ignore[attr-defined]
    engine = service.scheduler.engine
    real_stage = engine.run_stage_batch
    gate = threading.Event()

    def held(k: int, state: Any) -> Any:
        gate.wait(timeout=30)
        return real_stage(k, state)

    engine.run_stage_batch = held
    first: list[Any] = []
    sender = threading.Thread(target=lambda: first.append(post_raw(client, images.png(seed=1))))
    sender.start()
    try:
        for _ in range(3000):  # until the first image is admitted (bounded: 30 s)
            if service.scheduler.pending == 1:
                break
            time.sleep(0.01)
        assert service.scheduler.pending == 1
        yield service
    finally:
        gate.set()
        sender.join(timeout=30)
        engine.run_stage_batch = real_stage
    assert first[0].status_code == 200


def test_a_request_refused_for_capacity_is_refused_before_it_is_decoded(make_client: ClientFactory) -> None:
    """Item 6 of the hardening issue: every 429 used to pay for the full decode first."""
    with make_client(max_queue=1, stage_execution="thread") as client, queue_held_full(client) as service:
        real_prepare = service.preprocessor.prepare
        decoded: list[int] = []

        async def counting_prepare(images: Any, *limits: Any) -> Any:
            decoded.append(len(images))
            return await real_prepare(images, *limits)

        service.preprocessor.prepare = counting_prepare
        refused = post_raw(client, images.png(seed=2))
        assert_error(refused, 429, "over_capacity", "1 images are queued (limit 1); retry later")
        assert decoded == []  # the admitted request was decoded before the counter; the refused one never


@pytest.mark.parametrize("encoding", ["json", "multipart", "multipart-not-plain", "multipart-fastapi", "v2"])
def test_a_request_refused_for_capacity_is_refused_before_its_body_is_parsed(
    make_client: ClientFactory, encoding: str
) -> None:
    """Item 6: 64 base64 images in JSON were parsed and decoded on the event loop for every 429.

    Multipart three ways: a plain form (the fast path's own parser), a form only Starlette parses
    (the fast path's fallback) and any form through FastAPI (BOOSTSERVE_FAST_PATH=false)."""
    real_json, real_multipart, real_v2 = v1_wire.json_request, v1_wire.multipart_request, v2_codec.parse
    real_plain = v1_wire.plain_form_files
    parsed: list[str] = []

    def counting_plain(*args: Any) -> Any:
        parsed.append("plain form")
        return real_plain(*args)

    def counting_json(*args: Any) -> Any:
        parsed.append("json")
        return real_json(*args)

    async def counting_multipart(*args: Any) -> Any:
        parsed.append("multipart")
        return await real_multipart(*args)

    def counting_v2(*args: Any) -> Any:
        parsed.append("v2")
        return real_v2(*args)

    fast_path = encoding != "multipart-fastapi"
    with make_client(max_queue=1, stage_execution="thread", fast_path=fast_path) as client, queue_held_full(client):
        png = images.png(seed=2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(v1_wire, "json_request", counting_json)
            patch.setattr(v1_wire, "multipart_request", counting_multipart)
            patch.setattr(v1_wire, "plain_form_files", counting_plain)
            patch.setattr(v2_codec, "parse", counting_v2)
            if encoding == "v2":
                tensor = {"name": "image", "shape": [64, 8, 8, 1], "datatype": "UINT8", "data": [7] * 64 * 64}
                refused = client.post("/v2/models/synthetic-boostnet/infer", json={"inputs": [tensor]})
            elif encoding == "json":
                refused = client.post("/v1/classify", json={"images": [base64.b64encode(png).decode()] * 64})
            elif encoding == "multipart-not-plain":  # a field besides `file`: Starlette's to parse
                files = [("file", ("a.png", png, "image/png"))] * 4
                refused = client.post("/v1/classify", data={"note": "x"}, files=files)
            else:
                refused = client.post("/v1/classify", files=[("file", ("a.png", png, "image/png"))] * 4)
        if encoding == "v2":
            assert refused.status_code == 429
            assert refused.json() == {
                "error": "1 images are queued (limit 1); retry later",
                "error_type": "over_capacity",
            }
        else:
            assert_error(refused, 429, "over_capacity", "1 images are queued (limit 1); retry later")
        assert parsed == []
