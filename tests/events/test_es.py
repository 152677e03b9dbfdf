"""Event Stream (.es) reader (issue 13, item 3): sniffed from its magic bytes, cross-checked
against faery's reader both ways (faery writes, we read; we write, faery reads), the compiled
scan equal to the numpy one, and every bad input an EventFormatError saying where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import events
from events import EVENT_DTYPE, EventFormatError, read, sniff_format
from events.formats import es

faery = pytest.importorskip("faery")


@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Run the test once with the compiled scan and once with the numpy (pointer-doubling) one."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("VDIB_NUMBA", "1" if request.param == "numba" else "0")
    return request.param


def _times(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaps of every size the encoders care about: 0, below/at/above each overflow unit, long."""
    gaps = rng.choice([0, 1, 62, 63, 64, 126, 127, 128, 189, 190, 253, 254, 255, 508, 1000, 70_000], n)
    gaps = np.where(rng.random(n) < 0.5, rng.integers(0, 40, n), gaps)
    return np.cumsum(gaps)


def _dvs(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = _times(rng, n)
    ev["x"] = rng.integers(0, w, n)
    ev["y"] = rng.integers(0, h, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _raw(kind: str, n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = {"dvs": es.DVS_RAW, "atis": es.ATIS_RAW, "color": es.COLOR_RAW}[kind]
    raw = np.zeros(n, dtype)
    raw["t"] = _times(rng, n)
    raw["x"] = rng.integers(0, w, n)
    raw["y"] = rng.integers(0, h, n)
    for name in dtype.names[3:]:
        raw[name] = rng.integers(0, 2 if kind != "color" else 256, n)
    return raw


def _faery_raw(path: Path) -> tuple[str, tuple[int, int] | None, list[np.ndarray]]:
    with faery.es.Decoder(path=path, t0=0) as dec:
        return dec.event_type, dec.dimensions, [p.copy() for p in dec]


# ---- faery writes, we read ------------------------------------------------------------------


def test_faery_written_dvs_reads_identically(tmp_path: Path, kernels):
    w, h = 346, 260
    ev = _dvs(30_000, w, h, seed=1)
    path = tmp_path / "faery.es"
    arr = np.zeros(len(ev), dtype=faery.events_stream.EVENTS_DTYPE)
    for f, g in (("t", "t"), ("x", "x"), ("y", "y"), ("on", "p")):
        arr[f] = ev[g]
    faery.events_stream_from_array(arr, dimensions=(w, h)).to_file(path, zero_t0=False)
    assert sniff_format(path.read_bytes()) == "es"
    rec = read(path)
    assert (rec.format, rec.width, rec.height) == ("es", w, h)
    np.testing.assert_array_equal(rec.events, ev)
    theirs = faery.events_stream_from_file(path).to_array()
    np.testing.assert_array_equal(rec.events["t"], theirs["t"])
    np.testing.assert_array_equal(rec.events["x"], theirs["x"])
    np.testing.assert_array_equal(rec.events["y"], theirs["y"])
    np.testing.assert_array_equal(rec.events["p"], theirs["on"])


@pytest.mark.parametrize("kind", ["dvs", "atis"])
def test_faery_encoder_raw_fields_equal(tmp_path: Path, kind: str, kernels):
    raw = _raw(kind, 5000, 640, 480, seed=2)
    arr = np.zeros(
        len(raw),
        dtype=[
            ("t", "<u8"),
            ("x", "<u2"),
            ("y", "<u2"),
            *([("on", "?")] if kind == "dvs" else [("exposure", "?"), ("polarity", "?")]),
        ],
    )
    for f in arr.dtype.names:
        arr[f] = raw["on" if f == "on" else f]
    path = tmp_path / f"{kind}.es"
    with faery.es.Encoder(path=path, event_type=kind, zero_t0=False, dimensions=(640, 480)) as enc:
        enc.write(arr)
    header, ours = es.decode(path.read_bytes())
    assert (header.event_type, header.width, header.height, header.version) == (kind, 640, 480, (2, 0, 0))
    np.testing.assert_array_equal(ours, raw)


def test_faery_written_generic_decodes(tmp_path: Path):
    rng = np.random.default_rng(3)
    payloads = [
        bytes(rng.integers(0, 256, int(k), dtype=np.uint8)) for k in rng.choice([0, 1, 5, 127, 128, 300], 60)
    ]
    t = np.cumsum(rng.choice([0, 3, 253, 254, 255, 1000], 60))
    arr = np.zeros(60, dtype=[("t", "<u8"), ("bytes", "O")])
    arr["t"] = t
    arr["bytes"] = payloads
    path = tmp_path / "generic.es"
    with faery.es.Encoder(path=path, event_type="generic", zero_t0=False, dimensions=None) as enc:
        enc.write(arr)
    data = path.read_bytes()
    header, ours = es.decode(data)
    assert header.event_type == "generic"
    np.testing.assert_array_equal(ours["t"], t)
    assert [data[o : o + s] for o, s in zip(ours["offset"], ours["size"], strict=True)] == payloads
    with pytest.raises(EventFormatError, match="generic events"):
        read(data)


# ---- we write, faery reads ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dvs", "atis", "color"])
def test_our_encoding_reads_identically_in_faery(tmp_path: Path, kind: str, kernels):
    w, h = 1280, 720
    raw = _raw(kind, 20_000, w, h, seed=4)
    data = es.encode(kind, raw, w, h)
    path = tmp_path / f"ours_{kind}.es"
    path.write_bytes(data)
    ftype, dims, packets = _faery_raw(path)
    theirs = np.concatenate(packets)
    assert (ftype, dims) == (kind, (w, h))
    for f in ("t", "x", "y"):
        np.testing.assert_array_equal(theirs[f], raw[f], err_msg=f)
    if kind == "dvs":
        np.testing.assert_array_equal(theirs["on"], raw["on"].astype(bool))
    elif kind == "atis":
        np.testing.assert_array_equal(theirs["exposure"], raw["exposure"].astype(bool))
        np.testing.assert_array_equal(theirs["polarity"], raw["polarity"].astype(bool))
    else:  # faery's Python binding exposes colour components as booleans (non-zero)
        for c in "rgb":
            np.testing.assert_array_equal(theirs[c], raw[c] != 0)
    header, ours = es.decode(data)
    np.testing.assert_array_equal(ours, raw)
    if kind == "color":
        with pytest.raises(EventFormatError, match="colour events"):
            read(data)
        return
    rec = read(path)
    full = faery.events_stream_from_file(path).to_array()  # faery's own conversion (y flipped)
    np.testing.assert_array_equal(rec.events["t"], full["t"])
    np.testing.assert_array_equal(rec.events["x"], full["x"])
    np.testing.assert_array_equal(rec.events["y"], full["y"])
    np.testing.assert_array_equal(rec.events["p"], full["on"])
    if kind == "atis":
        assert rec.metadata["skipped"]["exposure"] == int(raw["exposure"].sum()) > 0
        assert len(rec) == len(raw) - int(raw["exposure"].sum())


def test_from_events_round_trip_and_generic_encoding(kernels):
    ev = _dvs(4000, 128, 128, seed=5)
    rec = read(es.from_events(ev, 128, 128), format="es")
    np.testing.assert_array_equal(rec.events, ev)
    assert rec.metadata["event_type"] == "dvs" and rec.metadata["es_version"] == "2.0.0"
    items = [(0, b""), (254, b"x" * 200), (254, b"abc"), (1000, bytes(range(256)) * 70)]
    data = es.encode("generic", items)
    header, raw = es.decode(data)
    assert [(int(t), data[o : o + s]) for t, o, s in raw] == items


# ---- the compiled scan equals the numpy scan --------------------------------------------------


@pytest.mark.parametrize("kind", ["dvs", "atis", "color"])
def test_numba_equals_numpy_with_resets(kind: str, monkeypatch):
    pytest.importorskip("numba")
    raw = _raw(kind, 3000, 300, 200, seed=6)
    data = bytearray(es.encode(kind, raw, 300, 200))
    reset = 0xFC if kind == "atis" else 0xFE
    data[20:20] = bytes([reset] * 5)  # resets in the idle state: no time, no event
    monkeypatch.setenv("VDIB_NUMBA", "1")
    _, a = es.decode(bytes(data))
    monkeypatch.setenv("VDIB_NUMBA", "0")
    _, b = es.decode(bytes(data))
    np.testing.assert_array_equal(a, raw)
    np.testing.assert_array_equal(b, raw)


# ---- bad input: typed errors that say where -------------------------------------------------


def _one_dvs(x: int = 1, y: int = 2, w: int = 8, h: int = 8) -> bytes:
    raw = np.zeros(2, es.DVS_RAW)
    raw["t"] = [5, 9]
    raw["x"] = [1, 1]
    raw["y"] = [2, 2]
    data = bytearray(es.encode("dvs", raw, w, h))
    data[-4:-2] = x.to_bytes(2, "little")
    data[-2:] = y.to_bytes(2, "little")
    return bytes(data)


def test_truncated_event_says_where(kernels):
    data = _one_dvs()
    with pytest.raises(EventFormatError, match="truncated") as err:
        read(data[:-2])
    assert err.value.offset == 25  # the second event starts 5 bytes after the 20-byte header
    rec = read(data + b"\xff\xff\xfe")  # trailing overflow/reset bytes are fine
    assert len(rec) == 2


def test_outside_the_sensor_says_where(kernels):
    with pytest.raises(EventFormatError, match="outside the 8x8 sensor") as err:
        read(_one_dvs(x=8))
    assert err.value.offset == 25
    with pytest.raises(EventFormatError, match="outside"):
        read(_one_dvs(y=300))


@pytest.mark.parametrize(
    ("data", "match", "offset"),
    [
        (b"Event Stream\x01\x00\x00\x01" + bytes(8), "version 1.0.0 is not supported", 12),
        (b"Event Stream\x03\x00\x00\x01" + bytes(8), "version 3.0.0", 12),
        (b"Event Stream\x02\x00\x00\x03" + bytes(8), "display events", 15),
        (b"Event Stream\x02\x00\x00\x07" + bytes(8), "unknown Event Stream event type 7", 15),
        (b"Event Stream\x02\x00", "header truncated", 12),
        (b"Event Stream\x02\x00\x00\x01\x08\x00", "no sensor size", 16),
        (b"Event Stream\x02\x00\x00\x01\x00\x00\x08\x00", "absurd", 16),
        (b"Event Stream\x02\x01\x05\x00\x05\x85", "truncated", 16),
        (b"Event Stream\x02\x01\x05\x00\x05\x06ab", "truncated", 16),
    ],
)
def test_bad_headers(data: bytes, match: str, offset: int):
    with pytest.raises(EventFormatError, match=match) as err:
        es.decode(data)
    assert err.value.offset == offset
    with pytest.raises(EventFormatError):
        read(data)


def test_minor_versions_of_2_are_read():
    data = bytearray(_one_dvs())
    data[13:15] = b"\x07\x03"
    rec = read(bytes(data))
    assert rec.metadata["es_version"] == "2.7.3" and len(rec) == 2


def test_limits_and_sniffing(tmp_path: Path, kernels):
    data = es.from_events(_dvs(100, 64, 64, seed=7), 64, 64)
    with pytest.raises(EventFormatError, match="max_events=10"):
        read(data, max_events=10)
    with pytest.raises(EventFormatError, match="max_bytes"):
        read(data, max_bytes=100)
    assert len(read(data, max_events=100)) == 100
    # ATIS: the bound counts the events that come back (threshold crossings are dropped)
    raw = _raw("atis", 100, 64, 64, seed=9)
    raw["exposure"] = np.arange(100) % 2
    raw["t"] = np.arange(100) * 3  # no overflow bytes: event i starts at 20 + 5 i
    atis = es.encode("atis", raw, 64, 64)
    assert len(read(atis, max_events=50)) == 50
    with pytest.raises(EventFormatError, match="max_events=49") as err:
        read(atis, max_events=49)
    assert err.value.offset == 20 + 5 * 98  # the 50th DVS event is the 99th event
    # the magic decides, not the name; a .es name without the magic is refused
    path = tmp_path / "named.bin"
    path.write_bytes(data)
    assert read(path).format == "es"
    assert sniff_format(data, "x.aedat4") == "es"
    with pytest.raises(EventFormatError, match="lacks the es magic"):
        sniff_format(b"\x00" * 40, "x.es")
    assert "es" in events.readers.FORMATS


def test_upload_endpoint_takes_es(tmp_path: Path):
    """POST /v1/events decodes an .es upload (sniffed, no file-name hint needed)."""
    from service.settings import Settings
    from tests.service.conftest import make_checkpoints, make_client

    settings = Settings(checkpoints_dir=make_checkpoints(tmp_path / "ck"), warmup=False, _env_file=None)
    ev = _dvs(500, 128, 128, seed=8)
    with make_client(settings) as client:
        r = client.post("/v1/events", content=es.from_events(ev, 128, 128))
        assert r.status_code == 200, r.text
        assert (r.headers["X-Format"], r.headers["X-Events"], r.headers["X-Sensor-Width"]) == (
            "es",
            "500",
            "128",
        )
        bad = client.post("/v1/events", files={"file": ("x.es", es.from_events(ev, 128, 128)[:-1])})
        assert bad.status_code == 422 and "truncated" in bad.json()["detail"]
