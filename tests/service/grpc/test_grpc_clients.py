"""Unmodified `tritonclient.grpc` (defaults: raw_input_contents) against a real `boostserve serve`.

Predictions, metadata, health (the protocol's and the standard gRPC health service), knobs in
request parameters, readable errors with the status codes of the one error table, the message size
limit, and metrics labelled protocol="grpc". Also: the gRPC answer is bit-identical to the REST
binary answer for the same tensor, and `BOOSTSERVE_GRPC_PORT` unset opens no port.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.server import free_port
from tests.fixtures.synthetic_artifact import random_images
from tests.reliability._server import LiveServer, parse_metrics

MODEL = "synthetic-boostnet"


@pytest.fixture(scope="module")
def server(synthetic_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    logs = tmp_path_factory.mktemp("grpc-clients")
    live = LiveServer(
        synthetic_artifact,
        logs,
        extra_args=["--providers", "cpu"],
        grpc_port=free_port(),
        max_body_bytes=4096,
        max_images_per_request=8,
    )
    with live.start():
        yield live


@pytest.fixture(scope="module")
def grpc_url(server: LiveServer) -> str:
    return f"127.0.0.1:{server.settings['grpc_port']}"


@pytest.fixture(scope="module")
def client(grpc_url: str) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(url=grpc_url)
    try:
        yield c
    finally:
        c.close()


def fp32(x: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata(client: Any, grpc_url: str) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata().name == "boostserve"
    meta = client.get_model_metadata(MODEL)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 1, 8, 8]),
        ("image", "UINT8", [-1, 8, 8, 1]),
    ]
    assert [t.name for t in meta.outputs] == ["probabilities", "label", "exit", "macs"]
    assert client.get_model_metadata(MODEL, model_version=meta.versions[0]).name == MODEL
    with grpc.insecure_channel(grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_infer_defaults_and_knobs(client: Any) -> None:
    x = random_images(3, seed=21)  # (3, 1, 8, 8)
    result = client.infer(MODEL, [fp32(x)])  # raw_input_contents, every output
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 4) and (probs.argmax(axis=1) == result.as_numpy("label")).all()
    params = result.get_response().parameters
    assert params["exits_total"].int64_param == 3 and params["early_exit"].bool_param is True
    assert json.loads(params["budget"].string_param) == {"max_accuracy_drop": 0.01, "policy": "optimal"}

    assert client.infer(MODEL, [fp32(x)], parameters={"early_exit": False}).as_numpy("exit").tolist() == [3, 3, 3]
    assert client.infer(MODEL, [fp32(x)], parameters={"max_exit": 1}).as_numpy("exit").tolist() == [1, 1, 1]
    # a float knob travels as double_param, text thresholds as string_param
    drop = client.infer(MODEL, [fp32(x)], parameters={"max_accuracy_drop": 0.2}).get_response().parameters
    assert json.loads(drop["budget"].string_param)["max_accuracy_drop"] == 0.2
    forced = client.infer(MODEL, [fp32(x)], parameters={"thresholds": "never,0,0"})
    assert forced.as_numpy("exit").tolist() == [2, 2, 2]

    pixels = np.zeros((2, 8, 8, 1), np.uint8)
    image = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    picked = client.infer(MODEL, [image], outputs=[grpcclient.InferRequestedOutput("exit")], request_id="r-1")
    assert picked.as_numpy("exit").shape == (2,) and picked.as_numpy("label") is None
    assert picked.get_response().id == "r-1"


def test_grpc_answer_equals_the_rest_binary_answer_bit_for_bit(client: Any, server: LiveServer) -> None:
    x = random_images(4, seed=5)
    via_grpc = client.infer(MODEL, [fp32(x)], parameters={"max_exit": 2})
    http = httpclient.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    try:
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        via_rest = http.infer(MODEL, [tensor], parameters={"max_exit": 2})
    finally:
        http.close()
    for name in ("probabilities", "label", "exit", "macs"):
        a, b = via_grpc.as_numpy(name), via_rest.as_numpy(name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize(
    ("call", "code", "fragment"),
    [
        ("bad_knob", "StatusCode.INVALID_ARGUMENT", "max_exit must be >= 1"),
        ("unknown_knob", "StatusCode.INVALID_ARGUMENT", "unknown parameters key 'max_exits'"),
        ("wrong_shape", "StatusCode.INVALID_ARGUMENT", "NCHW"),
        ("unknown_model", "StatusCode.NOT_FOUND", "nope"),
        ("too_many_images", "StatusCode.RESOURCE_EXHAUSTED", "limit is 8"),
        ("over_message_limit", "StatusCode.RESOURCE_EXHAUSTED", "4096"),
    ],
)
def test_errors_are_readable_with_the_tables_codes(client: Any, call: str, code: str, fragment: str) -> None:
    x = random_images(1, seed=1)
    with pytest.raises(InferenceServerException) as info:
        if call == "bad_knob":
            client.infer(MODEL, [fp32(x)], parameters={"max_exit": 0})
        elif call == "unknown_knob":
            client.infer(MODEL, [fp32(x)], parameters={"max_exits": 1})
        elif call == "wrong_shape":
            client.infer(MODEL, [fp32(x.reshape(1, 8, 8, 1))])
        elif call == "unknown_model":
            client.get_model_metadata("nope")
        elif call == "too_many_images":
            client.infer(MODEL, [fp32(random_images(9, seed=2))])  # 2304 bytes: under the message limit
        else:
            client.infer(MODEL, [fp32(random_images(20, seed=2))])  # 5120 raw bytes > max_body_bytes
    assert info.value.status() == code, info.value
    assert fragment in info.value.message(), info.value.message()


def test_metrics_are_labelled_by_protocol(client: Any, server: LiveServer) -> None:
    client.infer(MODEL, [fp32(random_images(1, seed=3))])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [fp32(random_images(1, seed=3))], parameters={"max_exit": 0})
    series = parse_metrics(httpx.get(server.base_url + "/metrics", timeout=10).text)["boostserve_requests_total"]
    grpc_series = {
        (labels["status_class"], labels["method"]): value
        for labels, value in series
        if labels["protocol"] == "grpc" and labels["route"] == "/inference.GRPCInferenceService/ModelInfer"
    }
    assert grpc_series.get(("2xx", "POST"), 0) >= 1 and grpc_series.get(("4xx", "POST"), 0) >= 1
    assert all(labels["protocol"] in ("http", "grpc") for labels, _ in series)


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its socket inodes matched against /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_grpc_port_is_opened_only_with_the_setting(server: LiveServer, tmp_path: Path) -> None:
    assert listening_ports(server.pid) == {server.port, server.settings["grpc_port"]}
    with LiveServer(server.artifacts, tmp_path, extra_args=["--providers", "cpu"]).start() as plain:
        assert listening_ports(plain.pid) == {plain.port}
        assert "gRPC" not in plain.logs()
