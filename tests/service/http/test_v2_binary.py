"""OIP v2 binary tensor data extension (REST), both directions, framing errors and the shared limits.

The request bodies are built here by hand from the extension's text (JSON header, then raw
little-endian bytes; `Inference-Header-Content-Length`), so these tests do not lean on a client's
reading of it; tests/service/http/test_v2_clients.py runs tritonclient with its defaults.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.errors import ValidationFailedError
from service.core.tensors import split_bytes_elements
from tests.fixtures.synthetic_artifact import random_images
from tests.service.http.conftest import assert_error

MODEL = "synthetic-boostnet"
URL = f"/v2/models/{MODEL}/infer"


def binary_body(header: dict[str, Any], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}


def fp32_binary(x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    return binary_body({"inputs": [tensor], **extra}, raw)


def split_response(response: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response's JSON header and its tensors (binary ones decoded from the bytes after it)."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    body = response.content
    if length is None:
        assert response.headers["content-type"] == "application/json"
        header, rest = json.loads(body), b""
    else:
        assert response.headers["content-type"] == "application/octet-stream"
        header, rest = json.loads(body[: int(length)]), body[int(length) :]
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    out: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in header["outputs"]:
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[tensor["name"]] = np.asarray(tensor["data"], dtype=dtypes[tensor["datatype"]]).reshape(tensor["shape"])
        else:
            assert "data" not in tensor
            chunk = rest[offset : offset + size]
            out[tensor["name"]] = np.frombuffer(chunk, dtype=dtypes[tensor["datatype"]]).reshape(tensor["shape"])
            offset += size
    assert offset == len(rest), "every byte after the header belongs to an output"
    return header, out


def test_server_metadata_advertises_the_extension(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("binary_output", [False, True])
def test_binary_request_and_its_json_twin_agree_bit_for_bit(client: TestClient, binary_output: bool) -> None:
    x = random_images(5, seed=11)  # (5, 1, 8, 8) float32
    params = {"binary_data_output": binary_output, "max_exit": 2}
    content, headers = fp32_binary(x, parameters=params)
    _, binary = split_response(client.post(URL, content=content, headers=headers))
    twin = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    _, as_json = split_response(client.post(URL, json={**twin, "parameters": {"max_exit": 2}}))
    assert list(binary) == list(as_json) == ["probabilities", "label", "exit", "macs"]
    for name in binary:
        assert binary[name].dtype == as_json[name].dtype and binary[name].shape == as_json[name].shape
        assert binary[name].tobytes() == as_json[name].tobytes(), name


def test_uint8_binary_input_and_per_output_choice(client: TestClient) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    raw = pixels.tobytes()
    tensor = {"name": "image", "shape": [2, 8, 8, 1], "datatype": "UINT8", "parameters": {"binary_data_size": len(raw)}}
    outputs = [{"name": "exit", "parameters": {"binary_data": True}}, {"name": "label"}]
    content, headers = binary_body({"inputs": [tensor], "outputs": outputs, "parameters": {"thresholds": "2,2,0"}}, raw)
    response = client.post(URL, content=content, headers=headers)
    header, out = split_response(response)
    assert [o["name"] for o in header["outputs"]] == ["exit", "label"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}  # 2 x INT64
    assert "data" in header["outputs"][1]  # not asked for binary: JSON data in the header
    assert out["exit"].tolist() == [3, 3]
    twin = {"inputs": [{"name": "image", "shape": [2, 8, 8, 1], "datatype": "UINT8", "data": pixels.tolist()}]}
    json_answer = client.post(URL, json={**twin, "parameters": {"thresholds": "2,2,0"}}).json()
    assert out["label"].tolist() == next(o["data"] for o in json_answer["outputs"] if o["name"] == "label")


def test_json_request_can_ask_for_binary_outputs(client: TestClient) -> None:
    x = random_images(1, seed=2)
    body = {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    response = client.post(URL, json=body)
    header, out = split_response(response)
    assert int(response.headers["inference-header-content-length"]) == len(json.dumps(header, separators=(",", ":")))
    assert out["probabilities"].shape == (1, 4)
    np.testing.assert_allclose(out["probabilities"].sum(), 1.0, rtol=1e-5)


def _fp32_tensor(size: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": size}}


RAW = np.zeros(64, "<f4").tobytes()


@pytest.mark.parametrize(
    ("header", "raw", "length", "contains"),
    [
        ({"inputs": [_fp32_tensor(256)]}, RAW, "999999", "at most the body"),
        ({"inputs": [_fp32_tensor(256)]}, RAW, "12x", "whole number"),
        ({"inputs": [_fp32_tensor(255)]}, RAW, None, "belong to no input"),
        ({"inputs": [_fp32_tensor(257)]}, RAW, None, "runs past"),
        ({"inputs": [_fp32_tensor(True)]}, RAW, None, "binary_data_size must be"),
        ({"inputs": [_fp32_tensor(-1)]}, RAW, None, "binary_data_size must be"),
        ({"inputs": [{**_fp32_tensor(256), "data": [0.0] * 64}]}, RAW, None, "both"),
        ({"inputs": [{**_fp32_tensor(128)}]}, RAW[:128], None, "needs 256 bytes"),
        ({"inputs": [{**_fp32_tensor(256), "datatype": "FP64"}]}, RAW, None, "datatype"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}, b"", None, "no `data`"),
        (
            {"inputs": [_fp32_tensor(256)], "parameters": {"binary_data_output": "yes"}},
            RAW,
            None,
            "binary_data_output must be true or false",
        ),
        (
            {"inputs": [_fp32_tensor(256)], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]},
            RAW,
            None,
            "binary_data must be true or false",
        ),
        (
            {"inputs": [_fp32_tensor(256)], "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
            RAW,
            None,
            "classification extension",
        ),
        ({"inputs": [_fp32_tensor(256)]}, np.full(64, np.nan, "<f4").tobytes(), None, "NaN"),
        ({"inputs": [_fp32_tensor(256)], "parameters": {"max_exit": 0}}, RAW, None, "max_exit"),
    ],
)
def test_binary_framing_errors_are_422(
    client: TestClient, header: dict[str, Any], raw: bytes, length: str | None, contains: str
) -> None:
    content, headers = binary_body(header, raw)
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    assert_error(client.post(URL, content=content, headers=headers), 422, "validation_error", contains)


def test_json_only_request_with_octet_stream_and_compressed_bodies_are_415(client: TestClient) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]})
    response = client.post(URL, content=body, headers={"content-type": "application/octet-stream"})
    assert_error(response, 415, "unsupported_media_type", "Inference-Header-Content-Length")
    content, headers = fp32_binary(np.zeros((1, 1, 8, 8), np.float32))
    response = client.post(URL, content=content, headers={**headers, "content-encoding": "gzip"})
    assert_error(response, 415, "unsupported_media_type", "gzip")


def test_binary_bodies_meet_the_same_limits(make_client: Any) -> None:
    with make_client(max_body_bytes=2048, max_images_per_request=2, max_image_pixels=100) as c:
        content, headers = fp32_binary(np.zeros((3, 1, 8, 8), np.float32))  # 768 raw bytes: under the body limit
        assert_error(c.post(URL, content=content, headers=headers), 413, "too_many_images", "limit is 2")
        content, headers = fp32_binary(np.zeros((9, 1, 8, 8), np.float32))  # 2304 raw bytes
        assert_error(c.post(URL, content=content, headers=headers), 413, "payload_too_large", "2048")
        big = np.zeros((1, 16, 16, 1), np.uint8)  # 256 pixels > 100
        tensor = {
            "name": "image",
            "shape": [1, 16, 16, 1],
            "datatype": "UINT8",
            "parameters": {"binary_data_size": 256},
        }
        content, headers = binary_body({"inputs": [tensor]}, big.tobytes())
        assert_error(c.post(URL, content=content, headers=headers), 413, "payload_too_large", "pixels")


def test_bytes_elements_have_four_byte_length_prefixes() -> None:
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in (b"ab", b"", b"\x00\xff\x10"))
    assert split_bytes_elements(raw) == [b"ab", b"", b"\x00\xff\x10"]
    with pytest.raises(ValidationFailedError, match="4-byte length"):
        split_bytes_elements(raw + b"\x01\x00")
    with pytest.raises(ValidationFailedError, match="runs past"):
        split_bytes_elements(b"\x05\x00\x00\x00abc")
