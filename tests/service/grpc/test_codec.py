"""gRPC framing: parameters, raw vs typed contents, the deadline as deadline_ms, and the servicer's
error path (code from the one table, error_type in trailing metadata) without a network."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.core.classify import ClassifyRequest
from service.core.errors import OverCapacityError, ValidationFailedError
from service.grpc import codec
from service.grpc.proto import grpc_predict_v2_pb2 as pb
from service.grpc.server import InferenceServicer

MODEL = SimpleNamespace(name="m", version="v1", num_stages=3, classes=["a", "b"])


def request_with(x: np.ndarray, raw: bool, datatype: str = "FP32", name: str = "input") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.tobytes())
    elif datatype == "UINT8":
        tensor.contents.uint_contents.extend(x.reshape(-1).tolist())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request


@pytest.mark.parametrize(("datatype", "name"), [("FP32", "input"), ("UINT8", "image")])
def test_raw_and_typed_contents_give_the_same_tensor(datatype: str, name: str) -> None:
    rng = np.random.default_rng(0)
    if datatype == "FP32":
        x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    else:
        x = rng.integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
    raw = codec.input_tensor(request_with(x, raw=True, datatype=datatype, name=name))
    typed = codec.input_tensor(request_with(x, raw=False, datatype=datatype, name=name))
    assert raw.layout == typed.layout and raw.array.tobytes() == typed.array.tobytes() == x.tobytes()


def test_framing_errors() -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    both = request_with(x, raw=True)
    both.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    with pytest.raises(ValidationFailedError, match="not both"):
        codec.input_tensor(both)
    two = request_with(x, raw=True)
    two.raw_input_contents.append(b"")
    with pytest.raises(ValidationFailedError, match="2 entries for 1 inputs"):
        codec.input_tensor(two)
    short = request_with(x, raw=True)
    short.raw_input_contents[0] = b"\x00" * 10
    with pytest.raises(ValidationFailedError, match="needs 256 bytes"):
        codec.input_tensor(short)
    with pytest.raises(ValidationFailedError, match="no input"):
        codec.input_tensor(pb.ModelInferRequest(model_name="m"))


def test_parameter_values_keep_their_type() -> None:
    request = pb.ModelInferRequest()
    request.parameters["a"].bool_param = False
    request.parameters["b"].int64_param = 3
    request.parameters["c"].double_param = 0.25
    request.parameters["d"].string_param = "0.9,never,0"
    request.parameters["e"].uint64_param = 7
    request.parameters["f"].CopyFrom(pb.InferParameter())
    assert codec.parameters_of(request.parameters) == {
        "a": False,
        "b": 3,
        "c": 0.25,
        "d": "0.9,never,0",
        "e": 7,
        "f": None,
    }


@pytest.mark.parametrize(
    ("knobs", "remaining", "expected"),
    [
        ({}, None, None),  # no gRPC deadline: nothing added
        ({}, 0.25, 250.0),
        ({"deadline_ms": 100}, 0.25, 100.0),  # the tighter wins
        ({"deadline_ms": 900}, 0.25, 250.0),
        ({"deadline_ms": "soon"}, 0.25, "soon"),  # left for the knob parser to refuse
        ({}, 3600.0, None),  # beyond the knob's range: request_timeout_s bounds it
        ({}, -1.0, 0.001),  # already passed: the smallest deadline (answered from exit 1)
    ],
)
def test_grpc_deadline_becomes_deadline_ms(knobs: dict[str, Any], remaining: float | None, expected: Any) -> None:
    got = codec.knobs_with_deadline({**knobs, "priority": 1}, remaining)
    assert "priority" not in got  # a reserved name, not a knob
    assert got.get("deadline_ms") == expected


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[Any, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: Any, message: str) -> None:
        self.aborted = (code, message)
        raise RuntimeError("aborted")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.errors: list[str] = []

    def observe_request(self, route: str, method: str, status: int, seconds: float, protocol: str = "http") -> None:
        self.calls.append((route, status, protocol))

    def count_error(self, error_type: str) -> None:
        self.errors.append(error_type)


def test_servicer_passes_the_deadline_to_the_core_and_maps_its_error() -> None:
    seen: list[ClassifyRequest] = []

    async def classify(request: ClassifyRequest, arrived: float | None = None) -> Any:
        assert arrived is None  # gRPC has no HTTP head to stamp: the core counts from its own start
        seen.append(request)
        raise OverCapacityError("queue full", retry_after=2.5)

    service = SimpleNamespace(manifest=MODEL, classify=classify)
    observer = Recorder()
    servicer = InferenceServicer(service, observer)  # type: ignore[arg-type]
    context = FakeContext(remaining=0.5)
    request = request_with(np.zeros((1, 1, 8, 8), np.float32), raw=True)
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(servicer.ModelInfer(request, context))  # type: ignore[arg-type]
    assert seen[0].options == {"deadline_ms": 500.0} and seen[0].where == "parameters key"
    assert context.aborted is not None and context.aborted[0].name == "RESOURCE_EXHAUSTED"
    assert context.aborted[1] == "queue full"
    assert dict(context.trailing) == {"boostserve-error-type": "over_capacity", "retry-after": "3"}
    assert observer.errors == ["over_capacity"]
    assert observer.calls == [("/inference.GRPCInferenceService/ModelInfer", 429, "grpc")]


def test_unknown_model_is_not_found_before_any_work() -> None:
    service = SimpleNamespace(manifest=MODEL)
    servicer = InferenceServicer(service, None)  # type: ignore[arg-type]
    context = FakeContext(None)
    with pytest.raises(RuntimeError):
        asyncio.run(servicer.ModelMetadata(pb.ModelMetadataRequest(name="m", version="v2"), context))  # type: ignore[arg-type]
    assert context.aborted is not None and context.aborted[0].name == "NOT_FOUND" and "v2" in context.aborted[1]
