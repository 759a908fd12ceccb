"""Open Inference Protocol v2 JSON tensors <-> the core's inputs and answers.

Inputs (the model metadata publishes both; a request sends exactly one):
  - `input`  FP32  [-1, C, H, W]  already preprocessed (normalised) NCHW, as the stage graphs take it
  - `image`  UINT8 [-1, H, W, C]  raw pixels (also [H, W, C]); converted and normalised by the core
`data` may be flat (row-major) or nested, as the spec allows.
Outputs: `probabilities` FP32 [B, classes], `label` INT64 [B], `exit` INT64 [B] (1-based stage),
`macs` INT64 [B]; `outputs` in the request selects them (each name once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.core.classify import Classified
from service.core.errors import UnsupportedMediaTypeError, ValidationFailedError
from service.core.preprocess import PixelTensor
from service.http.v2.schemas import InferenceRequest, InferOutput

FP32_INPUT = "input"
UINT8_INPUT = "image"
INPUT_DATATYPES = {FP32_INPUT: "FP32", UINT8_INPUT: "UINT8"}
OUTPUTS = ("probabilities", "label", "exit", "macs")
#: Request parameters the protocol and its common clients (Triton, MLServer) define; accepted and
#: ignored here, so unmodified clients that send them are not refused.
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
BINARY_UNSUPPORTED = "the binary data extension is not supported; send JSON `data`"


def knob_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request `parameters` that are knobs (every other name is the core's to refuse)."""
    return {k: v for k, v in (parameters or {}).items() if k not in OIP_RESERVED_PARAMETERS}


def requested_outputs(request: InferenceRequest) -> list[str]:
    """Output names in request order; unknown or repeated names are a 422."""
    if not request.outputs:
        return list(OUTPUTS)
    wanted = [o.name for o in request.outputs]
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise ValidationFailedError(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}")
    if len(set(wanted)) != len(wanted):
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        raise ValidationFailedError(f"output(s) {repeated} requested more than once")
    return wanted


def input_tensor(request: InferenceRequest) -> PixelTensor:
    """The one input tensor, validated, as a core pixel tensor."""
    if len(request.inputs) != 1:
        raise ValidationFailedError(
            f"send exactly one input ({FP32_INPUT!r} FP32 NCHW or {UINT8_INPUT!r} UINT8 HWC), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name not in INPUT_DATATYPES:
        raise ValidationFailedError(
            f"unknown input {tensor.name!r}: use {FP32_INPUT!r} (FP32 NCHW) or {UINT8_INPUT!r} (UINT8 HWC)"
        )
    expected = INPUT_DATATYPES[tensor.name]
    if tensor.datatype != expected:
        raise ValidationFailedError(f"input {tensor.name!r} must have datatype {expected}, got {tensor.datatype!r}")
    if tensor.parameters and tensor.parameters.get("binary_data_size") is not None:
        raise UnsupportedMediaTypeError(BINARY_UNSUPPORTED)
    shape = tensor.shape
    if any(d < 0 for d in shape) or len(shape) not in (3, 4):
        raise ValidationFailedError(f"input {tensor.name!r} has an invalid shape {shape}")
    count = math.prod(shape)
    try:
        raw = np.asarray(tensor.data, dtype=np.int64 if expected == "UINT8" else np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        # OverflowError: UINT8 data holding integers beyond int64 or +-inf (JSON 1e400) -> 422, not 500.
        raise ValidationFailedError(
            f"input {tensor.name!r}: data must be numbers, flat or nested to the shape: {exc}"
        ) from exc
    if raw.size != count:
        raise ValidationFailedError(f"input {tensor.name!r}: shape {shape} needs {count} values, data has {raw.size}")
    if raw.ndim != 1 and list(raw.shape) != shape:
        raise ValidationFailedError(f"input {tensor.name!r}: nested data has shape {list(raw.shape)}, declared {shape}")
    array = raw.reshape(shape)
    if expected == "UINT8":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValidationFailedError(f"input {tensor.name!r}: UINT8 values must be in 0..255")
        return PixelTensor(array.astype(np.uint8), "uint8_hwc")
    if not np.isfinite(array).all() or (array.size and np.abs(array).max() > np.finfo(np.float32).max):
        raise ValidationFailedError(f"input {tensor.name!r} contains NaN or Inf (or values beyond float32)")
    return PixelTensor(array.astype(np.float32), "float_chw")


def output_tensors(answers: list[Classified], classes: int, wanted: list[str]) -> list[InferOutput]:
    n = len(answers)
    makers = {
        "probabilities": lambda: InferOutput(
            name="probabilities",
            shape=[n, classes],
            datatype="FP32",
            data=np.stack([a.probabilities for a in answers]).reshape(-1).tolist() if n else [],
        ),
        "label": lambda: InferOutput(name="label", shape=[n], datatype="INT64", data=[a.label for a in answers]),
        "exit": lambda: InferOutput(name="exit", shape=[n], datatype="INT64", data=[a.exit for a in answers]),
        "macs": lambda: InferOutput(name="macs", shape=[n], datatype="INT64", data=[a.macs for a in answers]),
    }
    return [makers[name]() for name in wanted]
