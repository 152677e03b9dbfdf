"""Fixtures for the service tests: a checkpoints dir with a tiny random model, apps, clients.

Until the trained default checkpoint lands, the service runs on ``model.testing.tiny_naturalizer``
saved as a real checkpoint (so the registry's loading path is exercised too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.conftest import shared_data_path

MNIST_DVS_FILE = ("events", "aedat2", "mnist_0_scale04_0001.aedat")


def make_checkpoints(root: Path, names: tuple[str, ...] = ("tiny",)) -> Path:
    from model import save_checkpoint
    from model.testing import tiny_naturalizer

    for i, name in enumerate(names):
        nat = tiny_naturalizer(
            seed=i,
            hidden_init_scale=3.0,
            readout_bias=-0.5,
            preprocessing={"roi": [48, 54, 26, 26], "sensor": [128, 128]},
        )
        save_checkpoint(root / name, nat, {"note": "random test model"}, {}, {"source": "model.testing"})
    return root


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def settings(checkpoints_dir: Path) -> Settings:
    return Settings(checkpoints_dir=checkpoints_dir, idle_timeout_s=10, stats_interval_s=0.2, _env_file=None)


def make_client(settings: Settings) -> TestClient:
    from service.app import create_app

    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with make_client(settings) as c:
        yield c


@pytest.fixture(scope="session")
def mnist_dvs_path() -> Path:
    return shared_data_path(*MNIST_DVS_FILE)


@pytest.fixture(scope="session")
def mnist_dvs_bytes(mnist_dvs_path: Path) -> bytes:
    return mnist_dvs_path.read_bytes()


@pytest.fixture(scope="session")
def mnist_dvs_events(mnist_dvs_path: Path) -> np.ndarray:
    import events

    return events.read(mnist_dvs_path).events


# ------------------------------------------------------------------ websocket helpers
def start_msg(**kw) -> dict:
    msg = {"type": "start", "protocol": 1, "sensor": {"width": 128, "height": 128}}
    msg.update(kw)
    return msg


def collect(ws) -> dict:
    """Read a TestClient websocket until it closes: frames, json messages and the close code."""
    import json as _json

    from service.protocol import decode_frame

    out: dict = {"frames": [], "messages": [], "code": None}
    while True:
        m = ws.receive()
        if m["type"] == "websocket.close":
            out["code"] = m.get("code")
            return out
        if m.get("bytes") is not None:
            out["frames"].append(decode_frame(m["bytes"]))
        else:
            obj = _json.loads(m["text"])
            out["messages"].append(obj)
            if obj["type"] == "frame":
                out["frames"].append(obj)


def stream_events(client, events, chunks, url="/v1/stream", **start) -> dict:
    """Stream ``events`` cut at ``chunks`` (indices) and end; returns :func:`collect`'s dict."""
    import json as _json

    from service.protocol import encode_events

    with client.websocket_connect(url) as ws:
        ws.send_text(_json.dumps(start_msg(**start)))
        ready = _json.loads(ws.receive_text())
        assert ready["type"] == "ready", ready
        bounds = [0, *chunks, len(events)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            ws.send_bytes(encode_events(events[a:b]))
        ws.send_text(_json.dumps({"type": "end"}))
        out = collect(ws)
    out["ready"] = ready
    return out


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings, sndbuf: int | None = None) -> None:
        import socket
        import threading

        import uvicorn

        from service.app import create_app, uvicorn_options

        self.sock = socket.socket()
        if sndbuf is not None:  # accepted sockets inherit it (Linux): a small one makes backpressure visible
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = create_app(settings)
        cfg = uvicorn.Config(self.app, log_level="warning", **uvicorn_options(settings))
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        import time

        # wait on the server's state; the bound (3 min) only catches a hung start: model warm-up
        # with a cold numba cache on a loaded 2-core machine can take well over 10 s
        for _ in range(7200):
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.025)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live_server(settings: Settings) -> Iterator[LiveServer]:
    srv = LiveServer(settings)
    yield srv
    srv.stop()
