"""Ray Serve peer: one deployment, `@serve.batch` over raw PNG bodies, direct ingress.

As a Ray Serve user would deploy it: a local Ray instance with one CPU, one replica whose
`__call__` reads the body and awaits a `@serve.batch` method (max batch size and wait from the
config), `max_ongoing_requests` high enough for the batch to fill. Direct ingress
(RAY_SERVE_ENABLE_DIRECT_INGRESS=1, set by the runner) lets the replica itself listen on the HTTP
port, skipping the proxy actor hop: the fastest configuration Ray Serve offers for one node.
With `early_exit` in the config the batch handler runs the stage graphs by hand
(`model.EarlyExitNetwork`): the strongest "user builds early exit themselves" variant.

Run: `python -m peer_servers.ray_serve CONFIG.json` (the runner copies this package next to its
config; the peer's venv has ray[serve], onnxruntime, numpy, Pillow).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import Any

from .model import PeerConfig, Preprocess, build_network, classify_pngs


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def main(config_path: str) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    config = PeerConfig.load(config_path)

    class Classifier:
        def __init__(self, path: str) -> None:
            cfg = PeerConfig.load(path)
            self.network = build_network(cfg)
            self.pre = Preprocess(cfg)
            self.classify.set_max_batch_size(cfg.max_batch_size)
            self.classify.set_batch_wait_timeout_s(cfg.max_wait_ms / 1e3)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def classify(self, bodies: list[bytes]) -> list[dict[str, int]]:
            return classify_pngs(self.network, self.pre, bodies)

        async def __call__(self, request: Request) -> Any:
            return await self.classify(await request.body())

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    # Direct ingress: the replica listens on the first port of RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT
    # (the runner sets both around config.port); the proxy's own port is then unused.
    serve.start(http_options={"host": config.host, "port": _free_port(config.host)})
    deployment: Any = serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    serve.run(deployment(Classifier).bind(config_path), route_prefix="/", name="peer")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
