"""A liveness prober in its own process, as the kubelet is: `python -m tests.reliability._prober
PORT INTERVAL_S OUT_JSON READY_FILE`. GET /livez every INTERVAL_S, each on a new connection (the
kubelet's HTTP prober disables keep-alive, so accepting the connection is part of what a probe
waits for), until SIGTERM; then writes every latency (ms) and failure to OUT_JSON.

Why a process: a prober thread inside the load generator waits for that process's GIL and CPU
behind 64 busy clients, and its latencies then measure the load generator as much as the server.
One probe runs before READY_FILE is written and is not kept: the first request of a fresh
interpreter pays for code paths and allocations no later one does.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def probe_once(port: int) -> str | None:
    """One GET /livez on a new connection: None when it answered 200, else what went wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/livez", headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return None if response.status == 200 else f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def probe(port: int, interval_s: float, stop: threading.Event) -> dict[str, Any]:
    latencies_ms: list[float] = []
    failures: list[str] = []
    while not stop.is_set():
        started = time.perf_counter()
        failure = probe_once(port)
        latencies_ms.append((time.perf_counter() - started) * 1e3)
        if failure is not None:
            failures.append(failure)
        stop.wait(max(0.0, interval_s - (time.perf_counter() - started)))
    return {"latencies_ms": latencies_ms, "failures": failures}


def main(argv: list[str]) -> int:
    port, interval_s, out, ready = int(argv[1]), float(argv[2]), Path(argv[3]), Path(argv[4])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    probe_once(port)  # warm-up, not kept
    ready.touch()
    result = probe(port, interval_s, stop)
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
