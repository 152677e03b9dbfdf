"""WS /v1/stream: equality with uploads in any chunking, batching, flush/end, gaps, late events,
and a clear close code for every bad input (other streams unaffected)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from service.protocol import encode_events
from service.settings import Settings
from tests.service.conftest import collect, make_client, start_msg, stream_events


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def _upload(client, data: bytes, **q) -> dict:
    r = client.post("/v1/naturalize?" + "&".join(f"{k}={v}" for k, v in q.items()), content=data)
    assert r.status_code == 200, r.text
    return r.json()


def _same_frames(stream_frames, upload_json, tol: int = 0) -> None:
    """Frames equal the upload's: exactly for a lone stream; within ``tol`` grey levels when the
    scheduler batched streams (a GEMM over B rows may round differently from B = 1)."""
    up = upload_json["frames"]
    assert len(stream_frames) == len(up) > 0
    for f, u in zip(stream_frames, up):
        assert f.bin == u["bin"] and f.bin_end_us == u["bin_end_us"]
        a, b = f.image().astype(int), _png(base64.b64decode(u["image"])).astype(int)
        assert np.abs(a - b).max() <= tol


@pytest.fixture(scope="module")
def reference(client, mnist_dvs_bytes):
    return _upload(client, mnist_dvs_bytes, seed=11, emit=4, spikes="bitpacked")


@hsettings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 15743), max_size=40, unique=True))
def test_any_chunking_equals_upload(client, mnist_dvs_bytes, mnist_dvs_events, reference, cuts):
    out = stream_events(client, mnist_dvs_events, sorted(cuts), seed=11, emit=4, spikes=True)
    assert out["code"] == 1000
    _same_frames(out["frames"], reference)
    # spikes: the rows of all frames concatenated are the upload's raster
    from service.render import unpack_spikes

    sp = reference["spikes"]
    raster = unpack_spikes(base64.b64decode(sp["data"]), sp["rows"], sp["n_readout"])
    got = np.concatenate([f.spikes for f in out["frames"]])
    assert np.array_equal(got, raster)
    end = [m for m in out["messages"] if m["type"] == "end"][0]
    assert end["events"] == 15744 and end["bins"] == reference["stats"]["bins"]
    assert end["frames_sent"] == len(reference["frames"]) and end["dropped_frames"] == 0


def test_single_event_chunks_and_json_format(client, mnist_dvs_events, mnist_dvs_bytes):
    ev = mnist_dvs_events[:3000]
    from events import write_npz

    buf = io.BytesIO()
    write_npz(buf, ev, 128, 128)
    ref = _upload(client, buf.getvalue(), seed=2, emit=1)
    out = stream_events(
        client, ev, list(range(1, 400)) + list(range(400, 3000, 97)), seed=2, emit=1, format="json"
    )
    frames = out["frames"]
    assert len(frames) == len(ref["frames"])
    for f, u in zip(frames, ref["frames"]):
        # the same pixels (streamed PNGs are stored uncompressed by default, uploads use zlib level 1)
        assert f["bin"] == u["bin"] and np.array_equal(
            _png(base64.b64decode(f["image"])), _png(base64.b64decode(u["image"]))
        )


def test_concurrent_streams_batched_equal_uploads(client, mnist_dvs_events, mnist_dvs_bytes):
    """Three streams interleaved in one scheduler: each equals its own upload (own generator)."""
    seeds = (1, 2, 3)
    refs = {s: _upload(client, mnist_dvs_bytes, seed=s, emit=2) for s in seeds}
    metrics_before = client.get("/metrics").text
    wss = [client.websocket_connect("/v1/stream").__enter__() for _ in seeds]
    for ws, s in zip(wss, seeds):
        ws.send_text(json.dumps(start_msg(seed=s, emit=2)))
        assert json.loads(ws.receive_text())["type"] == "ready"
    for a in range(0, len(mnist_dvs_events), 500):
        for ws in wss:
            ws.send_bytes(encode_events(mnist_dvs_events[a : a + 500]))
    for ws in wss:
        ws.send_text(json.dumps({"type": "end"}))
    outs = [collect(ws) for ws in wss]
    for ws in wss:
        ws.__exit__(None, None, None)
    for out, s in zip(outs, seeds):
        assert out["code"] == 1000
        _same_frames(out["frames"], refs[s], tol=1)
    assert (
        refs[1]["frames"][-1]["image"] != refs[2]["frames"][-1]["image"]
        or refs[1]["stats"]["spike_rate"] != refs[2]["stats"]["spike_rate"]
    )

    # the scheduler did batch several streams into one step at least once
    def batch_stats(text):
        vals = {}
        for line in text.splitlines():
            if line.startswith("vdib_batch_size_sum") or line.startswith("vdib_batch_size_count"):
                k, v = line.split()
                vals[k] = float(v)
        return vals

    b0, b1 = batch_stats(metrics_before), batch_stats(client.get("/metrics").text)
    steps = b1["vdib_batch_size_sum"] - b0.get("vdib_batch_size_sum", 0)
    ticks = b1["vdib_batch_size_count"] - b0.get("vdib_batch_size_count", 0)
    assert steps == 3 * refs[1]["stats"]["bins"]
    assert ticks < steps  # some ticks stepped more than one stream


def test_flush_emits_last_bin_then_continues(client, mnist_dvs_events):
    ev = mnist_dvs_events
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg(emit="last")))
        json.loads(ws.receive_text())
        ws.send_bytes(encode_events(ev[:5000]))
        ws.send_text(json.dumps({"type": "flush"}))
        from service.protocol import decode_frame

        while True:
            m = ws.receive()
            if m.get("bytes"):
                first = decode_frame(m["bytes"])
                break
        t = ev["t"]
        assert first.bin_end_us == int(t[0]) + ((int(t[4999]) - int(t[0])) // 10_000 + 1) * 10_000
        ws.send_bytes(encode_events(ev[5000:]))
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    assert out["code"] == 1000 and len(out["frames"]) == 1
    end = [m for m in out["messages"] if m["type"] == "end"][0]
    # events of the flushed bin that arrive after the flush are late
    assert end["late_events"] == int(np.count_nonzero(t[5000:] < first.bin_end_us))


def test_gap_resets_and_late_events(client):
    from events import EVENT_DTYPE

    ev = np.zeros(6, EVENT_DTYPE)
    ev["t"] = [0, 15_000, 25_000, 5_000, 3_000_000, 3_010_000]  # t=5000 arrives late
    ev["x"], ev["y"] = 60, 60
    out = stream_events(client, ev, [3, 4], emit=1)
    end = [m for m in out["messages"] if m["type"] == "end"][0]
    assert end["late_events"] == 1 and end["gaps"] == 1
    # bins 0..2 before the gap, then 2 after it (not 300 empty ones)
    assert end["bins"] == 5
    assert [f.bin_end_us for f in out["frames"]] == [10_000, 20_000, 30_000, 3_010_000, 3_020_000]


def test_aedat4_bytes_stream_equals_upload(client, shared_events):
    data = (shared_events / "aedat4" / "tonic_sample.aedat4").read_bytes()
    ref = _upload(client, data, seed=5, emit=3, model="tiny")  # a 320x240 sensor: the digit model by name
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(
            json.dumps(start_msg(sensor={"width": 320, "height": 240}, seed=5, emit=3, model="tiny"))
        )
        assert json.loads(ws.receive_text())["type"] == "ready"
        for a in range(0, len(data), 65_537):  # pieces that split packets and the header
            ws.send_bytes(data[a : a + 65_537])
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    assert out["code"] == 1000
    _same_frames(out["frames"], ref)


def test_stats_are_sent_periodically(client, mnist_dvs_events):
    import time

    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg()))
        json.loads(ws.receive_text())
        ws.send_bytes(encode_events(mnist_dvs_events[:2000]))
        time.sleep(0.5)  # stats_interval_s = 0.2 in the test settings
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    stats = [m for m in out["messages"] if m["type"] == "stats"]
    assert len(stats) >= 1 and stats[-1]["events"] == 2000


# ---------------------------------------------------------------------------- bad input
def _expect_close(client, messages, code, text, url="/v1/stream", **kw):
    with client.websocket_connect(url, **kw) as ws:
        for m in messages:
            if isinstance(m, bytes):
                ws.send_bytes(m)
            else:
                ws.send_text(m if isinstance(m, str) else json.dumps(m))
        out = collect(ws)
    assert out["code"] == code, out
    err = [m for m in out["messages"] if m["type"] == "error"]
    assert err and err[0]["code"] == code and text in err[0]["message"], out["messages"]
    return out


GOOD = start_msg()


@pytest.mark.parametrize(
    "messages, code, text",
    [
        (["{not json"], 1007, "not JSON"),
        ([b"VDEV\x01\x00\x00\x00\x00\x00\x00\x00"], 1003, "first message"),
        ([{"type": "flush"}], 1003, "expected a 'start'"),
        ([start_msg(protocol=2)], 1003, "protocol version"),
        ([start_msg(model="nope")], 1003, "unknown model"),
        ([start_msg(sensor={"width": 0, "height": 5})], 1007, "sensor.width"),
        ([start_msg(roi=[0, 0, 27, 27])], 1003, "multiple"),
        ([start_msg(emit=0)], 1007, "emit"),
        ([start_msg(colour="blue")], 1007, "colour"),
        ([GOOD, b"XXXX\x01\x00\x00\x00\x00\x00\x00\x00"], 1003, "neither"),
        ([GOOD, b"VDEV\x01\x00\x00\x00\x05\x00\x00\x00" + b"\x00" * 13], 1007, "says 5 events"),
        ([GOOD, b"VDEV\x02\x00\x00\x00\x00\x00\x00\x00"], 1003, "version 2"),
        ([GOOD, b"VDEV\x01\x00\x00\x00\x01\x00\x00\x00" + b"\x00" * 12 + b"\x07"], 1007, "polarity"),
        ([GOOD, b"#!AER-DAT4.0\r\n\xff\xff\xff\x7f"], 1007, "header size"),
        ([GOOD, {"type": "dance"}], 1003, "unknown message type"),
        ([GOOD, GOOD], 1003, "already started"),
        ([GOOD, "[1, 2]"], 1007, "JSON object"),
    ],
)
def test_protocol_errors_close_codes(client, messages, code, text):
    out = _expect_close(client, messages, code, text)
    if messages[0] is GOOD:
        assert out["messages"][0]["type"] == "ready"


def test_limits_close_codes(checkpoints_dir, mnist_dvs_events):
    s = Settings(
        checkpoints_dir=checkpoints_dir,
        max_message_bytes=1000,
        max_sessions=1,
        max_pending_bins=50,
        idle_timeout_s=0.4,
        _env_file=None,
    )
    with make_client(s) as c:
        _expect_close(c, [GOOD, encode_events(mnist_dvs_events[:100])], 1009, "exceeds 1000")
        _expect_close(c, ["x" * 2000], 1009, "exceeds")
        _expect_close(c, [GOOD], 1001, "idle")
        # pending-bin bound: 60 empty bins arrive at once
        from events import EVENT_DTYPE

        ev = np.zeros(2, EVENT_DTYPE)
        ev["t"] = [0, 600_000]
        _expect_close(c, [GOOD, encode_events(ev)], 1008, "bins waiting")
        # session limit: the second stream is refused with 1013, the first goes on
        with c.websocket_connect("/v1/stream") as ws1:
            ws1.send_text(json.dumps(GOOD))
            assert json.loads(ws1.receive_text())["type"] == "ready"
            _expect_close(c, [GOOD], 1013, "session limit")
            ws1.send_bytes(encode_events(mnist_dvs_events[:50]))
            ws1.send_text(json.dumps({"type": "end"}))
            out = collect(ws1)
            assert out["code"] == 1000 and len(out["frames"]) >= 1
        # the slot is free again
        with c.websocket_connect("/v1/stream") as ws2:
            ws2.send_text(json.dumps(GOOD))
            assert json.loads(ws2.receive_text())["type"] == "ready"


def test_api_key_websocket(checkpoints_dir, mnist_dvs_events):
    s = Settings(checkpoints_dir=checkpoints_dir, api_keys="sekret", _env_file=None)
    with make_client(s) as c:
        _expect_close(c, [GOOD], 1008, "API key")
        _expect_close(c, [start_msg(api_key="wrong")], 1008, "API key")
        # key in the start message
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(start_msg(api_key="sekret")))
            assert json.loads(ws.receive_text())["type"] == "ready"
        # key as a subprotocol; the server answers with the protocol name, never the key
        with c.websocket_connect("/v1/stream", subprotocols=["vdib.v1", "bearer.sekret"]) as ws:
            assert ws.accepted_subprotocol == "vdib.v1"
            ws.send_text(json.dumps(GOOD))
            assert json.loads(ws.receive_text())["type"] == "ready"
        # key in the Authorization header
        with c.websocket_connect("/v1/stream", headers={"Authorization": "Bearer sekret"}) as ws:
            ws.send_text(json.dumps(GOOD))
            assert json.loads(ws.receive_text())["type"] == "ready"


def test_internal_error_closes_1011_others_survive(client, mnist_dvs_events, monkeypatch):
    app = client.app
    entry = app.state.registry.get(None)
    real = entry.engine.step

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(entry.engine, "step", boom)
    out = _expect_close(client, [GOOD, encode_events(mnist_dvs_events[:500])], 1011, "internal error")
    assert out["messages"][0]["type"] == "ready"
    monkeypatch.setattr(entry.engine, "step", real)
    out = stream_events(client, mnist_dvs_events[:500], [], emit=1)
    assert out["code"] == 1000 and len(out["frames"]) > 0
    assert client.get("/healthz").status_code == 200


def test_disconnect_mid_stream_frees_session(client, mnist_dvs_events):
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(GOOD))
        json.loads(ws.receive_text())
        ws.send_bytes(encode_events(mnist_dvs_events[:3000]))
    import time

    for _ in range(100):
        if client.get("/readyz").json()["streams"] == 0:
            break
        time.sleep(0.02)
    assert client.get("/readyz").json()["streams"] == 0


def test_not_ready_service_refuses_streams(tmp_path):
    with make_client(Settings(checkpoints_dir=tmp_path, _env_file=None)) as c:
        with pytest.raises(WebSocketDisconnect) as exc:
            with c.websocket_connect("/v1/stream") as ws:
                ws.receive_text()
                ws.receive_text()
        assert exc.value.code == 1013


def test_session_queues_a_silence_as_one_run_and_checks_the_budget_first(client):
    """A silence shorter than max_gap_us is stepped bin by bin, but queued as one item (no frame
    per empty bin); a message that would pass max_pending_bins is refused before binning."""
    from events import EVENT_DTYPE
    from service.protocol import CLOSE_POLICY, ProtocolError
    from service.session import BIN, Session

    entry = client.app.state.registry.get(None)
    roi, pool = entry.resolve_roi(26, 26, "centre")

    def session(max_pending: int) -> Session:
        return Session(
            entry,
            roi,
            pool,
            1_000,
            2,
            0,
            spikes=False,
            inputs=False,
            fmt="binary",
            encoding="auto",
            t0_us=None,
            max_gap_us=10_000_000,
            out_queue_frames=4,
            max_pending_bins=max_pending,
        )

    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 100, 5_000_000]  # 4999 empty bins between bin 0 and bin 5000
    ev["x"], ev["y"], ev["p"] = 3, 4, 1
    s = session(10_000)
    n, segs = s.bin_message(encode_events(ev))
    assert n == 3 and s.queue(segs) == 5000 and s.pending.bins == 5000 and len(s.pending) == 2
    first, second, third = s.pending.popleft(), s.pending.popleft(), s.pending.popleft()
    assert first.kind == BIN and first.frame.sum() == 1 and first.bin_end_us == 1_000  # presence
    assert second.frame.sum() == 0 and (second.bin_end_us, third.bin_end_us) == (2_000, 3_000)
    assert s.pending.bins == 4997 and len(s.pending) == 1  # the rest of the run: still one item
    with pytest.raises(ProtocolError) as exc:
        session(1_000).bin_message(encode_events(ev))
    assert exc.value.code == CLOSE_POLICY and "bins waiting" in exc.value.message
