"""The viewer page (plain HTML + JS from service/static, no build step) and the self-hosted
Swagger UI at ``/docs``.

FastAPI's default ``/docs`` page loads Swagger UI from a CDN, so it is blank without internet.
:func:`install_docs` serves the same page with the Swagger UI assets of the
``swagger-ui-bundle-v2`` package (Swagger UI 5, which renders OpenAPI 3.1) under
``/docs/assets``; the app is created with ``docs_url=None, redoc_url=None``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
#: where the Swagger UI assets are served
DOCS_ASSETS = "/docs/assets"

router = APIRouter(tags=["viewer"])
log = logging.getLogger("vdib.service")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The viewer: upload a recording or replay it live over the websocket."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


def swagger_assets() -> Path | None:
    """The folder holding ``swagger-ui-bundle.js`` and ``swagger-ui.css``, or None when the
    package is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() and (path / "swagger-ui.css").is_file() else None


def install_docs(app: FastAPI) -> None:
    """``/docs`` (and its OAuth2 redirect page) with Swagger UI served by this app; without the
    asset package, the same page with FastAPI's CDN URLs (and a warning in the log)."""
    assets = swagger_assets()
    urls: dict[str, Any] = {}
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="swagger-ui")
        urls = {
            "swagger_js_url": f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            "swagger_css_url": f"{DOCS_ASSETS}/swagger-ui.css",
            "swagger_favicon_url": f"{DOCS_ASSETS}/favicon-32x32.png",
        }
    else:
        log.warning("swagger-ui-bundle-v2 is not installed: /docs loads Swagger UI from a CDN")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API docs", oauth2_redirect_url=redirect, **urls
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
