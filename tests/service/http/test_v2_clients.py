"""Unmodified `tritonclient.http` with its default arguments against a real `boostserve serve`.

Why defaults: `InferInput.set_data_from_numpy(x)` and `InferRequestedOutput(name)` use the binary
tensor data extension unless told otherwise, and a `client.infer(...)` without outputs asks for
every output in binary (`binary_data_output`); that is how Triton users and perf tooling call a
server. tests/service/http/test_tritonclient.py covers the JSON-only (`binary_data=False`) form.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.fixtures.synthetic_artifact import random_images
from tests.reliability._server import LiveServer

MODEL = "synthetic-boostnet"


@pytest.fixture(scope="module")
def server(synthetic_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    logs = tmp_path_factory.mktemp("v2-clients")
    with LiveServer(synthetic_artifact, logs, extra_args=["--providers", "cpu"]).start() as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    try:
        yield client
    finally:
        client.close()


def test_http_defaults_health_and_metadata(http: Any) -> None:
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    meta = http.get_model_metadata(MODEL)
    assert [t["name"] for t in meta["inputs"]] == ["input", "image"]


def test_http_defaults_binary_in_and_out_equal_the_json_twin(http: Any) -> None:
    x = random_images(4, seed=9)  # (4, 1, 8, 8) float32
    default = httpclient.InferInput("input", list(x.shape), "FP32")
    default.set_data_from_numpy(x)  # binary_data=True by default
    assert default._get_binary_data() is not None, "the client's default must be the binary extension"
    binary = http.infer(MODEL, [default], parameters={"max_exit": 2})  # no outputs: all, in binary
    assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * 4 * 4

    twin = httpclient.InferInput("input", list(x.shape), "FP32")
    twin.set_data_from_numpy(x, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "label", "exit")]
    as_json = http.infer(MODEL, [twin], outputs=outputs, parameters={"max_exit": 2})
    for name in ("probabilities", "label", "exit"):
        a, b = binary.as_numpy(name), as_json.as_numpy(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert (binary.as_numpy("exit") <= 2).all()
    assert binary.as_numpy("probabilities").shape == (4, 4)


def test_http_defaults_uint8_and_requested_outputs(http: Any) -> None:
    pixels = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    image = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    result = http.infer(
        MODEL,
        [image],
        outputs=[httpclient.InferRequestedOutput("exit"), httpclient.InferRequestedOutput("label")],
        parameters={"early_exit": False},
    )
    assert result.as_numpy("exit").tolist() == [3, 3, 3]
    assert result.as_numpy("label").shape == (3,)
    assert result.as_numpy("probabilities") is None


def test_http_defaults_errors_are_readable(http: Any) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    tensor = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        http.infer(MODEL, [tensor], parameters={"max_exit": 0})
    assert info.value.status() == "422" and "max_exit" in info.value.message()
    wrong = httpclient.InferInput("input", [1, 8, 8, 1], "FP32")
    wrong.set_data_from_numpy(x.reshape(1, 8, 8, 1))
    with pytest.raises(InferenceServerException) as info:
        http.infer(MODEL, [wrong])
    assert info.value.status() == "422" and "NCHW" in str(info.value)
