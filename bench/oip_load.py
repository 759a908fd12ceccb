"""Load for the Open Inference Protocol cells: v2 REST with the binary tensor data extension, and gRPC.

Both send the same test images as the v1 cells, as UINT8 [1, H, W, C] tensors of their pixels (what
an OIP client holds), with `max_accuracy_drop=0.01` in the request parameters, so they sit beside
the v1 `drop_0.01` cells: same images, same clients, same budget; only the protocol differs.

  - v2_binary: `POST /v2/models/{m}/infer` as tritonclient.http sends it by default: a JSON header,
    the raw pixels after it (`Inference-Header-Content-Length`), every output asked for in binary.
    Requests are pre-built bytes on the raw keep-alive connections of bench.loadgen.
  - grpc: `inference.GRPCInferenceService/ModelInfer` with `raw_input_contents` on one grpc.aio
    channel shared by the clients (HTTP/2 multiplexes them, as a Triton client would).
Each answer is read back into (label, exit, macs, server latency ms, thresholds) like the v1 one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.core.status import STATUS

BUDGET_PARAMETERS = {"max_accuracy_drop": 0.01}
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
V2_ROUTE = "/v2/models/{name}/infer"
#: gRPC code name -> the HTTP status of the same error_type (service.core.status), for status counts.
_HTTP_BY_GRPC = {row.grpc: row.http for row in reversed(list(STATUS.values()))}


def pixel_tensors(images: np.ndarray) -> list[np.ndarray]:
    """(n, H, W) or (n, H, W, C) uint8 -> one (1, H, W, C) tensor per image."""
    if images.ndim == 3:
        images = images[..., None]
    return [np.ascontiguousarray(img[None], dtype=np.uint8) for img in images]


def build_v2_binary_requests(host: str, port: int, model: str, images: np.ndarray) -> list[bytes]:
    """One complete HTTP/1.1 request per image: JSON header + raw UINT8 pixels, binary outputs."""
    path = V2_ROUTE.format(name=model)
    out = []
    for tensor in pixel_tensors(images):
        raw = tensor.tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "UINT8",
                        "shape": list(tensor.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {**BUDGET_PARAMETERS, "binary_data_output": True},
            },
            separators=(",", ":"),
        ).encode()
        body = header + raw
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nConnection: keep-alive\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


def _answer(outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> tuple[int, int, float, float, Any]:
    thresholds = parameters.get("thresholds")
    return (
        int(outputs["label"][0]),
        int(outputs["exit"][0]),
        float(outputs["macs"][0]),
        float(parameters.get("latency_ms", "nan")),
        json.loads(thresholds) if isinstance(thresholds, str) else None,
    )


_DTYPES = {"FP32": "<f4", "INT64": "<i8"}


def parse_v2_binary_answer(body: bytes) -> tuple[int, int, float, float, Any]:
    """A binary-extension answer: the JSON header ends where the JSON value ends, then the tensors."""
    header, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    outputs: dict[str, np.ndarray] = {}
    offset = end
    for tensor in header["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        outputs[tensor["name"]] = np.frombuffer(body[offset : offset + size], dtype=_DTYPES[tensor["datatype"]])
        offset += size
    return _answer(outputs, header.get("parameters") or {})


def parse_grpc_answer(body: bytes) -> tuple[int, int, float, float, Any]:
    from service.grpc.codec import parameter_value
    from service.grpc.proto import grpc_predict_v2_pb2 as pb

    response = pb.ModelInferResponse.FromString(body)
    outputs = {
        t.name: np.frombuffer(raw, dtype=_DTYPES[t.datatype])
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return _answer(outputs, {k: parameter_value(v) for k, v in response.parameters.items()})


class GrpcClients:
    """Pre-built ModelInfer requests and one shared channel; `connect()` gives each client its handle."""

    def __init__(self, host: str, port: int, model: str, images: np.ndarray, timeout_s: float = 120.0) -> None:
        from service.grpc.codec import set_parameter
        from service.grpc.proto import grpc_predict_v2_pb2 as pb

        self.target = f"{host}:{port}"
        self.timeout_s = timeout_s
        self.requests: list[bytes] = []
        for tensor in pixel_tensors(images):
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name="image", datatype="UINT8", shape=list(tensor.shape))
            request.raw_input_contents.append(tensor.tobytes())
            for key, value in BUDGET_PARAMETERS.items():
                set_parameter(request.parameters[key], value)
            self.requests.append(request.SerializeToString())
        self._channel: Any = None
        self._call: Any = None

    def connect(self) -> GrpcClients._Handle:
        import grpc

        if self._channel is None:  # created inside the load generator's running loop
            self._channel = grpc.aio.insecure_channel(self.target)
            self._call = self._channel.unary_unary(GRPC_METHOD)  # bytes in, bytes out
        return GrpcClients._Handle(self)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    class _Handle:
        def __init__(self, owner: GrpcClients) -> None:
            self.owner = owner

        async def request(self, index: int) -> tuple[int, bytes]:
            import grpc

            try:
                body = await self.owner._call(self.owner.requests[index], timeout=self.owner.timeout_s)
            except grpc.aio.AioRpcError as exc:
                return _HTTP_BY_GRPC.get(exc.code().name, 500), str(exc.details()).encode()
            return 200, body

        async def close(self) -> None:
            """The channel is shared; GrpcClients.aclose closes it."""
