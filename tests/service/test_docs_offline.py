"""``/docs`` works without internet: the Swagger UI page names only this server's assets, and
the upload routes declare their request bodies so "Try it out" can send a file (issue 12)."""

from __future__ import annotations

import re

import pytest

from service.api.viewer import DOCS_ASSETS, swagger_assets


@pytest.mark.skipif(swagger_assets() is None, reason="swagger-ui-bundle-v2 not installed")
def test_docs_page_and_assets_are_local(client):
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text) + re.findall(
        r"url: ?'([^']+)'", page.text
    )
    assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert f"{DOCS_ASSETS}/{name}" in page.text
        r = client.get(f"{DOCS_ASSETS}/{name}")
        assert r.status_code == 200 and len(r.content) > 100, name
    assert "SwaggerUIBundle" in client.get(f"{DOCS_ASSETS}/swagger-ui-bundle.js").text
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_upload_routes_declare_a_file_body(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/naturalize", "/v1/events"):
        body = spec["paths"][path]["post"].get("requestBody")
        assert body is not None, path
        content = body["content"]
        assert content["application/octet-stream"]["schema"]["format"] == "binary"
        part = content["multipart/form-data"]["schema"]["properties"]["file"]
        assert part["format"] == "binary"
