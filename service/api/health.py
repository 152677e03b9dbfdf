"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, RegistryDep, SchedulerDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str | int]:
    """Liveness: the process answers (``pid``: which worker process, under ``vdib serve --workers N``)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz")
async def readyz(registry: RegistryDep, scheduler: SchedulerDep) -> JSONResponse:
    """Readiness: a default model is loaded (503 with the reason otherwise).

    Open to probes, so it says nothing internal: the names of the checkpoints that failed to
    load, not their errors (those are at ``/v1/models``, behind the API key) nor any path."""
    ok = registry.ready[0]
    body = {
        "ready": ok,
        "reason": registry.public_reason,
        "default_model": registry.default,
        "models": sorted(registry.models),
        "failed": sorted(k for k in registry.errors if k not in ("*", "default")),
        "streams": len(scheduler.sessions),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition (every worker's values merged under ``vdib serve --workers N``)."""
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)
