"""A deliberately empty image server: the per-request floor of the HTTP stack boostserve runs on.

Why: the HTTP targets compare early exit with all stages *through the server*, so every request
also pays for HTTP parsing, the event loop and the response, whatever the model does. This app
runs on exactly that stack (uvicorn with httptools + uvloop, pure ASGI, no framework) and does
nothing else — optionally decoding the PNG like any image server must, with the decoder boostserve
uses for these plain PNGs (libspng through pyspng) — and answers a fixed JSON
body the size of a classify answer. Its server CPU per request, measured by the HTTP suite under
the same load, is the floor that no Python implementation of the service can go below; the
report turns it into the best early-exit/all-stages ratio this machine allows.

    python -m bench.floor_app --port 8123 [--decode]      # GET /cpu: its CPU seconds, precisely
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

ANSWER = json.dumps(
    {
        "results": [
            {
                "label": 9,
                "class_name": "Ankle boot",
                "confidence": 0.98,
                "top_k": [{"label": 9, "class_name": "Ankle boot", "probability": 0.98}] * 5,
                "exit": 1,
                "exits_total": 4,
                "macs": 1909248,
                "macs_fraction": 0.05,
                "deadline_hit": False,
            }
        ],
        "latency_ms": 1.0,
        "model_name": "floor",
        "model_version": "0",
        "budget": {"max_accuracy_drop": 0.01, "thresholds": [0.9, 0.8, 0.7, 0.0]},
    }
).encode()


def make_app(decode: bool) -> Any:
    """The ASGI app: /readyz -> 200; anything else -> read the body, (decode it), fixed JSON."""
    import numpy as np
    import pyspng

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] in ("/readyz", "/cpu"):
            # /cpu: this process's CPU seconds (all threads, ns resolution); /proc/<pid>/stat counts
            # 10 ms ticks, too coarse for a server that spends ~0.05 ms on a request.
            text = b"ok" if scope["path"] == "/readyz" else repr(time.process_time()).encode()
            length = [(b"content-length", str(len(text)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": length})
            await send({"type": "http.response.body", "body": text})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if decode:
            pixels = pyspng.load(b"".join(chunks)).astype(np.float32) / 255.0  # (H, W)
            del pixels
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--decode", action="store_true", help="decode each body as a PNG (pyspng, as the server does)")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(make_app(args.decode), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
