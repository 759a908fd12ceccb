"""PyTriton peer: NVIDIA Triton Inference Server (bundled by nvidia-pytriton) with its dynamic batcher.

Triton's HTTP front end and dynamic batcher (max batch size, max queue delay from the config)
feed a Python inference callable through PyTriton's Python-backend proxy; the callable decodes
the PNGs of the batch and runs the network. Input `image`: one BYTES element (the PNG) per
request; outputs `label` and `exit` (INT64). Requests use the Open Inference Protocol's binary
tensor extension (the PNG goes as raw bytes, as tritonclient sends it), answers are JSON.

Run: `python -m peer_servers.pytriton_server CONFIG.json` (the venv must be made with Debian's
/usr/bin/python3.11: Triton's Python-backend stub links that libpython).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import numpy as np

from .model import PeerConfig, Preprocess, build_network

MODEL_NAME = "peer"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def main(config_path: str) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = PeerConfig.load(config_path)
    network = build_network(config)
    pre = Preprocess(config)

    @batch
    def infer(image: np.ndarray) -> dict[str, Any]:
        # image: (B, 1) object array of PNG bytes
        labels, exits = network(pre.batch([bytes(row[0]) for row in image]))
        return {"label": labels.reshape(-1, 1).astype(np.int64), "exit": exits.reshape(-1, 1).astype(np.int64)}

    triton_config = TritonConfig(
        http_address=config.host,
        http_port=config.port,
        grpc_address=config.host,
        grpc_port=_free_port(config.host),
        metrics_port=_free_port(config.host),
        log_verbose=0,
    )
    with Triton(config=triton_config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="label", dtype=np.int64, shape=(1,)), Tensor(name="exit", dtype=np.int64, shape=(1,))],
            config=ModelConfig(
                max_batch_size=config.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(config.max_wait_ms * 1000)),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1])
