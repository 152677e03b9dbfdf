"""The viewer page (plain HTML + JS from service/static, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["viewer"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The viewer: upload a recording or replay it live over the websocket."""
    return FileResponse(STATIC / "index.html", media_type="text/html")
