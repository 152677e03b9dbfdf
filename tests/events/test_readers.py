"""Readers: every shared recording, independent cross-checks, and each format's semantics."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import events
from events import EVENT_DTYPE, EventFormatError, EventLimitError, read, sniff_format

# (path under ../shared/data/events, format, events, width, height, duration in s) from its README
SHARED = [
    ("aedat2/mnist_0_scale04_0001.aedat", "aedat2", 15_744, 128, 128, 2.21),
    ("aedat2/mnist_0_scale08_0001_qt1.aedat", "aedat2", 5_078, 128, 128, 0.197),
    ("aedat2/pyaedattools_IMU_translBoxes.aedat", "aedat2", 162_771, 240, 180, 2.07),
    ("aedat2/tonic_sample_aedat_header.aedat", "aedat2", 0, None, None, 0.0),
    ("aedat31/mnist_0_scale04_0001_as_aedat31.aedat", "aedat31", 15_744, 128, 128, 2.21),
    ("aedat4/tonic_sample.aedat4", "aedat4", 111_954, 320, 240, 0.59),
    ("aedat4/evlib_davis346_trimmed.aedat4", "aedat4", 6_676, 346, 260, 0.17),
    ("evt2/faery_evt2.raw", "evt2", 521_252, 640, 480, 0.096),
    ("dat/tonic_sample_ncars.dat", "dat", 2_009, None, None, 0.10),
    ("nmnist/tonic_sample_nmnist.bin", "nmnist", 4_325, 34, 34, 0.31),
]


def _events(t, x, y, p) -> np.ndarray:
    e = np.zeros(len(t), EVENT_DTYPE)
    e["t"], e["x"], e["y"], e["p"] = t, x, y, p
    return e


@pytest.mark.parametrize("rel,fmt,n,w,h,dur", SHARED, ids=[s[0] for s in SHARED])
def test_shared_recordings_match_readme(shared_events: Path, rel, fmt, n, w, h, dur):
    path = shared_events / rel
    if not path.exists():
        pytest.skip(f"{rel} absent")
    rec = read(path)
    assert rec.format == fmt
    assert len(rec) == n
    assert rec.events.dtype == EVENT_DTYPE
    if w is not None:
        assert (rec.width, rec.height) == (w, h)
    if n:
        assert np.all(np.diff(rec.events["t"]) >= 0)
        assert int(rec.events["x"].max()) < rec.width and int(rec.events["y"].max()) < rec.height
        assert rec.duration_us / 1e6 == pytest.approx(dur, rel=0.02, abs=0.005)
        assert set(np.unique(rec.events["p"])) <= {0, 1}
    json.loads(json.dumps(rec.metadata))  # JSON-serialisable, as the service returns it
    # the same bytes through every kind of source give the same recording
    data = path.read_bytes()
    for src in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        again = read(src)
        assert again.format == fmt and np.array_equal(again.events, rec.events)
        assert (again.width, again.height) == (rec.width, rec.height)


def test_davis240_is_upright_and_aps_imu_counted(shared_events: Path):
    rec = read(shared_events / "aedat2/pyaedattools_IMU_translBoxes.aedat")
    # 196,608 words: the 33,837 that are not DVS events are IMU samples (no APS frames here)
    assert rec.metadata["skipped"] == {"aps": 0, "imu": 196_608 - 162_771, "special": 0}
    assert rec.metadata["header"]["AEChip"].endswith("DAVIS240C")
    y = rec.events["y"]
    # the boxes stand on a table: the bottom quarter of the image is busy, the top quarter (wall)
    # is mostly empty. Raw jAER y (bottom-up) would put the activity at the top.
    assert (y >= 3 * rec.height // 4).sum() > 2 * (y < rec.height // 4).sum()


def _reference_aedat2(path: Path) -> np.ndarray:
    """A plain-Python decoder of the DVS128 AEDAT 2.0 words (README formula + jAER conversion)."""
    data = path.read_bytes()
    pos = 0
    while data.startswith(b"#", pos):
        pos = data.index(b"\n", pos) + 1
    out = []
    for a, ts in struct.iter_unpack(">II", data[pos:]):
        out.append((ts, 127 - ((a >> 1) & 0x7F), 127 - ((a >> 8) & 0x7F), 1 - (a & 1)))
    return np.array(out, dtype=np.int64)


def test_aedat2_matches_plain_python_reference(shared_events: Path):
    path = shared_events / "aedat2/mnist_0_scale08_0001_qt1.aedat"
    rec = read(path)
    ref = _reference_aedat2(path)
    got = np.stack([rec.events[k].astype(np.int64) for k in ("t", "x", "y", "p")], axis=1)
    np.testing.assert_array_equal(got, ref)


def test_aedat31_copy_holds_the_raw_jaer_fields_of_the_aedat2_recording(shared_events: Path):
    """The AEDAT 3.1 file was re-encoded from the AEDAT 2.0 one by copying jAER's raw fields.

    Read per libcaer (coordinates as stored), it equals the AEDAT 2.0 recording before our
    jAER -> top-left conversion: x31 = 127 - x2, y31 = 127 - y2, p31 = 1 - p2; same times.
    """
    a2 = read(shared_events / "aedat2/mnist_0_scale04_0001.aedat").events
    a31 = read(shared_events / "aedat31/mnist_0_scale04_0001_as_aedat31.aedat").events
    np.testing.assert_array_equal(a31["t"], a2["t"])
    np.testing.assert_array_equal(a31["x"], 127 - a2["x"])
    np.testing.assert_array_equal(a31["y"], 127 - a2["y"])
    np.testing.assert_array_equal(a31["p"], 1 - a2["p"])


def _dv_read(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    dv = pytest.importorskip("dv_processing")
    rec = dv.io.MonoCameraRecording(str(path))
    chunks = []
    while True:
        batch = rec.getNextEventBatch()
        if batch is None:
            break
        chunks.append(batch.numpy())
    arr = (
        np.concatenate(chunks)
        if chunks
        else np.zeros(0, [("timestamp", "<i8"), ("x", "<i2"), ("y", "<i2"), ("polarity", "i1")])
    )
    return _events(arr["timestamp"], arr["x"], arr["y"], arr["polarity"]), tuple(rec.getEventResolution())


def _faery_read(path: Path, **kw) -> tuple[np.ndarray, tuple[int, int]]:
    faery = pytest.importorskip("faery")
    stream = faery.events_stream_from_file(path, **kw)
    chunks = [np.asarray(c) for c in stream]
    arr = np.concatenate(chunks) if chunks else np.zeros(0, faery.EVENTS_DTYPE)
    return _events(arr["t"], arr["x"], arr["y"], arr["on"]), tuple(stream.dimensions())


@pytest.mark.parametrize("rel", ["aedat4/tonic_sample.aedat4", "aedat4/evlib_davis346_trimmed.aedat4"])
def test_aedat4_matches_dv_processing_and_faery(shared_events: Path, rel):
    rec = read(shared_events / rel)
    for other, size in (_dv_read(shared_events / rel), _faery_read(shared_events / rel)):
        assert size == (rec.width, rec.height)
        np.testing.assert_array_equal(other, rec.events)


def test_aedat4_lists_skipped_streams(shared_events: Path):
    rec = read(shared_events / "aedat4/evlib_davis346_trimmed.aedat4")
    assert rec.metadata["compression"] == "lz4"
    assert {"frames", "imus", "triggers"} <= set(rec.metadata["skipped"])
    assert rec.metadata["skipped"]["frames"] > 0


def test_evt2_matches_faery(shared_events: Path):
    path = shared_events / "evt2/faery_evt2.raw"
    rec = read(path)
    other, _ = _faery_read(path)
    np.testing.assert_array_equal(other, rec.events)
    assert rec.metadata["header"]["plugin_name"] == "hal_plugin_gen3_fx3"


def _random_events(n: int, w: int, h: int, span_us: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span_us, n))
    # clusters of neighbouring pixels at one time make EVT 3 writers emit vector words
    x = rng.integers(0, w, n)
    burst = rng.random(n) < 0.5
    x[1:][burst[1:]] = np.minimum(x[:-1][burst[1:]] + 1, w - 1)
    y = rng.integers(0, h, n)
    y[1:][burst[1:]] = y[:-1][burst[1:]]
    t[1:][burst[1:]] = t[:-1][burst[1:]]
    return _events(t, x, y, rng.integers(0, 2, n))


@pytest.mark.parametrize("version", ["evt2", "evt3", "dat2", "csv", "aedat4"])
def test_files_written_by_faery_read_back_identically(tmp_path: Path, version):
    faery = pytest.importorskip("faery")
    # 40 s so that EVT 3's 24-bit time (16.8 s) wraps twice
    ev = _random_events(30_000, 640, 480, 40_000_000, seed=1)
    ev = ev[np.lexsort((ev["x"], ev["y"], ev["t"]))]
    arr = np.zeros(len(ev), faery.EVENTS_DTYPE)
    arr["t"], arr["x"], arr["y"], arr["on"] = ev["t"], ev["x"], ev["y"], ev["p"] == 1
    suffix = {"evt2": ".raw", "evt3": ".raw", "dat2": ".dat", "csv": ".csv", "aedat4": ".aedat4"}[version]
    path = tmp_path / f"f{suffix}"
    kw = {} if version in ("csv", "aedat4") else {"version": version}
    faery.events_stream_from_array(arr, (640, 480)).to_file(path, zero_t0=False, **kw)
    rec = read(path)
    assert rec.format == {"dat2": "dat"}.get(version, version)
    if version != "csv":
        assert (rec.width, rec.height) == (640, 480)
    np.testing.assert_array_equal(rec.events, ev)
    if version == "evt3":
        words = np.frombuffer(path.read_bytes().split(b"\n% geometry 640x480\n", 1)[-1][:], "<u2")
        assert np.isin(words >> 12, (4, 5)).any(), (
            "faery wrote no vector words: the test would not cover them"
        )


def _evt3_bytes(words: list[int], header: str = "% evt 3.0\n% format EVT3;height=720;width=1280\n") -> bytes:
    return header.encode() + struct.pack(f"<{len(words)}H", *words)


def test_evt3_hand_built_stream_follows_the_spec():
    th = lambda v: 0x8000 | v  # noqa: E731
    tl = lambda v: 0x6000 | v  # noqa: E731
    ay = lambda v: 0x0000 | v  # noqa: E731
    ax = lambda v, p: 0x2000 | (p << 11) | v  # noqa: E731
    base = lambda v, p: 0x3000 | (p << 11) | v  # noqa: E731
    v12 = lambda m: 0x4000 | m  # noqa: E731
    v8 = lambda m: 0x5000 | m  # noqa: E731
    words = [
        ax(5, 1),  # before the first TIME_HIGH: dropped, as openeb does
        th(0x001),
        tl(0x002),
        ay(100),
        ax(7, 1),  # t = 0x001002
        v12(0b1),  # a vector before any VECT_BASE_X has no x: skipped and counted
        base(10, 0),
        v12(0b100000000101),
        v8(0b10000001),  # x = 10, 12, 21 and 22, 29
        0xA000 | 3,  # EXT_TRIGGER: skipped
        tl(0x010),
        ay(719),
        ax(1279, 0),
        th(0xFFF),
        tl(0xFFF),
        ax(1, 1),  # t = 0xFFFFFF
        th(0x000),
        tl(0x001),
        ax(2, 0),  # the 24-bit counter wrapped: t = 2**24 + 1
    ]
    rec = read(_evt3_bytes(words))
    assert rec.format == "evt3" and (rec.width, rec.height) == (1280, 720)
    t1 = 0x001002
    expected = [
        (t1, 7, 100, 1),
        (t1, 10, 100, 0),
        (t1, 12, 100, 0),
        (t1, 21, 100, 0),
        (t1, 22, 100, 0),
        (t1, 29, 100, 0),
        (0x001010, 1279, 719, 0),
        (0xFFFFFF, 1, 719, 1),
        ((1 << 24) + 1, 2, 719, 0),
    ]
    got = [tuple(int(v) for v in e) for e in rec.events[["t", "x", "y", "p"]].tolist()]
    assert got == expected
    assert rec.metadata["skipped"]["before_first_time_high"] == 1
    assert rec.metadata["skipped"]["ext_trigger"] == 1
    assert rec.metadata["skipped"]["vector_without_base"] == 1


def test_evt2_hand_built_words():
    th = 0x8000_0000 | 5  # t >> 6 = 5
    cd_on = (1 << 28) | (17 << 22) | (300 << 11) | 200
    cd_off = (0 << 28) | (3 << 22) | (1 << 11) | 2
    data = b"% evt 2.0\n% geometry 640x480\n" + struct.pack("<3I", th, cd_on, cd_off)
    rec = read(data)
    assert rec.format == "evt2"
    got = [tuple(int(v) for v in e) for e in rec.events[["t", "x", "y", "p"]].tolist()]
    assert got == [(5 * 64 + 3, 1, 2, 0), (5 * 64 + 17, 300, 200, 1)]  # sorted by t


def _aedat2(words: list[tuple[int, int]], header: bytes = b"#!AER-DAT2.0\r\n# test\r\n") -> bytes:
    return header + b"".join(struct.pack(">II", a, t) for a, t in words)


def test_aedat2_timestamp_wrap_is_unwrapped():
    a = (3 << 8) | (4 << 1) | 1  # raw x 4, y 3, raw polarity bit 1 = OFF
    rec = read(_aedat2([(a, 2**32 - 10), (a, 2**32 - 1), (a, 5), (a, 20)]))
    np.testing.assert_array_equal(rec.events["t"], [2**32 - 10, 2**32 - 1, 2**32 + 5, 2**32 + 20])
    assert rec.metadata["time_wraps"] == 1
    assert (int(rec.events["x"][0]), int(rec.events["y"][0]), int(rec.events["p"][0])) == (123, 124, 0)


def test_aedat1_16bit_addresses():
    body = b"".join(struct.pack(">HI", (10 << 8) | (20 << 1) | 0, t) for t in (1, 2, 3))
    rec = read(b"#!AER-DAT1.0\r\n" + body)
    assert rec.format == "aedat1" and len(rec) == 3
    assert (int(rec.events["x"][0]), int(rec.events["y"][0]), int(rec.events["p"][0])) == (107, 117, 1)


def test_aedat2_davis_without_chip_header_infers_the_sensor():
    def dvs(x, y, p):
        return (y << 22) | (x << 12) | (p << 11)

    words = [(dvs(239, 179, 1), 10), (0x8000_0C00, 11), (dvs(0, 0, 0), 12), (dvs(5, 6, 0) | 0x400, 13)]
    rec = read(_aedat2(words))
    assert rec.metadata["layout"] == "davis"
    assert (rec.width, rec.height) == (240, 180)
    assert rec.metadata["skipped"] == {"aps": 0, "imu": 1, "special": 1}
    got = [tuple(int(v) for v in e) for e in rec.events[["t", "x", "y", "p"]].tolist()]
    assert got == [(10, 239, 0, 1), (12, 0, 179, 0)]  # y flipped to top-left


def test_aedat2_dvs128_special_words_are_skipped():
    a = (1 << 8) | (2 << 1)
    rec = read(_aedat2([(a, 1), (0x8000, 2), (a, 3)]))
    assert len(rec) == 2 and rec.metadata["skipped"]["special"] == 1


def test_nmnist_overflow_markers_advance_time():
    def rec5(x, y, p, t):
        return bytes([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF])

    data = rec5(1, 2, 1, 100) + rec5(0, 240, 0, 0) + rec5(3, 4, 0, 50)
    rec = read(data, format="nmnist")
    got = [tuple(int(v) for v in e) for e in rec.events[["t", "x", "y", "p"]].tolist()]
    assert got == [(100, 1, 2, 1), (8192 + 50, 3, 4, 0)]


def test_csv_variants():
    a = read(b"t,x,y,p\n1,2,3,1\n5,6,7,0\n")
    b = read(b"# width 10 height 8\n1 2 3 1\n5 6 7 0\n")
    c = read(b"x;y;p;timestamp\n2;3;1;1\n6;7;0;5\n")
    for r in (a, b, c):
        assert r.format == "csv"
        np.testing.assert_array_equal(r.events, _events([1, 5], [2, 6], [3, 7], [1, 0]))
    assert (b.width, b.height) == (10, 8)


def test_npy_and_npz_never_unpickle():
    obj = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    with pytest.raises(EventFormatError, match="pickle"):
        read(buf.getvalue())


def test_sniffing_uses_content_not_extension(shared_events: Path, tmp_path: Path):
    data = (shared_events / "aedat2/mnist_0_scale08_0001_qt1.aedat").read_bytes()
    misnamed = tmp_path / "clip.raw"
    misnamed.write_bytes(data)
    assert read(misnamed).format == "aedat2"
    assert sniff_format(data, "x.csv") == "aedat2"
    assert sniff_format((shared_events / "evt2/faery_evt2.raw").read_bytes()) == "evt2"
    assert sniff_format((shared_events / "dat/tonic_sample_ncars.dat").read_bytes()) == "dat"
    assert sniff_format((shared_events / "nmnist/tonic_sample_nmnist.bin").read_bytes(), "a.bin") == "nmnist"


def test_limits_are_enforced(shared_events: Path):
    path = shared_events / "aedat2/mnist_0_scale08_0001_qt1.aedat"
    with pytest.raises(EventLimitError, match="max_bytes"):
        read(path, max_bytes=1000)
    with pytest.raises(EventLimitError, match="max_bytes"):
        read(path.read_bytes(), max_bytes=1000)
    with pytest.raises(EventLimitError, match="max_events"):
        read(path, max_events=100)
    with pytest.raises(EventLimitError, match="max_events"):
        read(shared_events / "aedat4/tonic_sample.aedat4", max_events=1000)
    assert issubclass(EventLimitError, EventFormatError)  # still the one error a reader raises


def test_aedat4_stream_decoder_cut_anywhere_equals_the_file(shared_events: Path):
    from events.formats.aedat4 import Aedat4StreamDecoder

    data = (shared_events / "aedat4/tonic_sample.aedat4").read_bytes()
    want = read(data).events
    for step in (1_000, 65_537, len(data)):
        dec = Aedat4StreamDecoder(max_buffer=1 << 22, max_events=10_000_000)
        parts = [dec.feed(data[:1]), dec.feed(data[1:5])]  # a header cut after 1 and 5 bytes
        parts += [dec.feed(data[a : a + step]) for a in range(5, len(data), step)]
        got = np.concatenate(parts)
        assert got.dtype == EVENT_DTYPE and np.array_equal(got, want)
    with pytest.raises(EventFormatError, match="does not start"):
        Aedat4StreamDecoder(1 << 20, 1000).feed(b"#!AER-DAT3.1\r\n....")
    with pytest.raises(EventFormatError, match="does not start"):
        Aedat4StreamDecoder(1 << 20, 1000).feed(b"#!X")
    with pytest.raises(EventLimitError, match="larger than"):
        Aedat4StreamDecoder(1000, 1000).feed(data[:2000])
    bad = bytearray(data[:200_000])
    hsize = struct.unpack_from("<i", bad, 14)[0]
    struct.pack_into("<ii", bad, 18 + hsize, 0, -5)  # a negative packet size
    with pytest.raises(EventFormatError, match="packet size -5"):
        Aedat4StreamDecoder(1 << 22, 1000).feed(bytes(bad))


def test_callers_buffer_is_not_modified(shared_events: Path):
    data = bytearray((shared_events / "aedat2/mnist_0_scale08_0001_qt1.aedat").read_bytes())
    before = bytes(data)
    rec = read(data)
    rec.events["x"][:] = 0
    assert bytes(data) == before


def test_unknown_format_and_bad_arguments():
    with pytest.raises(EventFormatError):
        read(b"\x00\x01\x02")
    with pytest.raises(ValueError):
        read(b"", format="mp4")
    with pytest.raises(TypeError):
        read(12345)  # type: ignore[arg-type]
    with pytest.raises(EventFormatError, match="cannot read"):
        read("/nonexistent/file.aedat4")
    assert events.read is read


def test_nmnist_matches_read_ndataset_reference(shared_events: Path):
    """A plain-Python transcription of the dataset's own Read_Ndataset.m."""
    path = shared_events / "nmnist/tonic_sample_nmnist.bin"
    b = path.read_bytes()
    ref, add = [], 0
    for i in range(0, len(b), 5):
        x, y, c2, c3, c4 = b[i : i + 5]
        if y == 240:
            add += 1 << 13
            continue
        ref.append(((((c2 & 127) << 16) | (c3 << 8) | c4) + add, x, y, c2 >> 7))
    ref.sort(key=lambda e: e[0])  # stable, like read()
    got = [tuple(int(v) for v in e) for e in read(path).events[["t", "x", "y", "p"]].tolist()]
    assert got == ref


def test_dat_matches_prophesee_loader_reference(shared_events: Path):
    """A plain-Python transcription of Prophesee's dat loader (x 14 bits, y 14 bits, p bit 28)."""
    path = shared_events / "dat/tonic_sample_ncars.dat"
    b = path.read_bytes()
    pos = 0
    while b.startswith(b"%", pos):
        pos = b.index(b"\n", pos) + 1
    ev_type, ev_size = b[pos], b[pos + 1]
    assert (ev_type, ev_size) == (0, 8)
    ref = [
        (t, a & 0x3FFF, (a >> 14) & 0x3FFF, (a >> 28) & 1) for t, a in struct.iter_unpack("<II", b[pos + 2 :])
    ]
    ref.sort(key=lambda e: e[0])
    rec = read(path)
    assert [tuple(int(v) for v in e) for e in rec.events[["t", "x", "y", "p"]].tolist()] == ref
    assert rec.metadata["sensor_size_from"] == "event coordinates"
