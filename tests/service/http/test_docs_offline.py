"""/docs and /redoc work without internet; `GET /` points at them.

The browser test runs headless Chromium against a real `boostserve serve` with every host except
127.0.0.1 unresolvable (`--host-resolver-rules`), lets the page's scripts run, and reads the DOM
Swagger UI built: the operations list must be there with `POST /v1/classify`. The screenshot is
kept as a test artifact in results/test-artifacts/docs-offline.png. Without Chromium the test is
skipped with the install line (.ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.reliability._server import REPO, LiveServer

ARTIFACTS = REPO / "results" / "test-artifacts"
_EXTERNAL = re.compile(r"""(?:src|href)=["']?(?:https?:)?//""", re.IGNORECASE)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_nothing_from_outside(client: TestClient, page: str) -> None:
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert not _EXTERNAL.search(html.text), "a page refers to another host"
    assert "fonts.googleapis" not in html.text
    assets = re.findall(r"""(?:src|href)=["']?(/docs-assets/[\w.\-]+)""", html.text)
    assert assets, html.text
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset


def test_index_points_at_docs_v2_and_metrics(client: TestClient) -> None:
    body = client.get("/").json()
    assert body["docs"] == "/docs" and body["redoc"] == "/redoc" and body["v2"] == "/v2"
    assert body["metrics"] == "/metrics" and body["openapi"] == "/openapi.json"
    for key in ("docs", "redoc", "v2", "metrics", "openapi", "live", "ready"):
        assert client.get(body[key]).status_code == 200, key


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_swagger_ui_renders_offline_in_headless_chromium(synthetic_artifact: Path, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "docs-offline.png"
    shot.unlink(missing_ok=True)
    with LiveServer(synthetic_artifact, tmp_path / "logs", extra_args=["--providers", "cpu"]).start() as live:
        common = [
            browser,
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={tmp_path / 'profile'}",
            # the network block: no name but the server's address resolves
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",  # run the page's scripts (fetch the spec, render) first
            "--window-size=1280,2400",
        ]
        url = f"{live.base_url}/docs"
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'class="swagger-ui' in html, "Swagger UI did not start (its script did not load?)"
    operations = re.findall(
        r'opblock-summary-method">(\w+)<.*?data-path="([^"]+)"', html, flags=re.DOTALL
    )  # (method, path) per rendered operation
    assert ("POST", "/v1/classify") in operations, operations[:20]
    assert any(path.startswith("/v2/") for _, path in operations)
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot"
