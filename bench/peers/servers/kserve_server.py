"""KServe peer: a custom `kserve.Model` behind KServe's own model server (v1 protocol).

KServe's Python model server has no batcher of its own (batching is the Kubernetes sidecar
agent's job), so the model batches by hand, as a KServe user on one machine would: `predict`
puts its image on an asyncio queue and awaits a future; one task takes up to max_batch_size
images (waiting at most max_wait_ms for more), runs the network and resolves the futures.
The request is KServe's v1 image convention `{"instances": [{"image_bytes": {"b64": ...}}]}`,
the answer `{"predictions": [{"label", "exit"}]}`. One worker process, no gRPC server, no
per-request latency log line (on by default; off is what a throughput-minded user sets).

Run: `python -m peer_servers.kserve_server CONFIG.json`.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from typing import Any

from .model import PeerConfig, Preprocess, build_network, classify_pngs

MODEL_NAME = "peer"


def main(config_path: str) -> None:
    import kserve

    config = PeerConfig.load(config_path)

    class Classifier(kserve.Model):
        def __init__(self) -> None:
            super().__init__(MODEL_NAME)
            self.network = build_network(config)
            self.pre = Preprocess(config)
            self.queue: asyncio.Queue[tuple[bytes, asyncio.Future[dict[str, int]]]] | None = None
            self.ready = True

        async def _batches(self) -> None:
            assert self.queue is not None
            loop = asyncio.get_running_loop()
            while True:
                items = [await self.queue.get()]
                deadline = loop.time() + config.max_wait_ms / 1e3
                while len(items) < config.max_batch_size:
                    if not self.queue.empty():
                        items.append(self.queue.get_nowait())
                        continue
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(self.queue.get(), left))
                    except TimeoutError:
                        break
                try:
                    answers = classify_pngs(self.network, self.pre, [body for body, _ in items])
                except Exception as exc:  # every waiting request gets the error, the loop goes on
                    for _, future in items:
                        future.set_exception(exc)
                    continue
                for (_, future), result in zip(items, answers, strict=True):
                    future.set_result(result)

        async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
            if self.queue is None:
                self.queue = asyncio.Queue()
                asyncio.get_running_loop().create_task(self._batches())
            loop = asyncio.get_running_loop()
            futures = []
            for instance in payload["instances"]:
                future: asyncio.Future[dict[str, int]] = loop.create_future()
                await self.queue.put((base64.b64decode(instance["image_bytes"]["b64"]), future))
                futures.append(future)
            return {"predictions": list(await asyncio.gather(*futures))}

    model = Classifier()
    server = kserve.ModelServer(
        http_port=config.port, workers=1, enable_grpc=False, enable_docs_url=False, enable_latency_logging=False
    )
    server.start([model])


if __name__ == "__main__":
    main(sys.argv[1])
