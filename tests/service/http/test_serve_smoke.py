"""Real uvicorn: `python -m boostserve serve` on the synthetic artifact, classify over HTTP, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from bench.server import free_port, wait_until_ready
from tests.service.http import images

ROOT = Path(__file__).resolve().parents[3]


def test_serve_classify_and_sigterm(synthetic_artifact: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    env["BOOSTSERVE_ADMIN_TOKEN"] = "smoke"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "boostserve", "serve", "--artifacts", str(synthetic_artifact),
            "--host", "127.0.0.1", "--port", str(port), "--log-format", "json", "--providers", "cpu",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(f"{base}/readyz", proc, 30), "server did not become ready"
        response = httpx.post(
            f"{base}/v1/classify?max_exit=2",
            files={"file": ("a.png", images.png(), "image/png")},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["exit"] == 2
        assert response.headers["x-request-id"]
        assert "boostserve_requests_total" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output
    assert '"logger": "boostserve.access"' in output
    assert "iVBOR" not in output  # no image data in logs
