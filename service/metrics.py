"""Prometheus metrics of one app instance (its own registry, so several apps can coexist).

Under ``vdib serve --workers N`` (N > 1) the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh
temporary directory before the workers start: prometheus-client then keeps every value in a
per-process file there, and :meth:`Metrics.exposition` merges the files of all workers (counters
and histograms summed, dead workers' counts kept; gauges summed over live workers), so a scrape of
any worker sees the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory, when this process is one of several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """Counters, gauges and histograms exported at ``/metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vdib_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "vdib_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.upload_events = Counter("vdib_upload_events_total", "events received by uploads", registry=r)
        self.active_streams = Gauge(
            "vdib_active_streams", "open websocket streams", registry=r, multiprocess_mode="livesum"
        )
        self.workers_ready = Gauge(
            "vdib_workers_ready",
            "server processes with their models loaded",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_total = Counter("vdib_streams_total", "websocket streams started", registry=r)
        self.streams_rejected = Counter(
            "vdib_streams_rejected_total", "streams closed with an error", ["code"], registry=r
        )
        self.stream_events = Counter("vdib_stream_events_total", "events received by streams", registry=r)
        self.steps = Counter(
            "vdib_steps_total", "encoder steps (stream bins) run by the scheduler", registry=r
        )
        self.steps_per_second = Gauge(
            "vdib_steps_per_second",
            "scheduler steps per second (last second)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "vdib_batch_size",
            "streams stepped per tick",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.frames_sent = Counter("vdib_frames_sent_total", "frames sent to stream clients", registry=r)
        self.dropped_frames = Counter(
            "vdib_dropped_frames_total", "frames dropped for slow clients", registry=r
        )
        self.late_events = Counter("vdib_late_events_total", "stream events dropped as late", registry=r)
        self.frame_latency = Histogram(
            "vdib_frame_latency_seconds", "bin complete to frame sent", registry=r, buckets=_LATENCY_BUCKETS
        )

    def exposition(self) -> bytes:
        """The Prometheus text of this app, or of all workers merged under ``PROMETHEUS_MULTIPROC_DIR``."""
        if multiprocess_dir():
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    def close(self) -> None:
        """This worker is stopping: its live gauges (streams, readiness) leave the merged values."""
        self.workers_ready.set(0)
        if multiprocess_dir():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
