"""POST /v1/naturalize and /v1/events: formats, outputs, and a clear 4xx for every bad input."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from service.render import unpack_spikes
from service.settings import Settings
from tests.service.conftest import make_client


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_json_upload_frames_spikes_stats(client, mnist_dvs_bytes, mnist_dvs_events):
    r = client.post("/v1/naturalize?emit=5&spikes=bitpacked&seed=3&inputs=true", content=mnist_dvs_bytes)
    assert r.status_code == 200, r.text
    j = r.json()
    t = mnist_dvs_events["t"]
    n_bins = int((t[-1] - t[0]) // 10_000) + 1  # no gap in this recording: every bin is stepped
    assert j["stats"]["events"] == len(mnist_dvs_events) == 15744
    assert j["stats"]["bins"] == n_bins
    assert j["roi"] == [48, 54, 26, 26] and j["pool"] == 1  # the checkpoint's own ROI for a DVS128
    assert j["file_format"] == "aedat2" and j["sensor"] == {"width": 128, "height": 128}
    bins = [f["bin"] for f in j["frames"]]
    expected = list(range(4, n_bins, 5))
    if expected[-1] != n_bins - 1:
        expected.append(n_bins - 1)
    assert bins == expected
    ends = [f["bin_end_us"] for f in j["frames"]]
    assert ends == [int(t[0]) + (b + 1) * 10_000 for b in bins]
    img = _png(j["frames"][0]["image"])
    assert img.shape == (28, 28) and img.dtype == np.uint8
    inp = _png(j["frames"][0]["input"])
    assert inp.shape == (26, 26, 3)
    sp = j["spikes"]
    raster = unpack_spikes(base64.b64decode(sp["data"]), sp["rows"], sp["n_readout"])
    assert raster.shape == (n_bins, 16)
    assert abs(raster.mean() - j["stats"]["spike_rate"]) < 1e-9
    assert 0.0 < j["stats"]["spike_rate"] < 1.0
    assert set(j["stats"]["seconds"]) == {"read", "bin", "encode", "decode", "render"}


def test_seed_determinism(client, mnist_dvs_bytes):
    a = client.post("/v1/naturalize?seed=1&spikes=bitpacked", content=mnist_dvs_bytes).json()
    b = client.post("/v1/naturalize?seed=1&spikes=bitpacked", content=mnist_dvs_bytes).json()
    c = client.post("/v1/naturalize?seed=2&spikes=bitpacked", content=mnist_dvs_bytes).json()
    assert a["spikes"]["data"] == b["spikes"]["data"]
    assert a["spikes"]["data"] != c["spikes"]["data"]


def test_multipart_equals_raw(client, mnist_dvs_bytes):
    raw = client.post("/v1/naturalize?emit=last", content=mnist_dvs_bytes).json()
    mp = client.post("/v1/naturalize?emit=last", files={"file": ("digit.aedat", mnist_dvs_bytes)}).json()
    assert raw["frames"] == mp["frames"]


def test_png_gif_npz(client, mnist_dvs_bytes):
    js = client.post("/v1/naturalize?emit=3&seed=4", content=mnist_dvs_bytes).json()
    png = client.post("/v1/naturalize?format=png&seed=4", content=mnist_dvs_bytes)
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), _png(js["frames"][-1]["image"]))
    g = client.post("/v1/naturalize?format=gif&emit=3&seed=4", content=mnist_dvs_bytes)
    assert g.headers["content-type"] == "image/gif"
    im = Image.open(io.BytesIO(g.content))
    assert im.n_frames == len(js["frames"]) and im.size == (28, 28)
    z = client.post("/v1/naturalize?format=npz&emit=3&seed=4&spikes=bitpacked", content=mnist_dvs_bytes)
    with np.load(io.BytesIO(z.content)) as f:
        assert f["images"].shape == (len(js["frames"]), 28, 28)
        assert f["spikes"].shape == (js["stats"]["bins"], 16)
        assert list(f["frame_bins"]) == [fr["bin"] for fr in js["frames"]]
        got = np.rint(np.clip(f["images"][0], 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(got, _png(js["frames"][0]["image"]))


@pytest.mark.parametrize(
    "fmt_file",
    [
        ("aedat31", "mnist_0_scale04_0001_as_aedat31.aedat"),
        ("aedat4", "tonic_sample.aedat4"),
        ("evt2", "faery_evt2.raw"),
        ("nmnist", "tonic_sample_nmnist.bin"),
    ],
)
def test_other_formats_and_sensors(client, shared_events, fmt_file):
    sub, name = fmt_file
    data = (shared_events / sub / name).read_bytes()
    r = client.post(
        f"/v1/naturalize?emit=last&model=tiny&filename={name}", content=data
    )  # digit model by name
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["stats"]["events"] > 0 and len(j["frames"]) == 1
    w, h = j["sensor"]["width"], j["sensor"]["height"]
    x, y, rw, rh = j["roi"]
    if (w, h) != (128, 128):  # centre crop of the model input size (pool 1)
        assert (rw, rh) == (26, 26) and x == max(0, (w - 26) // 2) and y == max(0, (h - 26) // 2)


def test_roi_full_and_explicit(client, mnist_dvs_bytes):
    j = client.post("/v1/naturalize?emit=last&roi=full", content=mnist_dvs_bytes).json()
    assert j["pool"] == 4 and j["roi"] == [12, 12, 104, 104]
    j = client.post("/v1/naturalize?emit=last&roi=10,20,52,52", content=mnist_dvs_bytes).json()
    assert j["pool"] == 2 and j["roi"] == [10, 20, 52, 52]
    j = client.post("/v1/naturalize?emit=last&roi=centre", content=mnist_dvs_bytes).json()
    assert j["roi"] == [51, 51, 26, 26]


def test_events_endpoint_packet(client, mnist_dvs_bytes, mnist_dvs_events):
    from service.protocol import decode_events

    r = client.post("/v1/events", content=mnist_dvs_bytes)
    assert r.status_code == 200
    assert r.headers["x-sensor-width"] == "128" and r.headers["x-format"] == "aedat2"
    ev = decode_events(r.content)
    assert np.array_equal(ev["t"], mnist_dvs_events["t"]) and np.array_equal(ev["x"], mnist_dvs_events["x"])


# ---------------------------------------------------------------------------- bad input -> 4xx
@pytest.mark.parametrize(
    "query, code, text",
    [
        ("roi=1,2,3", 422, "roi"),
        ("roi=0,0,27,27", 422, "multiple"),
        ("roi=200,0,26,26", 422, "outside"),
        ("roi=a,b,c,d", 422, "integers"),
        ("emit=0", 422, "emit"),
        ("emit=soon", 422, "emit"),
        ("format=bmp", 422, "format"),
        ("spikes=raw", 422, "spikes"),
        ("dt_us=0", 422, "dt_us"),
        ("seed=-1", 422, "seed"),
        ("model=nope", 404, "unknown model"),
    ],
)
def test_bad_parameters(client, mnist_dvs_bytes, query, code, text):
    r = client.post(f"/v1/naturalize?{query}", content=mnist_dvs_bytes)
    assert r.status_code == code, r.text
    assert text in r.text


def test_unknown_format_415(client):
    r = client.post("/v1/naturalize", content=bytes(range(256)) * 7 + b"\x01")
    assert r.status_code == 415 and "unknown event-file format" in r.json()["detail"]


def test_corrupt_file_422(client, mnist_dvs_bytes):
    # an AEDAT 3.1 header followed by a truncated packet header
    r = client.post("/v1/naturalize", content=b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + b"\x01\x00\x01")
    assert r.status_code == 422, r.text
    r = client.post("/v1/naturalize", content=b"")
    assert r.status_code == 422 and "empty" in r.text
    r = client.post("/v1/naturalize", content=b"PK\x03\x04garbage")
    assert r.status_code == 422


def test_multipart_without_file_422(client):
    r = client.post("/v1/naturalize", data={"a": "b"}, files={"x": ("", b"")})
    assert r.status_code == 422


def test_size_limits_413(checkpoints_dir, mnist_dvs_bytes):
    s = Settings(checkpoints_dir=checkpoints_dir, max_upload_bytes=50_000, _env_file=None)
    with make_client(s) as c:
        # Content-Length checked before reading
        r = c.post("/v1/naturalize", content=mnist_dvs_bytes)
        assert r.status_code == 413 and "Content-Length" in r.text

        # no Content-Length (chunked): counted while streaming
        def gen():
            for a in range(0, len(mnist_dvs_bytes), 8192):
                yield mnist_dvs_bytes[a : a + 8192]

        r = c.post("/v1/naturalize", content=gen())
        assert r.status_code == 413 and "upload limit" in r.text
        r = c.post("/v1/naturalize", files={"file": ("a.aedat", mnist_dvs_bytes)})
        assert r.status_code == 413
    s = Settings(checkpoints_dir=checkpoints_dir, max_events=1000, _env_file=None)
    with make_client(s) as c:
        r = c.post("/v1/naturalize", content=mnist_dvs_bytes)
        assert r.status_code == 413 and "max_events" in r.text
    s = Settings(checkpoints_dir=checkpoints_dir, max_duration_s=1.0, _env_file=None)
    with make_client(s) as c:
        r = c.post("/v1/naturalize", content=mnist_dvs_bytes)
        assert r.status_code == 413 and "lasts" in r.text
    s = Settings(checkpoints_dir=checkpoints_dir, max_frames=10, _env_file=None)
    with make_client(s) as c:
        r = c.post("/v1/naturalize?emit=1", content=mnist_dvs_bytes)
        assert r.status_code == 413 and "emit=last" in r.text
        assert c.post("/v1/naturalize?emit=last", content=mnist_dvs_bytes).status_code == 200


def test_gap_resets_state_in_upload(client):
    """Two copies of a burst separated by a long gap give identical frames with equal generators
    only if the state is reset: check that the second half's spikes restart from a clean window."""
    from events import EVENT_DTYPE, write_npz

    rng = np.random.default_rng(0)
    n = 4000
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 300_000, n))
    ev["x"] = rng.integers(48, 74, n)
    ev["y"] = rng.integers(54, 80, n)
    ev["p"] = rng.integers(0, 2, n)
    two = np.concatenate([ev, ev.copy()])
    two["t"][n:] += 5_000_000  # 5 s later: a gap
    buf = io.BytesIO()
    write_npz(buf, two, 128, 128)
    r = client.post("/v1/naturalize?emit=1&spikes=bitpacked", content=buf.getvalue())
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["stats"]["gaps"] == 1
    assert j["stats"]["bins"] == 2 * 30
    # frames after the gap restart at bin 30 with a window of only post-gap spikes
    assert j["frames"][30]["bin_end_us"] - j["frames"][29]["bin_end_us"] > 4_000_000


def test_npz_upload_json_parses(client):
    """An npz recording round-trips (the viewer and bench generate npz files)."""
    from events import EVENT_DTYPE, write_npz

    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 10, 25_000]
    ev["x"] = [60, 61, 62]
    ev["y"] = [60, 60, 60]
    ev["p"] = [1, 0, 1]
    buf = io.BytesIO()
    write_npz(buf, ev, 128, 128)
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))
    j = client.post("/v1/naturalize?emit=1", content=buf.getvalue()).json()
    assert j["stats"]["bins"] == 3 and json.dumps(j)


def test_a_huge_declared_sensor_costs_its_sides_not_its_area(client):
    """Issue 10, amplification through space: a 60-byte CSV declaring a 16384 x 16384 sensor with
    roi=full is pooled to the model input; binning it allocates tables sized by the sensor's
    sides (never its area: that was 8.9 GB) and keeps at most TABLE_CACHE_BYTES of them."""
    import tracemalloc

    from events import binning

    csv = b"# width 16384 height 16384\nt,x,y,p\n0,1,1,1\n20000,16000,16000,0\n"
    tracemalloc.start()
    try:
        r = client.post(
            "/v1/naturalize", content=csv, params={"filename": "big.csv", "roi": "full", "model": "tiny"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert r.json()["pool"] == 630 and r.json()["stats"]["bins"] == 3
    assert peak < 64 << 20, peak
    assert binning._TABLES.nbytes <= binning.TABLE_CACHE_BYTES
