"""BentoML peer: a `@bentoml.service` with an adaptive-batching API (`batchable=True`).

BentoML builds the service from its import path, so the config comes from the environment
(BOOSTSERVE_PEER_CONFIG, set by `main`). The request is BentoML's JSON form of the API's
arguments, `{"images": ["<base64 PNG>"]}` (one image per request; the adaptive batcher merges
requests along that list), the answer a list of one `{"label", "exit"}`. One worker process;
`max_latency_ms` high so that the batcher never sheds load (we measure throughput, not shedding).

Run: `python -m peer_servers.bentoml_service CONFIG.json` (execs `bentoml serve`).
"""

from __future__ import annotations

import base64
import os
import sys

import bentoml

from .model import PeerConfig, Preprocess, build_network, classify_pngs

CONFIG_ENV = "BOOSTSERVE_PEER_CONFIG"
_config = PeerConfig.load(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None
_BATCH = _config.max_batch_size if _config else 32


@bentoml.service(workers=1, traffic={"timeout": 120, "max_concurrency": 4096}, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        assert _config is not None, f"{CONFIG_ENV} is not set"
        self.network = build_network(_config)
        self.pre = Preprocess(_config)

    @bentoml.api(batchable=True, max_batch_size=_BATCH, max_latency_ms=60_000)
    def classify(self, images: list[str]) -> list[dict[str, int]]:
        return classify_pngs(self.network, self.pre, [base64.b64decode(s) for s in images])


def main(config_path: str) -> None:
    config = PeerConfig.load(config_path)
    os.environ[CONFIG_ENV] = os.path.abspath(config_path)
    bentoml_cli = os.path.join(os.path.dirname(sys.executable), "bentoml")
    os.execv(
        bentoml_cli,
        [bentoml_cli, "serve", f"{__package__}.bentoml_service:Classifier",
         "--host", config.host, "--port", str(config.port)],
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
