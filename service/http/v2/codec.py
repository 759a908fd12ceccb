"""Open Inference Protocol v2 REST framing: JSON tensors and the binary tensor data extension.

The tensor rules (inputs, datatypes, shapes, outputs) are the protocol-neutral ones of
`service.core.tensors`; this module only reads and writes the REST body.

Binary tensor data extension (as Triton and `tritonclient.http` speak it, and on by default there):
  request   header `Inference-Header-Content-Length: N`: the first N body bytes are the JSON
            header, the rest is the raw data of the inputs that carry `parameters.binary_data_size`,
            concatenated in input order (little-endian, row-major; BYTES elements with 4-byte
            length prefixes). Such an input has no `data`.
  response  an output is binary when its own `parameters.binary_data` is true, or, without that,
            when the request's `parameters.binary_data_output` is true. With any binary output the
            answer is `application/octet-stream` with `Inference-Header-Content-Length`: the JSON
            header (binary outputs carry `parameters.binary_data_size` and no `data`), then their
            bytes in output order. With none it is plain JSON.
The body limit, pixel limit and per-request image limit are the same for both forms: the middleware
bounds the body, the core the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from service.core import tensors
from service.core.errors import UnsupportedMediaTypeError, ValidationFailedError
from service.core.preprocess import PixelTensor
from service.http.v2.schemas import InferenceRequest

HEADER_LENGTH = "inference-header-content-length"
#: The response header, spelled as Triton sends it.
HEADER_LENGTH_RESPONSE = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSION = "binary_tensor_data"


@dataclass(frozen=True)
class ParsedRequest:
    request: InferenceRequest
    binary: memoryview  # the bytes after the JSON header (empty without the extension)


def media_type(content_type: str | None) -> str:
    return (content_type or JSON_TYPE).split(";")[0].strip().lower()


def parse(
    body: bytes, content_type: str | None, header_length: str | None, content_encoding: str | None
) -> ParsedRequest:
    """The request body -> its JSON header (validated) and the binary part; framing errors are 4xx."""
    if content_encoding not in (None, "", "identity"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {content_encoding!r} is not supported; send the body as is")
    kind = media_type(content_type)
    if header_length is None:
        if kind not in (JSON_TYPE, "") and not kind.endswith("+json"):
            raise UnsupportedMediaTypeError(
                f"unsupported Content-Type {kind!r}: the v2 API takes application/json, or any body with the "
                f"{HEADER_LENGTH_RESPONSE} header (binary tensor data extension)"
            )
        split = len(body)
    else:
        text = header_length.strip()
        if not text.isdigit() or int(text) > len(body):
            raise ValidationFailedError(
                f"{HEADER_LENGTH_RESPONSE} must be a whole number of bytes at most the body's {len(body)}, "
                f"got {header_length!r}"
            )
        split = int(text)
    view = memoryview(body)
    try:
        request = InferenceRequest.model_validate_json(body if split == len(body) else view[:split].tobytes())
    except ValidationError as exc:
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
        msg = errors[0]["msg"] if errors else "invalid"
        raise ValidationFailedError(f"invalid inference request: {loc or 'body'}: {msg}") from exc
    return ParsedRequest(request, view[split:])


def _binary_size(name: str, parameters: Mapping[str, Any] | None) -> int | None:
    size = (parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValidationFailedError(f"input {name!r}: binary_data_size must be a whole number of bytes, got {size!r}")
    return size


def input_tensor(parsed: ParsedRequest) -> PixelTensor:
    """The one input tensor, from JSON `data` or from its slice of the binary part."""
    request, binary = parsed.request, parsed.binary
    offset = 0
    slices: list[memoryview | None] = []
    for tensor in request.inputs:
        size = _binary_size(tensor.name, tensor.parameters)
        if size is None:
            slices.append(None)
            continue
        if tensor.data is not None:
            raise ValidationFailedError(f"input {tensor.name!r} has both `data` and binary_data_size: send one")
        if offset + size > len(binary):
            raise ValidationFailedError(
                f"input {tensor.name!r}: binary_data_size {size} runs past the {len(binary)} bytes after the header"
            )
        slices.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ValidationFailedError(
            f"{len(binary) - offset} bytes after the JSON header belong to no input (binary_data_size)"
        )
    count = len(request.inputs)
    tensor, raw = request.inputs[0], slices[0]
    if raw is not None:
        return tensors.tensor_from_raw(tensor.name, tensor.datatype, tensor.shape, raw, count)
    if tensor.data is None:
        raise ValidationFailedError(f"input {tensor.name!r} has no `data` (and no binary_data_size)")
    return tensors.tensor_from_values(tensor.name, tensor.datatype, tensor.shape, tensor.data, count)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationFailedError(f"{what} must be true or false, got {value!r}")
    return value


def output_plan(request: InferenceRequest) -> list[tuple[str, bool]]:
    """(output name, answered as binary) in request order; all outputs when none are named."""
    default = _flag((request.parameters or {}).get("binary_data_output", False), "binary_data_output")
    named = request.outputs or []
    names = tensors.requested_outputs([o.name for o in named])
    if not named:
        return [(name, default) for name in names]
    plan = []
    for out in named:
        tensors.check_output_parameters(out.name, out.parameters)
        flag = (out.parameters or {}).get("binary_data", default)
        plan.append((out.name, _flag(flag, f"output {out.name!r}: binary_data")))
    return plan


def render(
    head: dict[str, Any], arrays: list[tuple[str, str, np.ndarray]], plan: list[tuple[str, bool]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or the JSON header + binary outputs."""
    binary = dict(plan)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, datatype, array in arrays:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary[name]:
            data = array.tobytes()  # already the little-endian wire dtype
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        outputs.append(tensor)
    header = orjson.dumps({**head, "outputs": outputs})
    if not chunks:
        return header, {"content-type": JSON_TYPE}
    return header + b"".join(chunks), {"content-type": BINARY_TYPE, HEADER_LENGTH_RESPONSE: str(len(header))}
