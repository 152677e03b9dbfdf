"""The app factory: ``create_app(settings)`` builds a FastAPI app; models load in ``lifespan``."""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles

from .api import health, models, naturalize, stream, viewer
from .guard import install_log_redaction
from .metrics import Metrics
from .registry import ModelRegistry
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("vdib.service")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that this service needs: the
    websocket size limit 1 MiB above ``max_message_bytes`` (so the service answers 1009
    itself), the h11 protocol of :mod:`service.guard` (header and body timeouts, connections per
    client), ``limit_concurrency`` (``settings.connection_limit``: 503 beyond) and the websocket
    protocol of :mod:`service.wsfast` (``ws_fast_path``) or :class:`service.guard.GuardedWebSocketProtocol`."""
    from .guard import GuardedH11Protocol, GuardedWebSocketProtocol

    limits = {
        "max_connections_per_client": settings.max_connections_per_client,
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
    }
    opts: dict[str, Any] = {
        "ws_max_size": settings.max_message_bytes + 1024 * 1024,
        "http": functools.partial(GuardedH11Protocol, limits=limits),
        "ws": GuardedWebSocketProtocol,
        "limit_concurrency": settings.connection_limit,
    }
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
            log.info(
                "models: %s (default %s)", ", ".join(app.state.registry.models), app.state.registry.default
            )
        else:
            log.warning("service not ready: %s", reason)
        app.state.scheduler = Scheduler(
            metrics,
            settings.max_batch,
            tick_interval_s=settings.tick_interval_s,
            png_level=settings.stream_png_level,
        )
        if settings.warmup:
            for name, entry in list(app.state.registry.models.items()):
                try:
                    await run_in_threadpool(app.state.scheduler.warmup, entry)
                except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not stop the others
                    app.state.registry.fail(name, exc)
        app.state.scheduler.start()
        metrics.workers_ready.set(1 if app.state.registry.ready[0] else 0)
        app.state.ingest_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vdib-ingest")
        # Everything loaded so far lives as long as the app: move it out of the collector's
        # generations so full collections (pauses of tens of ms with torch loaded) stay short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await app.state.scheduler.stop()
            app.state.ingest_pool.shutdown(wait=False, cancel_futures=True)
            metrics.close()

    app = FastAPI(
        title="vdib",
        version="1",
        summary="Event-camera streams to images with a VDIB-trained spiking encoder",
        lifespan=lifespan,
        docs_url=None,  # /docs is served by viewer.install_docs with local Swagger UI assets (no CDN)
        redoc_url=None,  # ReDoc has no offline assets here
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.uploads_running = 0  # uploads being read or run (at most settings.max_concurrent_uploads)
    install_log_redaction()

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
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
    viewer.install_docs(app)
    return app
