"""The app factory: ``create_app(settings)`` builds a FastAPI app; models load in ``lifespan``."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles

from .api import health, models, naturalize, stream, viewer
from .metrics import Metrics
from .registry import ModelRegistry
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("vdib.service")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that this service needs: the
    websocket size limit 1 MiB above ``max_message_bytes`` (so the service answers 1009
    itself) and, with ``ws_fast_path``, the websocket protocol of :mod:`service.wsfast`."""
    opts: dict[str, Any] = {"ws_max_size": settings.max_message_bytes + 1024 * 1024}
    if settings.ws_fast_path:
        from .wsfast import FastWebSocketProtocol

        opts["ws"] = FastWebSocketProtocol
    return opts


def create_app(settings: Settings | None = None) -> FastAPI:
    """A service instance configured by ``settings`` (default: environment / ``.env``)."""
    settings = settings or Settings()  # type: ignore[call-arg]  # fields come from the environment
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry = await run_in_threadpool(ModelRegistry.load, settings)
        ok, reason = app.state.registry.ready
        if ok:
            log.info("models: %s (default %s)", ", ".join(app.state.registry.models), app.state.registry.default)
        else:
            log.warning("service not ready: %s", reason)
        app.state.scheduler = Scheduler(metrics, settings.max_batch, tick_interval_s=settings.tick_interval_s,
                                        png_level=settings.stream_png_level)
        if settings.warmup:
            for entry in app.state.registry.models.values():
                await run_in_threadpool(app.state.scheduler.warmup, entry)
        app.state.scheduler.start()
        # Everything loaded so far lives as long as the app: move it out of the collector's
        # generations so full collections (pauses of tens of ms with torch loaded) stay short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await app.state.scheduler.stop()

    app = FastAPI(
        title="vdib",
        version="1",
        summary="Event-camera streams to images with a VDIB-trained spiking encoder",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.stream_slots = 0

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.requests.labels(path, request.method, str(status)).inc()
            metrics.request_seconds.labels(path).observe(time.perf_counter() - t)

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(naturalize.router)
    app.include_router(stream.router)
    app.include_router(viewer.router)
    app.mount("/static", StaticFiles(directory=viewer.STATIC), name="static")
    return app
