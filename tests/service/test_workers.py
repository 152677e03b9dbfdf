"""``vdib serve --workers 2`` on loopback: two processes behind one port, each with its own models
and streams; readiness per process; /metrics merged across them (prometheus-client's
multiprocess mode); an upload and two concurrent streams give the frames a single-process
server gives for the same seed."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.client import StreamOptions, StreamSummary, replay_file

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class WorkersServer:
    """``vdib serve --workers N`` as a subprocess on 127.0.0.1."""

    def __init__(self, checkpoints: Path, workers: int) -> None:
        self.port = _free_port()
        # a fresh worker's first stream message may load (or compile) the numba kernels: more than the
        # default 2 CPU s ingest burst on a loaded machine (the stream would close 1008)
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", VDIB_INGEST_CPU_BURST_S="60")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "vdib_cli.py"),
                "serve",
                "--port",
                str(self.port),
                "--checkpoints",
                str(checkpoints),
                "--workers",
                str(workers),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        # drain the log so the server never blocks on a full pipe
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout or ()), daemon=True).start()
        # Wait on state: every worker has loaded its models (the merged vdib_workers_ready gauge).
        # The bound only catches a hung start (cold numba caches on a loaded machine are slow).
        self.client = httpx.Client(base_url=self.http, timeout=60)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if _metric(self.client.get("/metrics").text, "vdib_workers_ready") == workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("workers did not become ready:\n" + "".join(self.log))

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def two_workers(checkpoints_dir: Path) -> Iterator[WorkersServer]:
    srv = WorkersServer(checkpoints_dir, 2)
    yield srv
    srv.stop()


def _images(up: dict) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(f["image"])))) for f in up["frames"]]


def _two_streams(url: str, path: Path) -> list[StreamSummary]:
    out: list[StreamSummary | None] = [None, None]

    def one(i: int) -> None:
        out[i] = replay_file(url, str(path), StreamOptions(seed=9, emit=3), packet_us=7_000)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(s is not None for s in out)
    return [s for s in out if s is not None]


def test_two_workers_ready_upload_streams_metrics(two_workers, live_server, mnist_dvs_path, mnist_dvs_bytes):
    srv = two_workers
    assert "workers 2" in srv.banner
    # readiness is per process; both answer, each its own pid
    pids: set[int] = set()
    n_health = 0
    while len(pids) < 2 and n_health < 2000:  # the kernel spreads connections; bounded in count, not time
        with httpx.Client(base_url=srv.http, timeout=60) as c:  # a new connection each
            r = c.get("/healthz")
            assert r.status_code == 200
            pids.add(r.json()["pid"])
            n_health += 1
            if n_health % 50 == 0:
                assert c.get("/readyz").status_code == 200
    assert len(pids) == 2, f"one worker answered {n_health} connections"
    assert srv.proc.pid not in pids  # the workers, not the supervisor

    # one upload: the frames of a single-process server with the same seed
    up = srv.client.post("/v1/naturalize?seed=9&emit=3", content=mnist_dvs_bytes)
    assert up.status_code == 200, up.text
    single = httpx.post(
        f"{live_server.http}/v1/naturalize?seed=9&emit=3", content=mnist_dvs_bytes, timeout=120
    )
    assert [f["bin"] for f in up.json()["frames"]] == [f["bin"] for f in single.json()["frames"]]
    ref = _images(single.json())
    assert all(np.array_equal(a, b) for a, b in zip(_images(up.json()), ref, strict=True))

    # two concurrent streams: each equals the single-process stream (and the upload)
    ref_stream = replay_file(
        live_server.ws, str(mnist_dvs_path), StreamOptions(seed=9, emit=3), packet_us=7_000
    )
    assert ref_stream.ok, ref_stream.describe()
    for s in _two_streams(srv.ws, mnist_dvs_path):
        assert s.ok and s.close_code == 1000, s.describe()
        assert [f.bin for f in s.frames] == [f.bin for f in ref_stream.frames]
        for f, g, u in zip(s.frames, ref_stream.frames, ref, strict=True):
            assert np.array_equal(f.image(), g.image()) and np.array_equal(f.image(), u)

    # /metrics merges both workers: every request counted once, whichever worker served it
    text = srv.client.get("/metrics").text
    assert _metric(text, "vdib_http_requests_total", route="/healthz") == n_health
    assert _metric(text, "vdib_http_requests_total", route="/readyz") == n_health // 50
    assert _metric(text, "vdib_http_requests_total", route="/v1/naturalize", status="200") == 1
    assert _metric(text, "vdib_streams_total") == 2
    assert _metric(text, "vdib_frames_sent_total") == 2 * len(ref_stream.frames)
    assert _metric(text, "vdib_upload_events_total") == 15744
    assert _metric(text, "vdib_active_streams") == 0  # live gauge, summed over the workers
    assert _metric(text, "vdib_workers_ready") == 2


def test_workers_option_checked(checkpoints_dir):
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "vdib_cli.py"),
            "serve",
            "--workers",
            "0",
            "--checkpoints",
            str(checkpoints_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 2 and "--workers must be at least 1" in r.stderr


def test_default_workers_is_the_usable_cores(monkeypatch):
    from service import workers

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert workers.default_workers() == len(os.sched_getaffinity(0))
    created: list[str] = []
    with workers.multiprocess_metrics_dir() as d:
        created.append(d)
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == d and Path(d).is_dir()
    assert not Path(created[0]).exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_workers_keep_the_service_protocols():
    """uvicorn pickles its config to each spawned worker: the websocket fast path and the guarded
    h11 protocol (with their limits) must survive that."""
    import pickle

    import uvicorn

    from service.app import uvicorn_options
    from service.guard import GuardedH11Protocol
    from service.settings import Settings
    from service.wsfast import FastWebSocketProtocol

    cfg = uvicorn.Config(
        "service.workers:create_worker_app",
        factory=True,
        workers=2,
        **uvicorn_options(Settings(max_connections_per_client=7, _env_file=None)),
    )  # type: ignore[call-arg]
    got = pickle.loads(pickle.dumps(cfg))
    assert got.ws is FastWebSocketProtocol
    assert (
        got.http.func is GuardedH11Protocol and got.http.keywords["limits"]["max_connections_per_client"] == 7
    )
