"""Shared objects injected into routes (STYLE.md 7): settings, registry, scheduler, metrics, auth."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool

from .guard import Budget, BudgetExceeded, Cancelled
from .metrics import Metrics
from .registry import ModelRegistry
from .scheduler import Scheduler
from .settings import Settings

T = TypeVar("T")


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
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
AuthDep = Depends(require_api_key)


# ---------------------------------------------------------------------------- upload budgets
@contextlib.asynccontextmanager
async def upload_slot(request: Request) -> AsyncIterator[None]:
    """One of ``max_concurrent_uploads`` upload slots for the request's whole life (body, decode,
    run, render), taken before the body is read; none free: 503 with ``Retry-After``."""
    state = request.app.state
    limit = state.settings.max_concurrent_uploads
    if state.uploads_running >= limit:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{limit} uploads are running; try again shortly",
            headers={"Retry-After": "1", "Connection": "close"},  # close: the unread body is not drained
        )
    state.uploads_running += 1
    try:
        yield
    finally:
        state.uploads_running -= 1
        state.scheduler.trimmer.request()  # an upload's memory back to the OS (at most every 10 s)


async def run_budgeted(request: Request, budget: Budget, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, where ``fn`` calls ``budget.check()`` between chunks of
    work; the budget is cancelled as soon as the client disconnects, so the work stops with it.
    Over the CPU budget: 413; client gone: 499 (nobody reads it; the access log shows it)."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        budget.cancel()

    def run() -> T:
        try:
            return fn(*args)
        finally:
            budget.finish_thread()

    watcher = asyncio.create_task(watch())
    try:
        return await run_in_threadpool(run)
    except BudgetExceeded as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except Cancelled as exc:
        raise HTTPException(499, str(exc)) from None
    finally:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher


async def _upload_slot_dep(request: Request) -> AsyncIterator[None]:
    async with upload_slot(request):
        yield


UploadSlotDep = Depends(_upload_slot_dep)
