"""Hostile clients (issue 10): one regression test per class of attack. No request costs more
than its budget; no client touches another's stream; bad input gets a 4xx or a close code.

Tests wait on states (a close, a status, an object freed), never on wall-clock speed."""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from service.protocol import encode_events
from service.settings import Settings
from tests.service.conftest import LiveServer, collect, make_client, start_msg

GOOD = start_msg()


def _expect_close(ws, messages, code: int, text: str = "") -> dict:
    for m in messages:
        if isinstance(m, bytes):
            ws.send_bytes(m)
        else:
            ws.send_text(m if isinstance(m, str) else json.dumps(m))
    out = collect(ws)
    assert out["code"] == code, out["messages"][-3:]
    if text:
        err = [m for m in out["messages"] if m["type"] == "error"]
        assert err and text in err[0]["message"], out["messages"][-3:]
    return out


def _events(t: list[int], x: int = 60, y: int = 60) -> np.ndarray:
    from events import EVENT_DTYPE

    ev = np.zeros(len(t), EVENT_DTYPE)
    ev["t"], ev["x"], ev["y"], ev["p"] = t, x, y, 1
    return ev


def _other_stream_works(c, events) -> None:
    with c.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg(emit=1)))
        assert json.loads(ws.receive_text())["type"] == "ready"
        ws.send_bytes(encode_events(events))
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    assert out["code"] == 1000 and len(out["frames"]) > 0


def _slots(app) -> int:
    """Stream slots taken (owned by the scheduler; by the app state before issue 9)."""
    sched = app.state.scheduler
    return sched.slots if hasattr(sched, "slots") else app.state.stream_slots


def _wait(cond, what: str, limit: float = 20.0) -> None:
    """Wait for a state (polls; the limit only turns a hang into a failure)."""
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > limit:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------- 1. amplification through time
def test_time_amplification_is_refused_before_the_work(checkpoints_dir, mnist_dvs_events):
    s = Settings(checkpoints_dir=checkpoints_dir, max_pending_bins=1000, max_upload_bins=500, _env_file=None)
    with make_client(s) as c:
        # dt_us below the floor: refused at the start message / as a query
        with c.websocket_connect("/v1/stream") as ws:
            _expect_close(ws, [start_msg(dt_us=1)], 1008, "min_dt_us")
        r = c.post(
            "/v1/naturalize",
            content=b"t,x,y,p\n0,1,1,1\n1000000,1,1,1\n",
            params={"filename": "a.csv", "dt_us": 1, "model": "tiny"},
        )
        assert r.status_code == 422 and "min_dt_us" in r.json()["detail"]
        # events just under max_gap_us apart: ~99 bins each, 20 of them pass max_pending_bins at once
        t = [i * 990_000 for i in range(20)]
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(GOOD))
            json.loads(ws.receive_text())
            _expect_close(ws, [encode_events(_events(t))], 1008, "bins")
        # an upload whose event times span more bins than max_upload_bins: 413 before binning
        csv = "t,x,y,p\n" + "".join(f"{v},60,60,1\n" for v in t)
        r = c.post("/v1/naturalize", content=csv.encode(), params={"filename": "a.csv", "model": "tiny"})
        assert r.status_code == 413 and "bins" in r.json()["detail"]
        _other_stream_works(c, mnist_dvs_events[:2000])


def test_estimate_bins_counts_runs_without_gaps():
    from service.guard import estimate_bins

    t = np.array([0, 5, 25, 3_000_000, 3_000_001, 3_020_000], dtype=np.int64)
    # run 1: bins 0..2 (3); gap > max_gap: run 2 from bin 300000 to 302000 // 10 = 302
    assert estimate_bins(t, 10, 1_000_000) == 3 + (302_000 - 300_000 + 1)
    assert estimate_bins(t[:3], 10, None) == 3
    assert estimate_bins(np.zeros(0, np.int64), 10, 1) == 0


# ---------------------------------------------------------------------------- 2. memory that never comes back
@pytest.fixture(scope="module")
def live(checkpoints_dir):
    srv = LiveServer(Settings(checkpoints_dir=checkpoints_dir, stats_interval_s=0.2, _env_file=None))
    yield srv
    srv.stop()


@pytest.mark.parametrize("case", ["end", "protocol_error", "disconnect", "tick_failure"])
def test_closed_sessions_are_freed_without_the_cycle_collector(live, mnist_dvs_events, case):
    """The session object is gone when its stream closes, by reference counting alone (the
    collector is off): no reference cycle keeps a closed stream's buffers alive. Against a real
    uvicorn server (the TestClient's portal can keep a cancelled handler's frames in an
    exception it stores)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    sched = live.app.state.scheduler
    gc.collect()
    gc.disable()
    ref = None
    try:
        with connect(live.ws) as ws:
            ws.send(json.dumps(start_msg(emit=1)))
            ready = json.loads(ws.recv(timeout=30))
            ref = weakref.ref(sched.sessions[ready["session"]])
            ws.send(encode_events(mnist_dvs_events[:1500]))
            if case == "tick_failure":
                victim = ready["session"]

                def fault(step, sessions):
                    if step == "step" and any(s.id == victim for s in sessions):
                        raise RuntimeError("injected")

                sched.fault = fault
                ws.send(encode_events(mnist_dvs_events[1500:3000]))
            elif case == "end":
                ws.send(json.dumps({"type": "end"}))
            elif case == "protocol_error":
                ws.send(b"VDEV\x02\x00\x00\x00\x00\x00\x00\x00")
            if case != "disconnect":
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        ws.recv(timeout=30)
                code = {"end": 1000, "protocol_error": 1003, "tick_failure": 1011}[case]
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code
        sched.fault = None
        _wait(lambda: ready["session"] not in sched.sessions and _slots(live.app) == 0, "stream closed")
        _wait(lambda: ref() is None, "session freed")
    finally:
        sched.fault = None
        gc.enable()
        if ref is not None and ref() is not None:
            print([type(r) for r in gc.get_referrers(ref())])


# ---------------------------------------------------------------------------- 3. amplification through space
def test_huge_sensor_upload_stays_small(client):
    """A few-byte CSV whose events make a 16384 x 16384 sensor, roi=full: pooled to the model's
    input without tables of the ROI's area (tracemalloc sees numpy's allocations)."""
    import tracemalloc

    csv = b"t,x,y,p\n0,0,0,1\n10,16383,16383,0\n20,8000,8000,1\n"
    tracemalloc.start()
    try:
        r = client.post(
            "/v1/naturalize", content=csv, params={"filename": "a.csv", "roi": "full", "model": "tiny"}
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert r.json()["pool"] == 16384 // 26 and peak < 64 * 1024 * 1024, peak


# ---------------------------------------------------------------------------- 4. cross-stream failure
TICK_STEPS = ["prepare", "step", "record", "window", "decode", "encode"]


@pytest.mark.parametrize("step", TICK_STEPS)
def test_a_failure_in_any_tick_step_closes_only_that_stream(client, mnist_dvs_events, step):
    """Two streams in the same ticks; an exception in ``step`` for one of them closes it with
    1011 and the other one ends normally with every frame."""
    sched = client.app.state.scheduler
    ev = mnist_dvs_events[:3000]
    with client.websocket_connect("/v1/stream") as bad, client.websocket_connect("/v1/stream") as good:
        bad.send_text(json.dumps(start_msg(emit=1)))
        victim = json.loads(bad.receive_text())["session"]
        good.send_text(json.dumps(start_msg(emit=1)))
        assert json.loads(good.receive_text())["type"] == "ready"

        def fault(name, sessions):
            if name == step and any(s.id == victim for s in sessions):
                raise RuntimeError(f"injected in {name}")

        sched.fault = fault
        try:
            bad.send_bytes(encode_events(ev))
            good.send_bytes(encode_events(ev))
            out_bad = collect(bad)
            good.send_text(json.dumps({"type": "end"}))
            out_good = collect(good)
        finally:
            sched.fault = None
    assert out_bad["code"] == 1011
    assert [m for m in out_bad["messages"] if m["type"] == "error"][0]["code"] == 1011
    assert out_good["code"] == 1000
    end = [m for m in out_good["messages"] if m["type"] == "end"][0]
    assert end["bins"] > 0 and len(out_good["frames"]) == end["bins"]


def test_spike_rows_never_overflow_the_frame_header(client):
    """emit="last" with spikes: the frame carries the latest 65535 spike rows (uint16 field)."""
    from service.protocol import decode_frame
    from service.session import MAX_SPIKE_ROWS, Session

    entry = client.app.state.registry.get(None)
    roi, pool = entry.resolve_roi(128, 128, "centre")
    s = Session(
        entry,
        roi,
        pool,
        entry.dt_us,
        None,
        0,
        spikes=True,
        inputs=False,
        fmt="binary",
        encoding="packed",
        t0_us=None,
        max_gap_us=entry.dt_us * 10,
        out_queue_frames=4,
    )
    row = np.zeros(entry.engine.n_readout, np.uint8)
    for i in range(MAX_SPIKE_ROWS + 10):
        s.since_emit.append(row)
    s.steps = MAX_SPIKE_ROWS + 10
    msg = client.app.state.scheduler._frame_message(s, np.zeros(entry.engine.image_shape, np.uint8), 0.0)
    frame = decode_frame(msg.data)
    assert frame.spikes is not None and frame.spikes.shape == (MAX_SPIKE_ROWS, entry.engine.n_readout)


# ---------------------------------------------------------------------------- 5. cheap messages
@pytest.mark.parametrize("kind", ["ping", "flush"])
def test_control_message_floods_close_the_flooder_only(checkpoints_dir, mnist_dvs_events, kind):
    s = Settings(checkpoints_dir=checkpoints_dir, control_rate_per_s=5, control_burst=20, _env_file=None)
    with make_client(s) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(GOOD))
            json.loads(ws.receive_text())
            ws.send_bytes(encode_events(mnist_dvs_events[:500]))
            _expect_close(ws, [{"type": kind}] * 200, 1008, "text messages per second")
        _other_stream_works(c, mnist_dvs_events[:2000])


def test_message_floods_close_the_flooder(checkpoints_dir, mnist_dvs_events):
    s = Settings(checkpoints_dir=checkpoints_dir, message_rate_per_s=10, message_burst=50, _env_file=None)
    with make_client(s) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(GOOD))
            json.loads(ws.receive_text())
            empty = encode_events(mnist_dvs_events[:0])
            _expect_close(ws, [empty] * 200, 1008, "messages per second")


def test_flushes_count_against_pending_bins(checkpoints_dir):
    s = Settings(checkpoints_dir=checkpoints_dir, max_pending_bins=30, control_burst=1000, _env_file=None)
    with make_client(s) as c:
        sched = c.app.state.scheduler
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(GOOD))
            json.loads(ws.receive_text())
            sched.fault = lambda step, sessions: (_ for _ in ()).throw(AssertionError("no ticks"))
            real = sched._collect
            sched._collect = lambda: []  # nothing is stepped: the flushes pile up
            try:
                _expect_close(ws, [{"type": "flush"}] * 100, 1008, "flushes waiting")
            finally:
                sched._collect = real
                sched.fault = None


# ---------------------------------------------------------------------------- 6. uploads without a budget
def test_upload_budgets(checkpoints_dir, mnist_dvs_bytes, shared_events):
    aedat4 = (shared_events / "aedat4" / "tonic_sample.aedat4").read_bytes()
    s = Settings(checkpoints_dir=checkpoints_dir, max_decompressed_bytes=64 * 1024, _env_file=None)
    with make_client(s) as c:
        r = c.post("/v1/naturalize", content=aedat4)
        assert r.status_code == 413 and "max_decompressed" in r.json()["detail"]
    s = Settings(checkpoints_dir=checkpoints_dir, max_upload_cpu_s=0.0, _env_file=None)
    with make_client(s) as c:
        r = c.post("/v1/naturalize", content=mnist_dvs_bytes)
        assert r.status_code == 413 and "CPU budget" in r.json()["detail"]


def test_upload_work_stops_when_the_client_leaves(client, mnist_dvs_events):
    """The budget of an upload whose client is gone cancels the pipeline between chunks."""
    import asyncio

    from fastapi import HTTPException

    from service.deps import run_budgeted
    from service.guard import Budget
    from service.pipeline import RunOptions, naturalize

    entry = client.app.state.registry.get(None)
    roi, pool = entry.resolve_roi(128, 128, None)
    calls = []

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    budget = Budget(60.0)

    def check() -> None:
        calls.append(1)
        while not budget.cancelled.is_set():  # the watcher sees the disconnect
            time.sleep(0.01)
        budget.check()

    opts = RunOptions(roi=roi, pool=pool, dt_us=entry.dt_us, emit=3, spikes=False, seed=0, check=check)
    with pytest.raises(HTTPException) as exc:
        asyncio.run(run_budgeted(Gone(), budget, naturalize, entry, mnist_dvs_events, opts))  # type: ignore[arg-type]
    assert exc.value.status_code == 499 and len(calls) == 1


def test_concurrent_uploads_are_bounded(checkpoints_dir, mnist_dvs_bytes):
    srv = LiveServer(Settings(checkpoints_dir=checkpoints_dir, max_concurrent_uploads=1, _env_file=None))
    try:
        import httpx

        hold = socket.create_connection(("127.0.0.1", srv.port))
        hold.sendall(b"POST /v1/naturalize HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        _wait(lambda: srv.app.state.uploads_running == 1, "the first upload holds the slot")
        r = httpx.post(srv.http + "/v1/naturalize", content=mnist_dvs_bytes, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        hold.close()
        _wait(lambda: srv.app.state.uploads_running == 0, "the slot is free again")
        r = httpx.post(srv.http + "/v1/naturalize", content=mnist_dvs_bytes, timeout=60)
        assert r.status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- 7. unauthenticated slot exhaustion
def test_unauthenticated_clients_take_no_session_slot(checkpoints_dir):
    s = Settings(checkpoints_dir=checkpoints_dir, api_keys="sekret", max_sessions=1, _env_file=None)
    with make_client(s) as c:
        with c.websocket_connect("/v1/stream") as idle1, c.websocket_connect("/v1/stream") as idle2:
            # two connections that never authenticate, and one with a wrong key in the header
            with c.websocket_connect("/v1/stream", headers={"Authorization": "Bearer nope"}) as bad:
                _expect_close(bad, [], 1008, "API key")
            with c.websocket_connect("/v1/stream") as ws:
                ws.send_text(json.dumps(start_msg(api_key="sekret")))
                assert json.loads(ws.receive_text())["type"] == "ready"
            assert _slots(c.app) == 0
            del idle1, idle2


def test_unauthenticated_connections_buffer_little(live, mnist_dvs_events):
    """Until the stream has started (key checked, ready sent), a message may have 64 KiB: larger
    ones are refused by the websocket layer (1009) before they are buffered; after it, the
    configured max_message_bytes applies."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from service.guard import PRE_START_MAX_BYTES

    with connect(live.ws, max_size=None) as ws:
        ws.send(json.dumps({**start_msg(), "pad": "x" * PRE_START_MAX_BYTES}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    big = encode_events(mnist_dvs_events[:8000])  # ~104 kB, over the pre-start limit
    assert len(big) > PRE_START_MAX_BYTES
    with connect(live.ws, max_size=None) as ws:
        ws.send(json.dumps(start_msg(emit=1)))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(big)
        ws.send(json.dumps({"type": "end"}))
        frames = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames += isinstance(ws.recv(timeout=30), bytes)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000 and frames > 0


def test_packets_sent_right_after_the_start_message(live, mnist_dvs_events):
    """A client need not wait for ``ready``: what it sends after its start message is held
    unparsed (the socket not read) until the stream has started, then taken at full size."""
    import socket as _socket

    from bench.service import ws_frame
    from service.protocol import decode_frame

    big = encode_events(mnist_dvs_events[:8000])  # ~104 kB: over the pre-start limit
    sock = _socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.settimeout(30)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    rest = head.split(b"\r\n\r\n", 1)[1]
    # start, packets and end in one write: nothing waits for the ready
    sock.sendall(
        ws_frame(1, json.dumps(start_msg(emit=1)).encode())
        + ws_frame(2, big)
        + ws_frame(1, b'{"type": "end"}')
    )
    data = rest
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    sock.close()
    kinds, frames, code, i = [], 0, None, 0
    while i + 2 <= len(data):
        op, n, o = data[i] & 0x0F, data[i + 1] & 0x7F, 2
        if n == 126:
            n, o = int.from_bytes(data[i + 2 : i + 4], "big"), 4
        elif n == 127:
            n, o = int.from_bytes(data[i + 2 : i + 10], "big"), 10
        payload = data[i + o : i + o + n]
        i += o + n
        if op == 1:
            kinds.append(json.loads(payload)["type"])
        elif op == 2:
            decode_frame(payload)
            frames += 1
        elif op == 8:
            code = int.from_bytes(payload[:2], "big")
    assert kinds[0] == "ready" and "end" in kinds and frames > 0 and code == 1000, (kinds, frames, code)


def test_start_message_timeout(checkpoints_dir):
    with make_client(Settings(checkpoints_dir=checkpoints_dir, start_timeout_s=0.2, _env_file=None)) as c:
        with c.websocket_connect("/v1/stream") as ws:
            _expect_close(ws, [], 1001, "idle")


# ---------------------------------------------------------------------------- 8. broken checkpoints
def test_broken_checkpoints_are_skipped(tmp_path: Path, checkpoints_dir: Path):
    import shutil

    shutil.copytree(checkpoints_dir / "tiny", tmp_path / "good")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    shutil.copytree(checkpoints_dir / "tiny", tmp_path / "negative")
    cfg = json.loads((tmp_path / "negative" / "config.json").read_text())

    def negate(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "input_shape":
                    o[k] = [-2, 26, 26]
                else:
                    negate(v)

    negate(cfg)
    (tmp_path / "negative" / "config.json").write_text(json.dumps(cfg))
    with make_client(Settings(checkpoints_dir=tmp_path, _env_file=None)) as c:
        body = c.get("/readyz").json()
        assert body["ready"] is True and body["models"] == ["good"]
        assert body["failed"] == ["deep", "negative"]
        errors = c.get("/v1/models").json()["errors"]
        assert set(errors) == {"deep", "negative"} and all(str(tmp_path) not in e for e in errors.values())


# ---------------------------------------------------------------------------- 9. slowloris, connections
@pytest.fixture(scope="module")
def guarded(checkpoints_dir):
    srv = LiveServer(
        Settings(
            checkpoints_dir=checkpoints_dir,
            header_timeout_s=0.3,
            body_timeout_s=0.3,
            max_connections_per_client=8,
            _env_file=None,
        )
    )
    yield srv
    srv.stop()


def _closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection; what it sent."""
    sock.settimeout(30)
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_slow_headers_and_bodies_are_cut(guarded):
    heads = socket.create_connection(("127.0.0.1", guarded.port))
    heads.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
    assert _closed_by_server(heads) == b""
    ws = socket.create_connection(("127.0.0.1", guarded.port))
    ws.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # a handshake that never ends
    assert _closed_by_server(ws) == b""
    body = socket.create_connection(("127.0.0.1", guarded.port))
    body.sendall(b"POST /v1/naturalize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    answer = _closed_by_server(body)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    for s in (heads, ws, body):
        s.close()


def test_connections_per_client_are_limited(guarded):
    import httpx

    socks = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(8)]
    extra = socket.create_connection(("127.0.0.1", guarded.port))
    assert _closed_by_server(extra) == b""  # refused at once, before any byte
    for s in socks:
        s.close()
    _wait(lambda: not guarded.server.server_state.vdib_guard.per_client, "connections released")
    assert httpx.get(guarded.http + "/healthz", timeout=10).status_code == 200
    # upgraded (websocket) connections give their count back too, and uvicorn's own bookkeeping runs
    from websockets.sync.client import connect

    for _ in range(12):  # more than the limit of 8, one after the other
        with connect(guarded.ws) as ws:
            ws.send(json.dumps(start_msg()))
            assert json.loads(ws.recv())["type"] == "ready"
    _wait(lambda: not guarded.server.server_state.vdib_guard.per_client, "websocket connections released")
    _wait(lambda: len(guarded.server.server_state.connections) == 0, "uvicorn's connections released")


def test_wsfast_reassembles_trickled_frames_in_place():
    """A frame trickled a few bytes at a time is kept in one growing buffer (no re-copy per read)
    and parsed once complete, whatever the split."""
    from service.wsfast import FastWebSocketProtocol

    payload = bytes(range(256)) * 40
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = bytes([0x82, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + masked

    class P(FastWebSocketProtocol):
        def __init__(self) -> None:  # only the parser's state
            import asyncio

            from websockets.protocol import State

            self._buf = bytearray()
            self._need = 0
            self._fast = True
            self._limit = 1 << 20
            self.queue = asyncio.Queue()
            self.close_sent = False
            self.conn = type("C", (), {"state": State.OPEN})()
            self.read_paused = False
            self._holding = False
            self._parked = False
            self._answered = True  # a started stream
            self.paused = 0
            self.transport = type(
                "T",
                (),
                {
                    "pause_reading": lambda _t: setattr(self, "paused", self.paused + 1),
                    "resume_reading": lambda _t: None,
                    "is_closing": lambda _t: False,
                },
            )()

    for step in (1, 7, 1000):
        p = P()
        buf_id = id(p._buf)
        for a in range(0, len(frame), step):
            p.data_received(frame[a : a + step])
            assert id(p._buf) == buf_id
        msg = p.queue.get_nowait()
        assert msg["bytes"] == payload and p.queue.empty() and not p._buf and not p.paused
    # a flood of small frames in one read: once 64 wait, neither parsing nor reading goes on
    # (backpressure); the rest is parsed as the app takes messages, none once it has closed
    small = bytes([0x82, 0x80 | 3]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"abc"))
    p = P()
    p.data_received(small * 200)
    assert p.read_paused and p._parked and p.queue.qsize() == 64 and len(p._buf) == 136 * len(small)
    p.data_received(small * 10)  # read before the pause took effect: kept, not parsed
    assert p.queue.qsize() == 64 and len(p._buf) == 146 * len(small)
    taken = 0
    while not p.queue.empty() or p._parked:
        while not p.queue.empty():
            assert p.queue.get_nowait()["bytes"] == b"abc"
            taken += 1
        if p._parked:
            p._unpark()
    assert taken == 210 and not p._buf


# ---------------------------------------------------------------------------- 10. bad input, not 500/1011
def test_bad_input_is_4xx_or_1003_1007_never_500_1011(client, mnist_dvs_bytes, shared_events):
    r = client.post("/v1/naturalize", content=mnist_dvs_bytes, params={"roi": "65500,0,52,52"})
    assert r.status_code == 422 and "coordinate" in r.json()["detail"]
    with client.websocket_connect("/v1/stream") as ws:
        _expect_close(
            ws,
            [start_msg(sensor={"width": 65536, "height": 65536}, roi=[65500, 0, 52, 52], model="tiny")],
            1003,
        )
    with client.websocket_connect("/v1/stream") as ws:
        _expect_close(ws, [start_msg(t0_us=2**63 - 1)], 1007, "t0_us")
    with client.websocket_connect("/v1/stream") as ws:
        _expect_close(ws, ['{"type": "start", "x": ' + "[" * 5000 + "]" * 5000 + "}"], 1007, "nested")
    # an AEDAT 4 stream cut inside its 12-byte magic is a stream like any other
    data = (shared_events / "aedat4" / "tonic_sample.aedat4").read_bytes()
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg(sensor={"width": 320, "height": 240}, emit=3, model="tiny")))
        assert json.loads(ws.receive_text())["type"] == "ready"
        for a, b in ((0, 5), (5, 11), (11, 40_000), (40_000, len(data))):
            ws.send_bytes(data[a:b])
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    assert out["code"] == 1000 and len(out["frames"]) > 0


# ---------------------------------------------------------------------------- 11. clients, probes, logs
def test_readyz_shows_nothing_internal(tmp_path: Path, checkpoints_dir: Path):
    import shutil

    shutil.copytree(checkpoints_dir / "tiny", tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    s = Settings(checkpoints_dir=tmp_path, api_keys="sekret", _env_file=None)
    with make_client(s) as c:
        text = c.get("/readyz").text
        assert str(tmp_path) not in text and "JSON" not in text and "bad" in text
        assert c.get("/v1/models").status_code == 401


def test_api_keys_in_query_strings_are_not_logged():
    from service.guard import RedactQuery, install_log_redaction

    install_log_redaction()
    rec = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/v1/stream?model=a&api_key=sekret&token=t2", "1.1", 101),
        None,
    )
    for f in logging.getLogger("uvicorn.access").filters:
        f.filter(rec)
    line = rec.getMessage()
    assert "sekret" not in line and "t2" not in line and "model=a" in line
    assert any(isinstance(f, RedactQuery) for f in logging.getLogger("uvicorn.error").filters)


def test_bench_client_answers_pings():
    import asyncio

    from bench.service import _RawStream, ws_frame

    class T:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def is_closing(self) -> bool:
            return False

    async def go() -> list[bytes]:
        p = _RawStream(1, lambda b: None, lambda b: None)
        p.transport = T()
        p.upgraded = True
        p.data_received(bytes([0x89, 4]) + b"abcd")  # a server ping (unmasked)
        return p.transport.sent

    sent = asyncio.run(go())
    assert len(sent) == 1 and sent[0][0] == 0x8A  # a pong
    assert len(ws_frame(10, b"abcd")) == len(sent[0])


def test_stream_ingest_cpu_budget(checkpoints_dir, mnist_dvs_events):
    s = Settings(
        checkpoints_dir=checkpoints_dir, ingest_cpu_per_s=0.0, ingest_cpu_burst_s=0.0, _env_file=None
    )
    with make_client(s) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(GOOD))
            assert json.loads(ws.receive_text())["limits"]["ingest_cpu_per_s"] == 0.0
            # the first message is free (it may load compiled kernels), the second is charged
            _expect_close(
                ws,
                [encode_events(mnist_dvs_events[:100]), encode_events(mnist_dvs_events[100:200])],
                1008,
                "CPU",
            )


def test_memory_trimmer_runs_at_most_once_per_interval():
    import asyncio

    from service.guard import MemoryTrimmer

    async def go(t: MemoryTrimmer) -> int:
        for _ in range(5):
            t.request()
        while t._running:
            await asyncio.sleep(0.01)
        return t.trims

    t = MemoryTrimmer(interval_s=3600)
    if t._trim is None:
        pytest.skip("no glibc malloc_trim")
    assert asyncio.run(go(t)) == 1

    async def trailing(t: MemoryTrimmer) -> int:
        t.request()
        while t._running:
            await asyncio.sleep(0.01)
        for _ in range(5):  # within the interval: one trailing trim at its end
            t.request()
        while t._pending or t._running:
            await asyncio.sleep(0.01)
        return t.trims

    assert asyncio.run(trailing(MemoryTrimmer(interval_s=0.2))) == 2

    async def during(t: MemoryTrimmer) -> int:
        t.request()
        t.request()  # while the first runs (or is about to): one more after it
        await asyncio.sleep(0.05)
        while t._pending or t._running or t._again:
            await asyncio.sleep(0.01)
        return t.trims

    assert asyncio.run(during(MemoryTrimmer(interval_s=0.2))) == 2
