"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MetricsDep, RegistryDep, SchedulerDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(registry: RegistryDep, scheduler: SchedulerDep) -> JSONResponse:
    """Readiness: a default model is loaded (503 with the reason otherwise)."""
    ok, reason = registry.ready
    body = {
        "ready": ok,
        "reason": reason,
        "default_model": registry.default,
        "models": sorted(registry.models),
        "errors": registry.errors,
        "streams": len(scheduler.sessions),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
