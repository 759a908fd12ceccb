"""LitServe peer: a `LitAPI` with LitServe's own batching (max_batch_size, batch_timeout).

The request is JSON `{"image": "<base64 PNG>"}`, parsed by LitServe into the pydantic model
`decode_request` is annotated with (raw bodies are not among its request types); the answer `{"label", "exit"}`.
One inference worker on the CPU (`accelerator="cpu"`, `workers_per_device=1`), one API server
process, and `fast_queue=True` (ZeroMQ between the API server and the worker, LitServe's faster
transport).

Run: `python -m peer_servers.litserve_server CONFIG.json`.
"""

# No `from __future__ import annotations`: LitServe reads the request type from the real annotation
# of `decode_request` (a string would make FastAPI look for a query parameter).
import base64
import os
import sys
from typing import Any

import litserve as ls
import numpy as np
from pydantic import BaseModel

from .model import PeerConfig, Preprocess, answer, build_network


class ImageRequest(BaseModel):
    """The request body; LitServe reads the type from `decode_request`'s annotation."""

    image: str  # base64 PNG


class ClassifierAPI(ls.LitAPI):
    """Defined at module level: LitServe spawns its inference worker and pickles the API for it."""

    def __init__(self, config_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path

    def setup(self, device: str) -> None:
        config = PeerConfig.load(self.config_path)
        self.network = build_network(config)
        self.pre = Preprocess(config)

    def decode_request(self, request: ImageRequest) -> np.ndarray:
        return self.pre(base64.b64decode(request.image))  # (C, H, W)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)  # (B, C, H, W)

    def predict(self, x: np.ndarray) -> list[dict[str, int]]:
        images = x if x.ndim == 4 else x[None]  # (B, C, H, W)
        labels, exits = self.network(images.astype(np.float32, copy=False))
        return [answer(int(lab), int(ex)) for lab, ex in zip(labels, exits, strict=True)]

    def unbatch(self, output: list[dict[str, int]]) -> list[dict[str, int]]:
        return output

    def encode_response(self, output: Any) -> dict[str, int]:
        return output[0] if isinstance(output, list) else output


def main(config_path: str) -> None:
    config = PeerConfig.load(config_path)
    api = ClassifierAPI(
        os.path.abspath(config_path), max_batch_size=config.max_batch_size, batch_timeout=config.max_wait_ms / 1e3
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120, fast_queue=True)
    server.run(host=config.host, port=config.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main(sys.argv[1])
