"""Against a real uvicorn server on 127.0.0.1: the Python client, `vdib stream`, backpressure
(a slow client loses its own frames and stalls nobody), and the DV network source."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.client import StreamClient, StreamOptions, replay_events, replay_file
from service.protocol import encode_events
from service.settings import Settings
from tests.service.conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]


def test_client_replay_equals_upload(live_server, mnist_dvs_path, mnist_dvs_bytes):
    import httpx

    up = httpx.post(
        f"{live_server.http}/v1/naturalize?seed=9&emit=3", content=mnist_dvs_bytes, timeout=60
    ).json()
    summary = replay_file(live_server.ws, str(mnist_dvs_path), StreamOptions(seed=9, emit=3), packet_us=7_000)
    assert summary.ok and summary.close_code == 1000, summary.describe()
    assert [f.bin for f in summary.frames] == [f["bin"] for f in up["frames"]]
    import base64
    import io

    from PIL import Image

    for f, u in zip(summary.frames, up["frames"]):
        assert np.array_equal(f.image(), np.asarray(Image.open(io.BytesIO(base64.b64decode(u["image"])))))
    assert summary.end["events"] == 15744 and summary.end["dropped_frames"] == 0


def test_realtime_replay_paced(live_server, mnist_dvs_events):
    ev = mnist_dvs_events[mnist_dvs_events["t"] < mnist_dvs_events["t"][0] + 400_000]  # 0.4 s of events
    with StreamClient(live_server.ws, 128, 128, StreamOptions(emit=3)) as c:
        t = time.perf_counter()
        s = replay_events(c, ev, realtime=True, speed=1.0, packet_us=10_000)
        wall = time.perf_counter() - t
    assert s.ok
    span = (int(ev["t"][-1]) - int(ev["t"][0])) / 1e6
    assert span * 0.9 <= wall <= span + 2.0
    # frames arrive while streaming, not all at the end: the first frame comes well before the last
    assert s.frame_times[-1] - s.frame_times[0] > 0.5 * span
    lat = s.end["latency_ms_p99"]
    assert lat is not None and lat < 1000


def test_vdib_stream_cli(live_server, mnist_dvs_path, tmp_path):
    out = tmp_path / "frames.npz"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "vdib_cli.py"),
            "stream",
            str(mnist_dvs_path),
            "--url",
            live_server.ws,
            "--realtime",
            "--speed",
            "8",
            "--emit",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "frames/s" in r.stdout and "close code 1000" in r.stdout
    with np.load(out) as f:
        assert f["images"].shape[1:] == (28, 28) and len(f["images"]) == 23  # ceil(222 / 10)


def test_stream_cli_needs_a_source():
    r = subprocess.run(
        [sys.executable, str(REPO / "vdib_cli.py"), "stream"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2 and "either a FILE or --dv" in r.stderr


def _dense_events(seconds: float, rate_hz: float = 20_000, seed: int = 0) -> np.ndarray:
    from events import EVENT_DTYPE

    rng = np.random.default_rng(seed)
    n = int(seconds * rate_hz)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, int(seconds * 1e6), n))
    ev["x"] = rng.integers(48, 74, n)
    ev["y"] = rng.integers(54, 80, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


class RawWS:
    """A minimal websocket client on a raw socket with a tiny receive buffer that reads nothing
    until asked: a client whose network (or CPU) cannot keep up."""

    def __init__(self, port: int) -> None:
        import base64
        import os

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0]

    def send(self, data: bytes | str) -> None:
        import os
        import struct

        opcode = 0x1 if isinstance(data, str) else 0x2
        payload = data.encode() if isinstance(data, str) else data
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        arr = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
        self.sock.sendall(head + mask + arr.tobytes())

    def read_all(self, timeout: float = 30.0) -> list[bytes | str]:
        """Read frames until the server's close frame; returns data messages."""
        import struct

        self.sock.settimeout(timeout)
        out: list[bytes | str] = []
        while True:
            while len(self.buf) < 2:
                self.buf += self.sock.recv(65536)
            b0, b1 = self.buf[0], self.buf[1]
            n, o = b1 & 0x7F, 2
            if n == 126:
                while len(self.buf) < 4:
                    self.buf += self.sock.recv(65536)
                n, o = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                while len(self.buf) < 10:
                    self.buf += self.sock.recv(65536)
                n, o = struct.unpack(">Q", self.buf[2:10])[0], 10
            while len(self.buf) < o + n:
                self.buf += self.sock.recv(65536)
            payload, self.buf = self.buf[o : o + n], self.buf[o + n :]
            op = b0 & 0x0F
            if op == 0x8:
                return out
            if op == 0x1:
                out.append(payload.decode())
            elif op == 0x2:
                out.append(payload)


def test_slow_client_loses_frames_others_unaffected(checkpoints_dir):
    srv = LiveServer(
        Settings(checkpoints_dir=checkpoints_dir, out_queue_frames=4, stats_interval_s=0.2, _env_file=None),
        sndbuf=4096,
    )
    try:
        ev = _dense_events(15.0)
        slow = RawWS(srv.port)
        slow.send(
            json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}, "emit": 1, "inputs": True})
        )
        fast = StreamClient(srv.ws, 128, 128, StreamOptions(emit=1, inputs=True, seed=3))
        t0 = time.perf_counter()
        for a in range(0, len(ev), 2000):
            slow.send(encode_events(ev[a : a + 2000]))
            fast.send_events(ev[a : a + 2000])
            time.sleep(0.01)
        s_fast = fast.end(timeout=120)
        fast_wall = time.perf_counter() - t0
        slow.send(json.dumps({"type": "end"}))
        msgs = slow.read_all()
    finally:
        srv.stop()
    n_bins = int((ev["t"][-1] - ev["t"][0]) // 10_000) + 1
    assert s_fast.ok and len(s_fast.frames) == n_bins
    assert s_fast.end["dropped_frames"] == 0
    texts = [json.loads(m) for m in msgs if isinstance(m, str)]
    assert texts[0]["type"] == "ready"
    end = [m for m in texts if m["type"] == "end"]
    assert end, "slow client got no end message"
    frames_slow = sum(1 for m in msgs if isinstance(m, bytes))
    assert end[0]["dropped_frames"] > 0
    assert end[0]["frames_sent"] == frames_slow
    assert frames_slow + end[0]["dropped_frames"] == n_bins
    # periodic stats reached it too (they queue behind the frames, never dropped)
    assert any(m["type"] == "stats" for m in texts)
    assert fast_wall < 60


def test_dv_network_source(live_server, shared_events):
    dv = pytest.importorskip("dv_processing")
    from events import read

    path = shared_events / "aedat4" / "tonic_sample.aedat4"
    rec = read(path)
    reader = dv.io.MonoCameraRecording(str(path))
    port = _free_port()
    writer = dv.io.NetworkWriter(
        "127.0.0.1", port, dv.io.Stream.EventStream(0, "events", "DVXplorer", reader.getEventResolution())
    )
    result = {}

    def run_cli():
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "vdib_cli.py"),
                "stream",
                "--dv",
                f"tcp://127.0.0.1:{port}",
                "--url",
                live_server.ws,
                "--emit",
                "1",
                "--max-seconds",
                "3",
                "--model",
                "tiny",
            ],  # a 320x240 DVXplorer
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        result["r"] = r

    th = threading.Thread(target=run_cli)
    th.start()
    for _ in range(200):  # wait for the client to connect
        if writer.getClientCount() > 0:
            break
        time.sleep(0.05)
    assert writer.getClientCount() > 0, "vdib stream --dv did not connect"
    sent = 0
    while reader.isRunning():
        batch = reader.getNextEventBatch()
        if batch is None:
            break
        writer.writeEvents(batch)
        sent += batch.size()
        time.sleep(0.002)
    for _ in range(200):
        if writer.getQueuedPacketCount() == 0:
            break
        time.sleep(0.02)
    th.join(120)
    del writer
    r = result["r"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert sent == len(rec.events)
    n_events = int(r.stdout.split(" events sent")[0].split()[-1])
    assert n_events == sent
    assert "close code 1000" in r.stdout
    frames = int(r.stdout.split(" frames in")[0].split()[-1])
    assert frames >= 50  # 0.59 s of events at dt 10 ms, emit 1


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_vdib_serve_prints_viewer_url_and_serves(checkpoints_dir):
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "vdib_cli.py"),
            "serve",
            "--port",
            str(port),
            "--checkpoints",
            str(checkpoints_dir),
            "--engine",
            "onnx",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        assert f"viewer at http://127.0.0.1:{port}/" in line and "engine onnx" in line
        for _ in range(300):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert r.json()["models"] == ["tiny"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"][0]["engine"] == "onnx"
        assert "vdib" in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        proc.terminate()
        proc.wait(20)
