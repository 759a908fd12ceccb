"""The real Open Inference Protocol client (tritonclient.http) against a real `boostserve serve`.

Why: OIP compatibility is a claim about other people's code. Success paths (health, metadata,
infer with both inputs) and error paths (tritonclient builds its exception from `body["error"]`
as a string, so our v1 envelope would break it) go through the client users actually run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient  # the dev extra installs tritonclient[http]
from tritonclient.utils import InferenceServerException

from tests.fixtures.synthetic_artifact import random_images
from tests.reliability._server import LiveServer

MODEL = "synthetic-boostnet"


@pytest.fixture(scope="module")
def triton(synthetic_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    logs = tmp_path_factory.mktemp("triton-server")
    with LiveServer(synthetic_artifact, logs, extra_args=["--providers", "cpu"]).start() as server:
        client = httpclient.InferenceServerClient(url=server.base_url.removeprefix("http://"))
        try:
            yield client
        finally:
            client.close()


def test_health_and_metadata(triton: object) -> None:
    client = triton
    assert client.is_server_live() and client.is_server_ready()  # type: ignore[attr-defined]
    assert client.is_model_ready(MODEL)  # type: ignore[attr-defined]
    meta = client.get_model_metadata(MODEL)  # type: ignore[attr-defined]
    assert {t["name"] for t in meta["inputs"]} == {"input", "image"}
    assert client.get_server_metadata()["name"] == "boostserve"  # type: ignore[attr-defined]


def test_infer_fp32_and_uint8_inputs_agree(triton: object) -> None:
    client = triton
    x = random_images(3, seed=4)  # (3, 1, 8, 8) float32, the stage graphs' own input
    fp32 = httpclient.InferInput("input", list(x.shape), "FP32")
    fp32.set_data_from_numpy(x, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("label", "exit", "probabilities")]
    result = client.infer(MODEL, [fp32], outputs=outputs, parameters={"max_exit": 2})  # type: ignore[attr-defined]
    labels, exits, probs = (result.as_numpy(n) for n in ("label", "exit", "probabilities"))
    assert labels.shape == (3,) and probs.shape == (3, 4)
    assert (exits <= 2).all() and (exits >= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == labels).all()

    pixels = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    uint8 = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    uint8.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer(MODEL, [uint8], outputs=outputs)  # type: ignore[attr-defined]
    assert result.as_numpy("label").shape == (2,)


@pytest.mark.parametrize(
    ("call", "status", "fragment"),
    [
        ("metadata_of_unknown_model", "404", "nope"),
        ("infer_wrong_shape", "422", "needs"),
        ("infer_unknown_model", "404", "nope"),
    ],
)
def test_errors_reach_the_client_as_messages(triton: object, call: str, status: str, fragment: str) -> None:
    client = triton
    with pytest.raises(InferenceServerException) as info:
        if call == "metadata_of_unknown_model":
            client.get_model_metadata("nope")  # type: ignore[attr-defined]
        else:
            tensor = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32), binary_data=False)
            if call == "infer_wrong_shape":
                tensor._data = [0.0] * 5  # the shape says 64 values; the server must refuse, not crash
            client.infer("nope" if call == "infer_unknown_model" else MODEL, [tensor])  # type: ignore[attr-defined]
    exc = info.value
    assert isinstance(exc.message(), str) and fragment in exc.message(), exc.message()
    assert exc.status() == status
    assert fragment in str(exc)  # formatting the exception must work (it crashed on an object body)
