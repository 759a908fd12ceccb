"""What each server is sent and how its answer is read: pre-built HTTP/1.1 requests and parsers.

Every body carries the same PNG of a Fashion-MNIST test image; only the envelope differs, and
each peer gets the envelope its own documentation uses for images:

  raw_png       POST <path>, Content-Type image/png, the PNG as the body (boostserve, Ray Serve)
  litserve      JSON {"image": "<base64>"}
  bentoml       JSON {"images": ["<base64>"]} (the batchable API's list argument)
  kserve_v1     JSON {"instances": [{"image_bytes": {"b64": "<base64>"}}]}
  triton_bytes  Open Inference Protocol, binary tensor extension: one BYTES element (the PNG)

The requests are built once before a cell (bench.loadgen sends bytes), so the envelope costs the
client nothing while measuring. Answers are reduced to (label, exit) for the label check.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

from bench.loadgen import build_raw_requests

PROTOCOLS = ("raw_png", "litserve", "bentoml", "kserve_v1", "triton_bytes")
TRITON_MODEL = "peer"


def _post(host: str, port: int, path: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Accept: application/json\r\nConnection: keep-alive\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _json_body(protocol: str, png: bytes) -> bytes:
    b64 = base64.b64encode(png).decode()
    if protocol == "litserve":
        payload: Any = {"image": b64}
    elif protocol == "bentoml":
        payload = {"images": [b64]}
    elif protocol == "kserve_v1":
        payload = {"instances": [{"image_bytes": {"b64": b64}}]}
    else:
        raise ValueError(f"{protocol!r} has no JSON body")
    return json.dumps(payload, separators=(",", ":")).encode()


def triton_body(png: bytes) -> tuple[bytes, int]:
    """(body, JSON header length) of a binary-extension infer request with the PNG as one BYTES element."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(png)},
                }
            ],
            "outputs": [
                {"name": "label", "parameters": {"binary_data": False}},
                {"name": "exit", "parameters": {"binary_data": False}},
            ],
        },
        separators=(",", ":"),
    ).encode()
    return header + struct.pack("<I", len(png)) + png, len(header)


def build_requests(protocol: str, host: str, port: int, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    """One complete HTTP/1.1 request per PNG, in the envelope `protocol` names."""
    if protocol == "raw_png":
        return build_raw_requests(host, port, path, bodies)
    if protocol == "triton_bytes":
        out = []
        for png in bodies:
            body, header_len = triton_body(png)
            extra = f"Inference-Header-Content-Length: {header_len}\r\n"
            out.append(_post(host, port, path, "application/octet-stream", body, extra))
        return out
    if protocol in PROTOCOLS:
        return [_post(host, port, path, "application/json", _json_body(protocol, png)) for png in bodies]
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def _label_exit(item: Any) -> tuple[int, int]:
    if not isinstance(item, dict) or "label" not in item:
        raise KeyError(f"no label in {item!r:.120}")
    return int(item["label"]), int(item.get("exit", -1))


def parse_peer_answer(body: bytes) -> tuple[int, int, float, float, Any]:
    """(label, exit, macs, server ms, thresholds) of any JSON answer above, for bench.loadgen.

    Accepts `{"label", "exit"}`, a list of one such object (BentoML), `{"predictions": [...]}`
    (KServe v1), `{"results": [...]}` (boostserve v1) and Triton's `{"outputs": [...]}`.
    """
    data = json.loads(body)
    if isinstance(data, list):
        data = data[0]
    if isinstance(data, dict) and "outputs" in data:
        values = {o["name"]: o["data"][0] for o in data["outputs"]}
        label, exit_ = int(values["label"]), int(values.get("exit", -1))
    elif isinstance(data, dict) and isinstance(data.get("predictions"), list):
        label, exit_ = _label_exit(data["predictions"][0])
    elif isinstance(data, dict) and isinstance(data.get("results"), list):
        label, exit_ = _label_exit(data["results"][0])
    else:
        label, exit_ = _label_exit(data)
    return label, exit_, math.nan, math.nan, None


Parser = Callable[[bytes], tuple[int, int, float, float, Any]]
