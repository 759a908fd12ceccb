"""`boostserve serve` in SLO mode, told to shed every classify request: what one refusal costs.

Why: accuracy scaling only helps if, beyond the cheapest allowed point, refusing a request costs
far less than serving it; otherwise the refusals themselves use up the CPU and served req/s falls
as offered load rises. This process runs the service exactly as `boostserve serve` does (its app
factory and `service.commands.serve.uvicorn_config`, so the protocol's head gate is the shipped
one), and once SLO mode has ticked makes its own rule say "shed" (as at the floor with a long
queue). The SLO suite loads it closed-loop and reads its CPU per request; `--no-gate` removes the
head gate (`service.http.early_refusal`), so the same refusal goes through ASGI admission instead.

    python -m bench.shedding_app --artifacts DIR --port 8123 [--no-gate]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any


def _shed_everything(app: Any) -> None:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        live = app.state.live
        if live is not None and live.slo is not None:
            live.slo.should_shed = lambda delay: True  # the suite warms up before it measures
            return
        time.sleep(0.02)


def main() -> None:
    import uvicorn

    from service.commands.serve import uvicorn_config
    from service.http.app import create_app
    from service.http.connection import BoundedHttpToolsProtocol
    from service.http.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-gate", action="store_true", help="refuse through ASGI admission, not at the head")
    args = parser.parse_args()
    # Settings from the environment (BOOSTSERVE_*) as for the other servers, then the SLO mode this needs.
    settings = Settings(artifacts_dir=args.artifacts, host=args.host, port=args.port, latency_target_ms=50.0)
    app = create_app(settings)
    config = uvicorn_config(settings, app)
    if args.no_gate:
        protocol = config.http
        assert isinstance(protocol, type) and issubclass(protocol, BoundedHttpToolsProtocol)
        protocol.early_refusal = None
    threading.Thread(target=_shed_everything, args=(app,), daemon=True).start()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
