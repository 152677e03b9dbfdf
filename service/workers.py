"""``vdib serve --workers N``: N server processes on one port (uvicorn's multi-worker mode).

uvicorn binds the port in the supervisor process and starts N worker processes (``spawn``), each
of which imports :func:`create_worker_app` (an app factory), loads the models once in its own
lifespan and accepts connections on the shared socket; the kernel spreads new connections over
the workers that wait in ``accept``. A websocket stream stays in the process that accepted it (its
state lives in that process's scheduler), so streams spread over the cores without any state
shared between processes. The supervisor restarts a worker that dies.

Everything the CLI decides reaches the workers through the environment (they are fresh
interpreters): the service settings as ``VDIB_<FIELD>`` and ``PROMETHEUS_MULTIPROC_DIR``, a
temporary directory made by :func:`multiprocess_metrics_dir` in which prometheus-client keeps
every worker's values, merged at ``/metrics`` (:meth:`service.metrics.Metrics.exposition`).
Health and readiness are per process: ``/healthz`` and ``/readyz`` answer for the worker that took
the connection (``/healthz`` names its ``pid``); ``vdib_workers_ready`` at ``/metrics`` counts the
workers whose models are loaded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

#: the collector's young-generation threshold of a service process (see :func:`tune_gc`)
GC_THRESHOLD = (50_000, 20, 100)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity; at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tune_gc() -> None:
    """Streams allocate many short-lived objects: collect the young generation less often, so
    collections (and their pauses) are rarer; the process is the service's alone."""
    gc.set_threshold(*GC_THRESHOLD)


def create_worker_app() -> Any:
    """uvicorn's app factory in each worker process: the app of :func:`service.app.create_app`
    with settings from the environment (set by the CLI)."""
    tune_gc()
    from .app import create_app

    return create_app()


@contextlib.contextmanager
def multiprocess_metrics_dir() -> Iterator[str]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for one server run (removed afterwards). Set in the
    environment before the workers start, so their prometheus-client writes its values there."""
    path = tempfile.mkdtemp(prefix="vdib-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


def run(workers: int, settings_env: dict[str, str], **uvicorn_kwargs: Any) -> None:
    """Serve with ``workers`` processes: settings passed to them as ``VDIB_<FIELD>`` variables,
    metrics merged through a temporary multiprocess directory."""
    import uvicorn

    for key, value in settings_env.items():
        os.environ[f"VDIB_{key.upper()}"] = value
    with multiprocess_metrics_dir():
        uvicorn.run("service.workers:create_worker_app", factory=True, workers=workers, **uvicorn_kwargs)
