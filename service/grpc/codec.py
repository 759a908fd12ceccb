"""Protobuf messages of `inference.GRPCInferenceService` <-> the protocol-neutral tensor model.

Inputs come as `raw_input_contents` (one bytes entry per input, in input order; what
tritonclient.grpc sends by default) or as typed `InferTensorContents` (`fp32_contents` for FP32,
`uint_contents` for UINT8), never both. Outputs always go back as `raw_output_contents` (little-endian,
row-major), as Triton answers and its clients read first. Request and tensor `parameters` are
`InferParameter` oneofs, turned into the same JSON-like values the REST adapter sees, so the knobs
are parsed by the same table with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core import tensors
from service.core.errors import ValidationFailedError
from service.core.preprocess import PixelTensor
from service.grpc.proto import grpc_predict_v2_pb2 as pb

#: The knob value range of deadline_ms (ms); a longer gRPC deadline leaves the request to the
#: server's own request_timeout_s.
MAX_DEADLINE_MS = 600_000.0


def parameter_value(parameter: pb.InferParameter) -> Any:
    """One InferParameter as a plain value (bool, int, str or float); unset is None."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters_of(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def set_parameter(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def knobs_with_deadline(parameters: Mapping[str, Any], time_remaining: float | None) -> dict[str, Any]:
    """The request's knobs, with the gRPC deadline honoured as `deadline_ms` (anytime answers).

    The tighter of the two wins when the request also names `deadline_ms`; a value the knob parser
    will refuse is left for it to refuse. A deadline beyond the knob's range adds nothing (the
    server's request_timeout_s bounds every request anyway).
    """
    knobs = tensors.knob_parameters(parameters)
    if time_remaining is None:
        return knobs
    remaining_ms = max(time_remaining * 1000.0, 0.001)
    if remaining_ms > MAX_DEADLINE_MS:
        return knobs
    given = knobs.get("deadline_ms")
    if given is None:
        knobs["deadline_ms"] = remaining_ms
    elif isinstance(given, int | float) and not isinstance(given, bool) and math.isfinite(given):
        knobs["deadline_ms"] = min(float(given), remaining_ms)
    return knobs


def input_tensor(request: pb.ModelInferRequest) -> PixelTensor:
    """The one input tensor, from raw_input_contents or InferTensorContents."""
    count = len(request.inputs)
    if count == 0:
        raise ValidationFailedError("invalid inference request: inputs: no input tensor")
    tensor = request.inputs[0]
    shape = [int(d) for d in tensor.shape]
    raw = request.raw_input_contents
    if raw:
        if len(raw) != count:
            raise ValidationFailedError(
                f"raw_input_contents has {len(raw)} entries for {count} inputs: send one per input, in order"
            )
        if any(t.HasField("contents") for t in request.inputs):
            raise ValidationFailedError("send tensor data as raw_input_contents or as contents, not both")
        return tensors.tensor_from_raw(tensor.name, tensor.datatype, shape, raw[0], count)
    contents = tensor.contents
    values: Any = contents.uint_contents if tensor.datatype == "UINT8" else contents.fp32_contents
    return tensors.tensor_from_values(tensor.name, tensor.datatype, shape, values, count)


def wanted_outputs(request: pb.ModelInferRequest) -> list[str]:
    for out in request.outputs:
        tensors.check_output_parameters(out.name, parameters_of(out.parameters))
    return tensors.requested_outputs([o.name for o in request.outputs])


def infer_response(
    request: pb.ModelInferRequest, answer: tensors.InferAnswer, name: str, version: str
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for key, value in answer.parameters.items():
        set_parameter(response.parameters[key], value)
    for out_name, datatype, array in answer.outputs:
        response.outputs.add(name=out_name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())  # already the little-endian wire dtype
    return response
