"""Shared objects injected into routes (STYLE.md 7): settings, registry, scheduler, metrics, auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from .metrics import Metrics
from .registry import ModelRegistry
from .scheduler import Scheduler
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def key_ok(settings: Settings, key: str | None) -> bool:
    """True when authentication is off or ``key`` is one of the configured keys (constant time)."""
    keys = settings.api_key_set
    if not keys:
        return True
    if not key:
        return False
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def require_api_key(request: Request) -> None:
    """HTTP auth: ``Authorization: Bearer <key>`` when API keys are configured (401 otherwise)."""
    settings: Settings = request.app.state.settings
    if not key_ok(settings, bearer(request.headers.get("authorization"))):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
AuthDep = Depends(require_api_key)
