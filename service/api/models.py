"""The models the service has loaded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import AuthDep, RegistryDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[AuthDep])


@router.get("/models")
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    """Loaded models (input/output shapes, dt, engine) and the checkpoints that failed to load."""
    return {
        "default": registry.default,
        "models": [e.describe() for _, e in sorted(registry.models.items())],
        "errors": registry.errors,
    }
