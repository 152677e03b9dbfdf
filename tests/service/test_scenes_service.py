"""The general-scene model served (issue 11, part 3): full-resolution uploads in every format,
frames at named timestamps, the default-model rule, websocket streams at the full sensor (two
sizes at once), and a stream equal to ``model.scene.reconstruct_events`` with the same seed.

The service runs a small random scene checkpoint next to a tiny digit model named ``mnist-dvs``
(declaring the 128x128 DVS128 sensor like the shipped one); the real recordings come from
``../shared/data`` (the tests skip without it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from tests.conftest import shared_data_path
from tests.service.conftest import collect, make_checkpoints, start_msg

DAVIS346 = ("events", "aedat4", "evlib_davis346_trimmed.aedat4")
DAVIS240 = ("events", "aedat2", "pyaedattools_IMU_translBoxes.aedat")
MNIST_DVS = ("events", "aedat2", "mnist_0_scale04_0001.aedat")


def small_scene(seed: int = 0):
    from model.scene import SceneNaturalizer, SceneNaturalizerConfig

    torch.manual_seed(seed)
    cfg = SceneNaturalizerConfig(
        hidden=(6,), n_readout=3, tau_e=4, n_basis=2, fb_memory=3, tau_d=5, decoder_widths=(6, 8, 10)
    )
    net = SceneNaturalizer(cfg)
    with torch.no_grad():  # spiking at a useful rate, and an image that depends on the spikes
        net.readout_bias.fill_(-1.0)
        net.hidden[0].weight.mul_(4.0)
    return net.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import save_checkpoint

    root = make_checkpoints(tmp_path_factory.mktemp("scene-ckpts"), ("mnist-dvs",))
    save_checkpoint(root / "scenes", small_scene(), {"note": "random test model"}, {}, {"source": "tests"})
    return root


@pytest.fixture(scope="module")
def settings(ckpts: Path) -> Settings:
    return Settings(checkpoints_dir=ckpts, idle_timeout_s=20, stats_interval_s=0.2, _env_file=None)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    from service.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def davis() -> Path:
    return shared_data_path(*DAVIS346)


@pytest.fixture(scope="module")
def davis_rec(davis: Path):
    import events

    return events.read(davis)


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def _b64png(s: str) -> np.ndarray:
    import base64

    return _png(base64.b64decode(s))


def _scene_net(client: TestClient):
    return client.app.state.registry.models["scenes"].engine.net


# ---------------------------------------------------------------------------- engine
def test_sized_engine_rows_step_like_single_streams() -> None:
    """Rows of a batched state, gathered in any order, step as each stream alone would."""
    from model.batching import stream_uniforms
    from service.scene_engine import SceneEngine

    eng = SceneEngine(small_scene(), "cpu").for_input((2, 21, 30))
    assert eng.n_readout == 3 * 11 * 15 and eng.image_shape == (21, 30)
    assert SceneEngine.for_input(eng.model, (2, 21, 30)) is eng  # one engine per size while used
    rng = np.random.default_rng(0)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    single = [eng.fresh_batch() for _ in range(3)]
    batch = eng.stack([eng.init_state() for _ in range(3)])
    rows = eng.unstack(batch, 3)
    for t in range(4):
        x = (rng.random((3, eng.n_inputs)) < 0.1).astype(np.float32) * 3
        u = [stream_uniforms(g, 1, eng.n_readout) for g in gens]
        order = [2, 0, 1] if t % 2 else [1, 2, 0]
        y, st = eng.step(x[order], eng.stack([rows[i] for i in order]), np.concatenate([u[i] for i in order]))
        back = eng.unstack(st, 3)
        for j, i in enumerate(order):
            rows[i] = back[j]
            y1, single[i] = eng.step(x[i : i + 1], single[i], u[i])
            assert np.array_equal(y[j], y1[0])
    for i in range(3):
        w = eng.stack([rows[i]]).window.reshape(1, eng.tau_d, -1).numpy()
        assert np.array_equal(eng.decode(w), eng.decode_state(single[i]))


# ---------------------------------------------------------------------------- uploads
def test_davis346_upload_full_resolution_in_every_format(client: TestClient, davis: Path, davis_rec) -> None:
    data = davis.read_bytes()
    r = client.post("/v1/naturalize?format=json&inputs=true&spikes=bitpacked&seed=3", content=data)
    assert r.status_code == 200, r.text
    assert r.headers["x-vdib-model"] == "scenes" and "346x260" in r.headers["x-vdib-model-reason"]
    j = r.json()
    assert j["model"] == "scenes" and j["image_shape"] == [260, 346] and j["roi"] == [0, 0, 346, 260]
    assert j["pool"] == 1 and j["spikes"] is None  # scene models send no spike raster
    n_bins = (int(davis_rec.events["t"][-1]) - int(davis_rec.events["t"][0])) // 10_000 + 1
    assert j["stats"]["bins"] == n_bins and 0 < j["stats"]["spike_rate"] < 1
    frames = [_b64png(f["image"]) for f in j["frames"]]
    assert len(frames) == -(-n_bins // 3) and all(
        f.shape == (260, 346) and f.dtype == np.uint8 for f in frames
    )
    assert all(_b64png(f["input"]).shape == (260, 346, 3) for f in j["frames"])
    assert len({f.tobytes() for f in frames}) > 1  # the image follows the events

    png = client.post("/v1/naturalize?format=png&seed=3", content=data)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.array_equal(_png(png.content), frames[-1])  # the last frame (emit does not change it)

    gif = client.post("/v1/naturalize?format=gif&seed=3", content=data)
    assert gif.status_code == 200
    im = Image.open(io.BytesIO(gif.content))
    assert im.size == (346, 260) and im.n_frames == len(frames)

    npz = client.post("/v1/naturalize?format=npz&seed=3", content=data)
    assert npz.status_code == 200
    z = np.load(io.BytesIO(npz.content))
    assert z["images"].shape == (len(frames), 260, 346) and z["images"].dtype == np.float32
    from service.render import to_uint8

    assert all(np.array_equal(to_uint8(a), b) for a, b in zip(z["images"], frames, strict=True))
    assert list(z["frame_end_us"]) == [f["bin_end_us"] for f in j["frames"]]


def test_timestamps_give_the_named_count_as_reconstruct_events(
    client: TestClient, davis: Path, davis_rec
) -> None:
    from model.scene import reconstruct_events

    t = davis_rec.events["t"]
    times = [int(t[0]) + 12_345, int(t[len(t) // 2]), int(t[-1]) - 1, int(t[0]) + 40_000, int(t[0]) - 5]
    q = "timestamps=" + ",".join(map(str, times))
    r = client.post(f"/v1/naturalize?format=npz&seed=7&{q}", content=davis.read_bytes())
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    assert z["images"].shape == (len(times), 260, 346)
    assert list(z["frame_end_us"]) == times  # in the order asked
    want, _ = reconstruct_events(
        _scene_net(client), davis_rec.events, 346, 260, times, generator=torch.Generator().manual_seed(7)
    )
    assert np.array_equal(z["images"], want)
    j = client.post(f"/v1/naturalize?seed=7&{q}", content=davis.read_bytes()).json()
    assert len(j["frames"]) == len(times) and j["timestamps_us"] == times
    assert [f["bin_end_us"] for f in j["frames"]] == times and j["frames"][-1]["bin"] == -1


def test_images_at_the_aps_frame_times(client: TestClient, davis: Path) -> None:
    """The use case of timestamps: the DAVIS346 file's own APS frames (read with dv-processing),
    one reconstruction per frame time, to compare with the frame camera."""
    dv = pytest.importorskip("dv_processing")
    cam = dv.io.MonoCameraRecording(str(davis))
    times, aps = [], []
    while (f := cam.getNextFrame()) is not None:
        times.append(int(f.timestamp))
        aps.append(np.asarray(f.image).shape[:2])
    assert len(times) == 4 and set(aps) == {(260, 346)}
    r = client.post(
        "/v1/naturalize?format=npz&timestamps=" + ",".join(map(str, times)), content=davis.read_bytes()
    )
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    assert z["images"].shape == (4, 260, 346) and list(z["frame_end_us"]) == times


@pytest.mark.parametrize(
    "query, status, text",
    [
        ("timestamps=1,x", 422, "integers"),
        ("timestamps=" + ",".join(["1"] * 1001), 422, "max_timestamps"),
        ("timestamps=1&model=mnist-dvs", 422, "scene-family"),
        ("timestamps=1&dt_us=5000", 422, "dt_us"),
        ("timestamps=FAR", 413, "max_upload_bins"),  # 10^13 us after the first event: 10^9 bins
    ],
)
def test_bad_timestamps(
    client: TestClient, davis: Path, davis_rec, query: str, status: int, text: str
) -> None:
    query = query.replace("FAR", str(int(davis_rec.events["t"][0]) + 10**13))
    r = client.post(f"/v1/naturalize?{query}", content=davis.read_bytes())
    assert r.status_code == status and text in r.json()["detail"], r.text


def test_scene_upload_budgets(ckpts: Path, davis: Path) -> None:
    """Area, output pixels and CPU budgets hold on the scene path."""
    import events
    from service.app import create_app

    data = davis.read_bytes()
    s = Settings(
        checkpoints_dir=ckpts,
        max_sensor_pixels=346 * 259,
        max_output_pixels=3 * 346 * 260,
        _env_file=None,
        warmup=False,
    )
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/naturalize", content=data)
        assert r.status_code == 422 and "max_sensor_pixels" in r.json()["detail"]
        r = c.post(
            "/v1/naturalize?roi=0,0,100,100&emit=1", content=data
        )  # a region fits; 17 frames of it too
        assert r.status_code == 200 and r.json()["image_shape"] == [100, 100]
        r = c.post("/v1/naturalize?roi=0,0,346,259&emit=1", content=data)
        assert r.status_code == 413 and "max_output_pixels" in r.json()["detail"]
        r = c.post("/v1/naturalize?roi=300,200,100,100", content=data)
        assert r.status_code == 422 and "inside" in r.json()["detail"]
    s = Settings(checkpoints_dir=ckpts, max_upload_cpu_s=1e-4, _env_file=None, warmup=False)
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/naturalize", content=data)
        assert r.status_code == 413 and "CPU budget" in r.json()["detail"]
        t_end = int(events.read(data).events["t"][-1])
        r = c.post(f"/v1/naturalize?timestamps={t_end}", content=data)
        assert r.status_code == 413 and "CPU budget" in r.json()["detail"]


# ---------------------------------------------------------------------------- default model
def test_default_model_rule(client: TestClient, davis: Path) -> None:
    mnist = shared_data_path(*MNIST_DVS).read_bytes()
    r = client.post("/v1/naturalize?emit=last", content=mnist)
    assert r.headers["x-vdib-model"] == "mnist-dvs" and r.json()["image_shape"] == [28, 28]
    assert "declares" in r.json()["model_reason"]
    r = client.post("/v1/naturalize?emit=last", content=davis.read_bytes())
    assert r.headers["x-vdib-model"] == "scenes" and r.json()["image_shape"] == [260, 346]
    # a name wins, both ways
    r = client.post("/v1/naturalize?emit=last&model=mnist-dvs", content=davis.read_bytes())
    assert r.json()["model"] == "mnist-dvs" and r.json()["image_shape"] == [28, 28]
    assert r.headers["x-vdib-model-reason"] == "named in the request"
    r = client.post("/v1/naturalize?emit=last&model=scenes", content=mnist)
    assert r.json()["model"] == "scenes" and r.json()["image_shape"] == [128, 128]
    models = client.get("/v1/models").json()["models"]
    fam = {m["name"]: m["family"] for m in models}
    assert fam == {"mnist-dvs": "digits", "scenes": "scene"}


def test_default_model_rule_registry(tmp_path: Path, ckpts: Path) -> None:
    from service.registry import ModelRegistry, NoDefaultModelError

    digits_only = make_checkpoints(tmp_path / "d", ("mnist-dvs",))
    reg = ModelRegistry.load(Settings(checkpoints_dir=digits_only, warmup=False, _env_file=None))
    assert reg.pick(None, 128, 128)[0].name == "mnist-dvs"
    with pytest.raises(NoDefaultModelError, match="346x260"):  # never the digit model by default
        reg.pick(None, 346, 260)
    assert reg.pick("mnist-dvs", 346, 260)[0].name == "mnist-dvs"
    reg = ModelRegistry.load(
        Settings(checkpoints_dir=ckpts, warmup=False, default_model="scenes", _env_file=None)
    )
    entry, reason = reg.pick(None, 128, 128)
    assert entry.name == "scenes" and "default_model" in reason
    reg = ModelRegistry.load(Settings(checkpoints_dir=ckpts, warmup=False, _env_file=None))
    assert reg.pick(None, 34, 34)[0].name == "scenes" and reg.pick(None, 128, 128)[0].name == "mnist-dvs"


def test_no_default_model_for_the_sensor_is_a_clear_error(tmp_path: Path, davis: Path) -> None:
    from service.app import create_app

    s = Settings(
        checkpoints_dir=make_checkpoints(tmp_path / "d", ("mnist-dvs",)), warmup=False, _env_file=None
    )
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/naturalize", content=davis.read_bytes())
        assert r.status_code == 422 and "name one" in r.json()["detail"]
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(start_msg(sensor={"width": 346, "height": 260})))
            out = collect(ws)
        assert out["code"] == 1003 and "346x260" in out["messages"][-1]["message"]


# ---------------------------------------------------------------------------- streams
def _packets(events: np.ndarray, dt: int = 10_000) -> list[bytes]:
    from service.protocol import encode_events

    t = events["t"]
    edges = np.searchsorted(t, np.arange(int(t[0]), int(t[-1]) + dt, dt))
    cuts = [0, *edges[1:].tolist(), len(events)]
    return [encode_events(events[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _stream(client: TestClient, rec, **start) -> dict:
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg(sensor={"width": rec.width, "height": rec.height}, **start)))
        ready = json.loads(ws.receive_text())
        assert ready["type"] == "ready", ready
        for p in _packets(rec.events):
            ws.send_bytes(p)
        ws.send_text(json.dumps({"type": "end"}))
        out = collect(ws)
    out["ready"] = ready
    return out


def test_davis_stream_at_full_sensor_equals_reconstruct_events_and_upload(
    client: TestClient, davis: Path, davis_rec
) -> None:
    from model.scene import reconstruct_events
    from service.render import to_uint8

    out = _stream(client, davis_rec, seed=11, emit=2, spikes=True, inputs=True)
    ready = out["ready"]
    assert ready["model"] == "scenes" and ready["family"] == "scene" and "346x260" in ready["model_reason"]
    assert ready["image_shape"] == [260, 346] and ready["input_shape"] == [2, 260, 346]
    assert ready["spikes"] is False and ready["roi"] == [0, 0, 346, 260]
    assert out["code"] == 1000
    frames = out["frames"]
    assert frames and all(f.image().shape == (260, 346) and f.spikes is None for f in frames)
    assert all(f.input_png is not None and _png(f.input_png).shape == (260, 346, 3) for f in frames)
    # the same seed, step by step: model.scene.reconstruct_events at every 2nd bin end and the last
    want, times = reconstruct_events(
        _scene_net(client), davis_rec.events, 346, 260, every=2, generator=torch.Generator().manual_seed(11)
    )
    assert [f.bin_end_us for f in frames] == times.tolist()
    for f, w in zip(frames, want, strict=True):
        assert np.array_equal(f.image(), to_uint8(w))
    # an upload of the same recording with the same seed gives the same frames
    j = client.post("/v1/naturalize?seed=11&emit=2", content=davis.read_bytes()).json()
    assert [_b64png(x["image"]).tobytes() for x in j["frames"]] == [f.image().tobytes() for f in frames]


def test_two_streams_of_different_sizes_at_once(client: TestClient, davis_rec) -> None:
    """A DAVIS346 and a DAVIS240 stream interleaved packet by packet: each gets frames of its
    own sensor size, equal to the frames it gets alone."""
    import events

    boxes = events.read(shared_data_path(*DAVIS240))
    small = boxes.events[boxes.events["t"] < boxes.events["t"][0] + 300_000]
    recs = [davis_rec, events.Recording(small, boxes.width, boxes.height, boxes.format, {})]
    alone = [_stream(client, r, seed=i, emit=3)["frames"] for i, r in enumerate(recs)]
    packets = [_packets(r.events) for r in recs]
    with client.websocket_connect("/v1/stream") as a, client.websocket_connect("/v1/stream") as b:
        wss = [a, b]
        for i, (ws, r) in enumerate(zip(wss, recs, strict=True)):
            ws.send_text(json.dumps(start_msg(sensor={"width": r.width, "height": r.height}, seed=i, emit=3)))
            assert json.loads(ws.receive_text())["image_shape"] == [r.height, r.width]
        for k in range(max(map(len, packets))):
            for ws, ps in zip(wss, packets, strict=True):
                if k < len(ps):
                    ws.send_bytes(ps[k])
        for ws in wss:
            ws.send_text(json.dumps({"type": "end"}))
        outs = [collect(ws) for ws in wss]
    for out, r, ref in zip(outs, recs, alone, strict=True):
        assert out["code"] == 1000
        assert all(f.image().shape == (r.height, r.width) for f in out["frames"])
        assert [f.image().tobytes() for f in out["frames"]] == [f.image().tobytes() for f in ref]


def test_equal_sized_streams_batch_without_touching_each_other(client: TestClient, davis_rec) -> None:
    """Two DAVIS346 streams (different seeds, one ending early) stepped in shared ticks: each
    stream's frames equal its frames alone, bit for bit."""
    import events

    short = events.Recording(
        davis_rec.events[davis_rec.events["t"] < davis_rec.events["t"][0] + 60_000], 346, 260, "aedat4", {}
    )
    recs, seeds = [davis_rec, short], [21, 22]
    alone = [
        [f.image().tobytes() for f in _stream(client, r, seed=sd, emit=1)["frames"]]
        for r, sd in zip(recs, seeds, strict=True)
    ]
    packets = [_packets(r.events) for r in recs]
    steps_before = client.app.state.scheduler.steps
    with client.websocket_connect("/v1/stream") as a, client.websocket_connect("/v1/stream") as b:
        wss = [a, b]
        for ws, sd in zip(wss, seeds, strict=True):
            ws.send_text(json.dumps(start_msg(sensor={"width": 346, "height": 260}, seed=sd, emit=1)))
            json.loads(ws.receive_text())
        for k in range(len(packets[0])):
            for ws, ps in zip(wss, packets, strict=True):
                if k < len(ps):
                    ws.send_bytes(ps[k])
            if k == len(packets[1]) - 1:
                b.send_text(json.dumps({"type": "end"}))
        a.send_text(json.dumps({"type": "end"}))
        outs = [collect(ws) for ws in wss]
    assert client.app.state.scheduler.steps - steps_before == sum(len(x) for x in alone)
    for out, ref in zip(outs, alone, strict=True):
        assert out["code"] == 1000 and [f.image().tobytes() for f in out["frames"]] == ref


def test_a_parked_scene_tick_never_stalls_digit_streams(client: TestClient, davis_rec) -> None:
    """Scene streams tick in a thread of their own: while a scene tick is held inside its encoder
    step, a whole MNIST-DVS stream on the digit model runs from start to close."""
    import threading

    import events

    sched = client.app.state.scheduler
    gate, parked, timed_out = threading.Event(), threading.Event(), []

    def hold_scene_steps(step: str, sessions: list) -> None:
        if step == "step" and any(s.entry.family == "scene" for s in sessions) and not gate.is_set():
            parked.set()
            if not gate.wait(30):  # inline on the event loop, nothing could release it
                timed_out.append(True)

    digits = events.read(shared_data_path(*MNIST_DVS))
    packets = _packets(davis_rec.events)
    sched.fault = hold_scene_steps
    try:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(start_msg(sensor={"width": 346, "height": 260}, emit=1)))
            assert json.loads(ws.receive_text())["model"] == "scenes"
            ws.send_bytes(packets[0])
            ws.send_bytes(packets[1])  # completes the first bin
            assert parked.wait(60)
            out = _stream(client, digits, emit=3)
            assert out["code"] == 1000 and out["ready"]["model"] == "mnist-dvs" and len(out["frames"]) == 74
            gate.set()
            for p in packets[2:]:
                ws.send_bytes(p)
            ws.send_text(json.dumps({"type": "end"}))
            scene = collect(ws)
        assert not timed_out and scene["code"] == 1000 and len(scene["frames"]) == len(packets)
    finally:
        sched.fault = None
        gate.set()


def test_onnx_engine_serves_scenes_like_torch(
    ckpts: Path, client: TestClient, davis: Path, davis_rec
) -> None:
    """VDIB_ENGINE=onnx: the scene model's exported graphs at the full sensor; a stream equals its
    upload exactly and the torch engine's frames up to float rounding (a rare flipped spike)."""
    from service.app import create_app

    ref = _stream(client, davis_rec, seed=4, emit=2)["frames"]
    s = Settings(checkpoints_dir=ckpts, engine="onnx", warmup=False, _env_file=None)
    with TestClient(create_app(s)) as c:
        assert {m["name"]: m["engine"] for m in c.get("/v1/models").json()["models"]}["scenes"] == "onnx"
        out = _stream(c, davis_rec, seed=4, emit=2)
        j = c.post("/v1/naturalize?seed=4&emit=2", content=davis.read_bytes()).json()
    assert out["code"] == 1000 and [f.bin_end_us for f in out["frames"]] == [f.bin_end_us for f in ref]
    assert [_b64png(x["image"]).tobytes() for x in j["frames"]] == [
        f.image().tobytes() for f in out["frames"]
    ]
    diff = np.stack(
        [
            np.abs(a.image().astype(int) - b.image().astype(int))
            for a, b in zip(out["frames"], ref, strict=True)
        ]
    )
    assert diff.shape[1:] == (260, 346) and diff.mean() < 0.5, (diff.mean(), diff.max())


def test_scene_stream_limits(ckpts: Path) -> None:
    from service.app import create_app

    s = Settings(
        checkpoints_dir=ckpts,
        max_sensor_pixels=640 * 480,
        max_scene_pixels=346 * 260 + 100,
        warmup=False,
        _env_file=None,
    )
    with TestClient(create_app(s)) as c:
        with c.websocket_connect("/v1/stream") as ws:  # an absurd sensor: refused before any state exists
            ws.send_text(json.dumps(start_msg(sensor={"width": 65536, "height": 65536})))
            out = collect(ws)
        assert out["code"] == 1003 and "max_sensor_pixels" in out["messages"][-1]["message"]
        with c.websocket_connect("/v1/stream") as ws1:
            ws1.send_text(json.dumps(start_msg(sensor={"width": 346, "height": 260})))
            assert json.loads(ws1.receive_text())["type"] == "ready"
            with c.websocket_connect("/v1/stream") as ws2:  # the open scene streams' pixels are bounded
                ws2.send_text(json.dumps(start_msg(sensor={"width": 240, "height": 180})))
                out = collect(ws2)
            assert out["code"] == 1013 and "max_scene_pixels" in out["messages"][-1]["message"]
            ws1.send_text(json.dumps({"type": "end"}))
            assert collect(ws1)["code"] == 1000
        import gc

        gc.collect()
        with c.websocket_connect("/v1/stream") as ws3:  # the pixels came back with the closed stream
            ws3.send_text(json.dumps(start_msg(sensor={"width": 240, "height": 180})))
            assert json.loads(ws3.receive_text())["type"] == "ready"
            ws3.send_text(json.dumps({"type": "end"}))
            assert collect(ws3)["code"] == 1000


def test_waiting_full_sensor_bins_are_bounded_in_bytes(ckpts: Path, client: TestClient, davis_rec) -> None:
    """A full-sensor frame is ~180 KB (346x260): the bins a stream may queue follow
    max_pending_bytes (here 20 bins), and a message completing more is refused (1008)."""
    from service.app import create_app
    from service.protocol import encode_events

    s = Settings(checkpoints_dir=ckpts, max_pending_bytes=20 * 2 * 346 * 260, warmup=False, _env_file=None)
    with TestClient(create_app(s)) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(start_msg(sensor={"width": 346, "height": 260})))
            ready = json.loads(ws.receive_text())
            assert ready["limits"]["max_pending_bins"] == 20
            ev = davis_rec.events.copy()
            ev["t"][-1] = ev["t"][0] + 300_000  # the last event 30 bins on
            ws.send_bytes(encode_events(ev))
            out = collect(ws)
        assert out["code"] == 1008 and "limit 20" in out["messages"][-1]["message"]
    with client.websocket_connect("/v1/stream") as ws:  # by default a digit stream keeps max_pending_bins
        ws.send_text(json.dumps(start_msg()))
        assert (
            json.loads(ws.receive_text())["limits"]["max_pending_bins"]
            == Settings(_env_file=None).max_pending_bins
        )


def test_frame_header_fields_fit(client: TestClient) -> None:
    """A scene stream's readout count (K*h*w) does not fit the header's 16 bits: it says 0."""
    from events import EVENT_DTYPE
    from service.protocol import encode_events

    ev = np.zeros(50, EVENT_DTYPE)
    ev["t"] = np.arange(50) * 1000
    ev["x"], ev["y"] = np.arange(50) * 20, np.arange(50) * 10
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(start_msg(sensor={"width": 1280, "height": 720}, emit=1)))
        ready = json.loads(ws.receive_text())
        assert ready["n_readout"] == 3 * 360 * 640 > 0xFFFF
        ws.send_bytes(encode_events(ev))
        ws.send_text(json.dumps({"type": "end"}))
        raw = []
        while True:
            m = ws.receive()
            if m["type"] == "websocket.close":
                break
            if m.get("bytes") is not None:
                raw.append(m["bytes"])
    from service.protocol import FRAME_HEADER, decode_frame

    assert raw and all(FRAME_HEADER.unpack_from(b)[-1] == 0 for b in raw)
    assert decode_frame(raw[-1]).image().shape == (720, 1280)


# ---------------------------------------------------------------------------- viewer
def _browser(tmp_path: Path):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian chromium / chromium-driver not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,800",
    ):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(30)
    return drv


def _wait_phase(drv, phases: tuple[str, ...], timeout: float = 300.0) -> None:
    import time

    end = time.time() + timeout  # bounds a hung page only; every wait is on the page's state
    while time.time() < end:
        if drv.execute_script("return window.vdib.phase") in phases:
            return
        time.sleep(0.1)
    raise AssertionError(f"page stuck: {drv.execute_script('return window.vdib')!r}")


@pytest.mark.parametrize("parts, size", [(DAVIS346, "346x260"), (DAVIS240, "240x180")])
def test_viewer_shows_events_and_reconstruction_at_native_resolution(
    settings: Settings, tmp_path: Path, parts: tuple[str, ...], size: str
) -> None:
    """Live replay and upload of a real DAVIS recording with the model left on "auto": both
    canvases at the sensor's resolution, side by side, the raster hidden (a scene model sends
    none), the model and the rule's reason shown. Screenshots: $VDIB_SCREENSHOT_DIR or tmp."""
    import os

    from selenium.webdriver.common.by import By

    from tests.service.conftest import LiveServer

    path = shared_data_path(*parts)
    srv = LiveServer(settings.model_copy(update={"start_timeout_s": 300, "idle_timeout_s": 300}))
    drv = _browser(tmp_path)
    shots = Path(os.environ.get("VDIB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    name = path.stem.split("_")[1] if "_" in path.stem else path.stem
    try:
        drv.get(srv.http + "/")
        _wait_phase(drv, ("idle",))
        drv.find_element(By.ID, "file").send_keys(str(path))
        drv.find_element(By.ID, "replay").click()
        _wait_phase(drv, ("closed",))
        vdib = drv.execute_script("return window.vdib")
        assert vdib["closeCode"] == 1000 and vdib["frames"] > 0 and vdib["model"] == "scenes", vdib
        for cid in ("events", "recon"):
            canvas = drv.find_element(By.ID, cid)
            assert canvas.get_attribute("data-size") == size  # the image's own size, drawn 1:1
            assert f"{canvas.get_attribute('width')}x{canvas.get_attribute('height')}" == size
        assert not drv.find_element(By.ID, "raster-panel").is_displayed()
        assert "general-scene" in drv.find_element(By.ID, "model-info").text
        assert drv.find_element(By.ID, "error").text == ""
        drv.save_screenshot(str(shots / f"viewer_scenes_{name}_live.png"))
        drv.find_element(By.ID, "upload").click()
        _wait_phase(drv, ("done",))
        assert drv.find_element(By.ID, "error").text == ""
        assert drv.find_element(By.ID, "recon").get_attribute("data-size") == size
        drv.save_screenshot(str(shots / f"viewer_scenes_{name}_upload.png"))
    finally:
        drv.quit()
        srv.stop()
