"""The Open Inference Protocol v2 tensor model, shared by its REST and gRPC adapters.

Why in the core: OIP v2 defines one data model (tensors with a name, a datatype and a shape;
request and response `parameters`) and two wire formats for it (REST JSON with the binary tensor
data extension, gRPC protobuf with `raw_input_contents`). The rules of the model (which inputs we
take, their datatypes, shape and length checks, the outputs and their datatypes, the parameters the
protocol reserves) are written once here; `service.http.v2.codec` and `service.grpc.codec` only
frame bytes. Nothing here knows about a transport.

Inputs (the model metadata publishes both; a request sends exactly one):
  - `input`  FP32  [-1, C, H, W]  already preprocessed (normalised) NCHW, as the stage graphs take it
  - `image`  UINT8 [-1, H, W, C]  raw pixels (also [H, W, C]); converted and normalised by the core
Outputs: `probabilities` FP32 [B, classes], `label` INT64 [B], `exit` INT64 [B] (1-based stage),
`macs` INT64 [B]. Raw tensor bytes are little-endian and row-major, as the protocol fixes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.artifact import Manifest
from service.core.classify import Classified, ClassifyRequest, ClassifyService
from service.core.errors import ValidationFailedError
from service.core.preprocess import PixelTensor

FP32_INPUT = "input"
UINT8_INPUT = "image"
INPUT_DATATYPES = {FP32_INPUT: "FP32", UINT8_INPUT: "UINT8"}
OUTPUT_DATATYPES = {"probabilities": "FP32", "label": "INT64", "exit": "INT64", "macs": "INT64"}
OUTPUTS = tuple(OUTPUT_DATATYPES)
#: Wire dtypes: OIP raw tensor data is little-endian whatever the host.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8")}
#: Request parameters the protocol and its common clients (Triton, MLServer) define; accepted and
#: ignored here (binary_data_output is read by the REST codec), so unmodified clients that send
#: them are not refused.
OIP_RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "content_type",
    }
)
#: Triton extensions a requested output may ask for that this server does not implement: refused
#: with a message instead of silently answering something else.
UNSUPPORTED_OUTPUT_PARAMETERS = {
    "classification": "the classification extension is not supported; request 'label' and 'probabilities'",
    "shared_memory_region": "the shared-memory extension is not supported; send tensor data in the request",
}
#: Where the knobs live, for error messages (the same words in REST and gRPC).
PARAMETERS = "parameters key"
INPUT_HINT = "send exactly one of: input (FP32 NCHW, preprocessed) or image (UINT8 HWC raw pixels)"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model metadata (-1 = any batch size)."""

    name: str
    datatype: str
    shape: list[int]


def input_specs(manifest: Manifest) -> list[TensorSpec]:
    p = manifest.preprocessing
    return [
        TensorSpec(FP32_INPUT, "FP32", [-1, p.channels, p.height, p.width]),
        TensorSpec(UINT8_INPUT, "UINT8", [-1, p.height, p.width, p.channels]),
    ]


def output_specs(manifest: Manifest) -> list[TensorSpec]:
    classes = len(manifest.classes)
    return [TensorSpec(n, dt, [-1, classes] if n == "probabilities" else [-1]) for n, dt in OUTPUT_DATATYPES.items()]


def model_parameters(manifest: Manifest) -> dict[str, Any]:
    """The model metadata's parameters (scalars only, as the protocol allows)."""
    return {
        "exits_total": manifest.num_stages,
        "full_macs": manifest.full_macs,
        "classes": ",".join(manifest.classes),
        "inputs": INPUT_HINT,
    }


def knob_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request `parameters` that are knobs (every other name is the core's to refuse)."""
    return {k: v for k, v in (parameters or {}).items() if k not in OIP_RESERVED_PARAMETERS}


def requested_outputs(wanted: list[str] | None) -> list[str]:
    """Output names in request order (all when none are named); unknown or repeated names are a 422."""
    if not wanted:
        return list(OUTPUTS)
    unknown = [n for n in wanted if n not in OUTPUT_DATATYPES]
    if unknown:
        raise ValidationFailedError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}")
    if len(set(wanted)) != len(wanted):
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        raise ValidationFailedError(f"output(s) {repeated} requested more than once")
    return wanted


def check_output_parameters(name: str, parameters: Mapping[str, Any] | None) -> None:
    for key, message in UNSUPPORTED_OUTPUT_PARAMETERS.items():
        if parameters and key in parameters:
            raise ValidationFailedError(f"output {name!r}: {message}")


def check_input(name: str, datatype: str, shape: list[int], count: int) -> str:
    """The input's name, datatype and shape rank are ours; returns its datatype."""
    if count != 1:
        raise ValidationFailedError(
            f"send exactly one input ({FP32_INPUT!r} FP32 NCHW or {UINT8_INPUT!r} UINT8 HWC), got {count}"
        )
    if name not in INPUT_DATATYPES:
        raise ValidationFailedError(
            f"unknown input {name!r}: use {FP32_INPUT!r} (FP32 NCHW) or {UINT8_INPUT!r} (UINT8 HWC)"
        )
    expected = INPUT_DATATYPES[name]
    if datatype != expected:
        raise ValidationFailedError(f"input {name!r} must have datatype {expected}, got {datatype!r}")
    if any(d < 0 for d in shape) or len(shape) not in (3, 4):
        raise ValidationFailedError(f"input {name!r} has an invalid shape {shape}")
    return expected


def _pixels(name: str, datatype: str, array: np.ndarray) -> PixelTensor:
    """A checked array of the declared shape -> the core's pixel tensor."""
    if datatype == "UINT8":
        return PixelTensor(np.ascontiguousarray(array, dtype=np.uint8), "uint8_hwc")
    if not np.isfinite(array).all() or (array.size and np.abs(array).max() > np.finfo(np.float32).max):
        raise ValidationFailedError(f"input {name!r} contains NaN or Inf (or values beyond float32)")
    return PixelTensor(array.astype(np.float32), "float_chw")


def tensor_from_values(name: str, datatype: str, shape: list[int], data: Any, count: int = 1) -> PixelTensor:
    """Tensor values as numbers (REST JSON `data`, flat or nested; gRPC `InferTensorContents`)."""
    expected = check_input(name, datatype, shape, count)
    n = math.prod(shape)
    try:
        raw = np.asarray(data, dtype=np.int64 if expected == "UINT8" else np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        # OverflowError: UINT8 data holding integers beyond int64 or +-inf (JSON 1e400) -> 422, not 500.
        raise ValidationFailedError(
            f"input {name!r}: data must be numbers, flat or nested to the shape: {exc}"
        ) from exc
    if raw.size != n:
        raise ValidationFailedError(f"input {name!r}: shape {shape} needs {n} values, data has {raw.size}")
    if raw.ndim != 1 and list(raw.shape) != shape:
        raise ValidationFailedError(f"input {name!r}: nested data has shape {list(raw.shape)}, declared {shape}")
    array = raw.reshape(shape)
    if expected == "UINT8" and array.size and (array.min() < 0 or array.max() > 255):
        raise ValidationFailedError(f"input {name!r}: UINT8 values must be in 0..255")
    return _pixels(name, expected, array)


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview, count: int = 1) -> PixelTensor:
    """Tensor values as raw little-endian bytes (REST binary extension, gRPC `raw_input_contents`)."""
    expected = check_input(name, datatype, shape, count)
    dtype = WIRE_DTYPES[expected]
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise ValidationFailedError(
            f"input {name!r}: shape {shape} of {expected} needs {needed} bytes of raw data, got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)  # read-only view; _pixels copies
    return _pixels(name, expected, array)


def split_bytes_elements(raw: bytes | memoryview) -> list[bytes]:
    """A raw BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    view = memoryview(raw)
    out: list[bytes] = []
    i = 0
    while i < len(view):
        if i + 4 > len(view):
            raise ValidationFailedError("BYTES tensor data ends inside an element's 4-byte length")
        size = int.from_bytes(view[i : i + 4], "little")
        if i + 4 + size > len(view):
            raise ValidationFailedError(f"BYTES tensor element of {size} bytes runs past the data")
        out.append(bytes(view[i + 4 : i + 4 + size]))
        i += 4 + size
    return out


def output_arrays(answers: list[Classified], classes: int, wanted: list[str]) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, array in the wire dtype) per requested output, in request order."""
    n = len(answers)
    arrays: dict[str, Any] = {
        "probabilities": lambda: (
            np.stack([a.probabilities for a in answers]).astype(WIRE_DTYPES["FP32"], copy=False)
            if n
            else np.zeros((0, classes), WIRE_DTYPES["FP32"])
        ),  # (B, classes)
        "label": lambda: np.fromiter((a.label for a in answers), WIRE_DTYPES["INT64"], n),  # (B,)
        "exit": lambda: np.fromiter((a.exit for a in answers), WIRE_DTYPES["INT64"], n),  # (B,)
        "macs": lambda: np.fromiter((a.macs for a in answers), WIRE_DTYPES["INT64"], n),  # (B,)
    }
    return [(name, OUTPUT_DATATYPES[name], arrays[name]()) for name in wanted]


@dataclass(frozen=True)
class InferAnswer:
    """One OIP inference, ready for either wire format."""

    outputs: list[tuple[str, str, np.ndarray]]  # (name, datatype, array) in request order
    parameters: dict[str, Any]  # response parameters: scalars only, as the protocol allows


async def infer(
    service: ClassifyService,
    tensor: PixelTensor,
    knobs: Mapping[str, Any],
    wanted: list[str],
    started: float,
    arrived: float | None = None,
) -> InferAnswer:
    """The OIP inference flow, once for REST and gRPC: the knobs and the tensor -> the classify core
    -> the outputs and the response parameters. `started` is the adapter's `time.perf_counter()` at
    receipt (latency_ms counts parsing too); `arrived` as for `ClassifyService.classify`."""
    result = await service.classify(ClassifyRequest(tensor, knobs, PARAMETERS), arrived=arrived)
    answers, resolved = result.answers, result.budget
    info = service.budget_info(resolved)
    parameters = {
        "exits_total": service.manifest.num_stages,
        "early_exit": resolved.early_exit,
        "deadline_hits": sum(1 for a in answers if a.deadline_hit),
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "budget": json.dumps(info["budget"], separators=(",", ":")),
        "thresholds": json.dumps(info["thresholds"], separators=(",", ":")),
        "degraded": info["degraded"],
    }
    if info["effective_budget"] is not None:  # scalars only: absent when the thresholds are the budget's own
        parameters["effective_budget"] = json.dumps(info["effective_budget"], separators=(",", ":"))
    return InferAnswer(output_arrays(answers, len(service.manifest.classes), wanted), parameters)
