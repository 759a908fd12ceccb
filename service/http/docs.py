"""/docs (Swagger UI) and /redoc (ReDoc) served from the package, and the `GET /` pointer.

Why: FastAPI's own pages load Swagger UI and ReDoc from a CDN, so in an air-gapped cluster (common
for ML serving) they are a white page. The assets come from `fastapi-offline` (a maintained package
that ships pinned copies of swagger-ui-dist and the ReDoc standalone bundle; its exact version is
pinned in pyproject.toml, so the assets change only with a deliberate bump); the HTML is FastAPI's
own `get_swagger_ui_html` / `get_redoc_html` pointed at them, with ReDoc's Google Fonts off. Nothing
on either page is fetched from outside the server (tests/service/http/test_docs_offline.py loads
/docs in headless Chromium with every other host blocked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from boostserve import __version__

#: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png (shipped by fastapi-offline).
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/docs-assets"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

router = APIRouter()


def _root(request: Request) -> str:
    return str(request.scope.get("root_path") or "")


@router.get(DOCS_URL, include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
    )


@router.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL, include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/", tags=["ops"], summary="Where things are")
async def index(request: Request) -> dict[str, Any]:
    """A small pointer for a person or a script that opens the bare address."""
    settings = request.app.state.settings
    return {
        "name": "boostserve",
        "version": __version__,
        "docs": DOCS_URL,
        "redoc": REDOC_URL,
        "openapi": request.app.openapi_url,
        "v1": "/v1/classify",
        "v2": "/v2",
        "metrics": "/metrics",
        "live": "/livez",
        "ready": "/readyz",
        "grpc_port": settings.grpc_port,
    }


def install(app: FastAPI) -> None:
    """Mount the assets and the pages (create the app with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    app.include_router(router)
