"""The compiled (numba) fast paths equal the numpy fallbacks; AEDAT 4 size accounting is a
function of the bytes alone (the total decompression cap does not depend on timing, on what
was read before or on a file changing under the reader)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import events
from events import EVENT_DTYPE, EventFormatError, read
from events.formats import _jit
from events.formats import aedat4 as aedat4_mod


def _synthetic(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 3_000_000, n))
    ev["x"] = rng.integers(0, w, n)
    ev["y"] = rng.integers(0, h, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Run the test once with compiled kernels and once with the pure-numpy fallbacks."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("VDIB_NUMBA", "1" if request.param == "numba" else "0")
    return request.param


def _dv_like_lz4(path: Path, ev: np.ndarray, w: int, h: int, monkeypatch) -> None:
    """Our writer with DV's LZ4 frames: no content size stored."""
    import lz4.frame

    from events import writers

    monkeypatch.setattr(writers, "_compressor", lambda c: lambda b: lz4.frame.compress(b, store_size=False))
    events.write_aedat4(path, ev, w, h, "lz4", packet_events=2000)
    monkeypatch.undo()


def test_aedat4_total_cap_counts_what_packets_really_inflate_to(tmp_path: Path, monkeypatch):
    """Regression: the 255:1 LZ4 bound of size-less frames guards each packet but must not be
    summed into the total (that refused a legitimate 77 MB file as "more than 4 GiB"); the
    result is the same on every read."""
    ev = _synthetic(40_000, 346, 260)
    path = tmp_path / "dv.aedat4"
    _dv_like_lz4(path, ev, 346, 260, monkeypatch)
    compressed = path.stat().st_size
    inflated = len(ev) * 16  # EventPacket elements
    bound = 255 * compressed
    cap = 3 * inflated
    assert bound > 10 * cap  # summing the bounds would refuse this file
    first = read(path, max_decompressed=cap)
    for _ in range(3):
        again = read(path, max_decompressed=cap)
        assert np.array_equal(again.events, first.events)
    assert np.array_equal(first.events, ev)
    with pytest.raises(EventFormatError, match="max_decompressed"):
        read(path, max_decompressed=inflated // 4)


def test_aedat4_file_growing_while_read_is_refused(tmp_path: Path, monkeypatch):
    """A recording appended to between the pre-scan and the decode is refused, never decoded
    past what the pre-scan bounded."""
    ev = _synthetic(6_000, 64, 64)
    path = tmp_path / "live.aedat4"
    events.write_aedat4(path, ev, 64, 64, "lz4", packet_events=1000)
    tail = path.read_bytes()
    pos = 14 + 4 + struct.unpack_from("<I", tail, 14)[0]
    packet = tail[pos : pos + 8 + struct.unpack_from("<iI", tail, pos)[1]]
    real = aedat4_mod.prescan

    def prescan_then_append(*args, **kw):
        out = real(*args, **kw)
        with open(path, "ab") as f:
            f.write(packet)
        return out

    monkeypatch.setattr(aedat4_mod, "prescan", prescan_then_append)
    with pytest.raises(EventFormatError, match="changed while it was read|more packets"):
        read(path)
    monkeypatch.setattr(aedat4_mod, "prescan", real)
    with pytest.raises(EventFormatError, match="backwards"):  # now the appended packet is decoded
        read(path)


def test_aedat4_fast_path_equals_fallback(tmp_path: Path, kernels):
    ev = _synthetic(50_000, 346, 260, seed=3)
    for comp in ("lz4", "zstd", "none"):
        path = tmp_path / f"a_{comp}.aedat4"
        events.write_aedat4(path, ev, 346, 260, comp, packet_events=4096)
        rec = read(path)
        assert np.array_equal(rec.events, ev)
        assert rec.events.flags.owndata and rec.events.flags.c_contiguous
        assert rec.metadata["time_backsteps"] == 0
    # out of order across packets (packets 0 and 1 swapped): found by the scan, then sorted
    raw = tmp_path / "swapped.aedat4"
    path = tmp_path / "ok.aedat4"
    dense = ev[:8192].copy()
    dense["t"] = np.sort(np.random.default_rng(1).integers(0, 8_000, 8192))  # backstep < 10 ms
    events.write_aedat4(path, dense, 346, 260, "lz4", packet_events=4096)
    data = bytearray(path.read_bytes())
    pos = 14 + 4 + struct.unpack_from("<I", data, 14)[0]
    p0 = bytes(data[pos : pos + 8 + struct.unpack_from("<iI", data, pos)[1]])
    p1 = bytes(data[pos + len(p0) :])
    raw.write_bytes(bytes(data[:pos]) + p1 + p0)
    rec = read(raw)
    assert np.array_equal(rec.events["t"], dense["t"])
    assert rec.metadata["time_backsteps"] == 1
    # off the sensor: the scan's x/y maxima
    big = ev[:5000].copy()
    path = tmp_path / "off.aedat4"
    events.write_aedat4(path, big, 346, 260, "lz4")
    data = path.read_bytes().replace(b'"sizeX" type="int">346', b'"sizeX" type="int">300')
    with pytest.raises(EventFormatError, match="outside the 300x260"):
        read(data)


def _both(data: bytes, monkeypatch, **kw):
    """read() with kernels on and off: (events, metadata) or the error message, each."""
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("VDIB_NUMBA", flag)
        try:
            rec = read(data, **kw)
            out.append((rec.events, rec.metadata, (rec.width, rec.height)))
        except EventFormatError as exc:
            out.append(str(exc))
    return out


def _same(a, b) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert np.array_equal(a[0], b[0]) and a[0].dtype == b[0].dtype
    assert a[1] == b[1] and a[2] == b[2]


def _evt3_words(rng: np.random.Generator, n: int, junk: float) -> np.ndarray:
    """A plausible EVT 3.0 stream: TIME_HIGH stepping up (and looping past 4095), TIME_LOW,
    ADDR_Y, ADDR_X, vector bases and 12/8-bit vectors, plus a fraction of other words."""
    words = []
    th = int(rng.integers(0, 4096))
    if rng.random() < 0.3:
        words += [0x2000 | int(rng.integers(0, 640)), 0x4FFF]  # before the first TIME_HIGH: dropped
    words.append(0x8000 | th)
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            th = (th + int(rng.integers(0, 3))) % 4096
            words.append(0x8000 | th)
        elif r < 0.15:
            words.append(0x6000 | int(rng.integers(0, 4096)))
        elif r < 0.3:
            words.append(0x0000 | int(rng.integers(0, 480)))
        elif r < 0.55:
            words.append(0x2000 | int(rng.integers(0, 2)) << 11 | int(rng.integers(0, 640)))
        elif r < 0.65:
            words.append(0x3000 | int(rng.integers(0, 2)) << 11 | int(rng.integers(0, 600)))
        elif r < 0.8:
            words.append(0x4000 | int(rng.integers(0, 4096)))
        elif r < 0.9:
            words.append(0x5000 | int(rng.integers(0, 256)))
        elif r < 0.9 + junk:
            words.append(
                int(rng.choice([0x1, 0x7, 0x9, 0xA, 0xB, 0xE, 0xF])) << 12 | int(rng.integers(0, 4096))
            )
    return np.array(words, "<u2")


@pytest.mark.parametrize("seed", range(12))
def test_evt3_kernel_equals_numpy(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    head = b"% evt 3.0\n% format EVT3;height=480;width=640\n% end\n" if seed % 3 else b"% evt 3.0\n"
    w = _evt3_words(rng, int(rng.integers(1, 4000)), junk=0.1 if seed % 2 else 0.0)
    a, b = _both(head + w.tobytes(), monkeypatch)
    _same(a, b)
    if seed == 0:
        assert not isinstance(a, str) and len(a[0]) > 100  # the generator makes readable streams


def test_evt3_kernel_grows_output_and_reports_vector_overflow(monkeypatch):
    # 12 events per word: the output starts at one event per word and must grow
    w = np.array([0x8000, 0x6000, 0x0005, 0x3000] + [0x4FFF] * 40 + [0x3000 | 100] + [0x5FFF] * 3, "<u2")
    a, b = _both(b"% evt 3.0\n% format EVT3;height=480;width=1280\n" + w.tobytes(), monkeypatch)
    _same(a, b)
    assert len(a[0]) == 40 * 12 + 24
    # a base advanced past x = 65535 by vectors
    w = np.array([0x8000, 0x3000 | 0x7FF] + [0x4000] * 5500 + [0x4001], "<u2")
    a, b = _both(b"% evt 3.0\n" + w.tobytes(), monkeypatch)
    assert isinstance(a, str) and "runs past x=" in a
    _same(a, b)
    # max_events holds while growing
    w = np.array([0x8000, 0x3000] + [0x4FFF] * 100, "<u2")
    a, b = _both(b"% evt 3.0\n" + w.tobytes(), monkeypatch, max_events=500)
    assert all(isinstance(r, str) and "more than max_events=500" in r for r in (a, b))  # counts differ


@pytest.mark.parametrize("seed", range(8))
def test_evt2_kernel_equals_numpy(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 5000))
    typ = rng.choice([0, 1, 8, 0xA, 0xE, 0xF, 3], n, p=[0.4, 0.4, 0.1, 0.03, 0.03, 0.02, 0.02]).astype(
        np.uint32
    )
    th = np.cumsum(typ == 8).astype(np.uint32)
    if seed % 2:  # TIME_HIGH wrapping past 2^28
        th = (th + (1 << 28) - 5) & 0x0FFFFFFF
    low = rng.integers(0, 1 << 28, n).astype(np.uint32)
    low = np.where(
        typ <= 1,
        (rng.integers(0, 64, n) << 22) | (rng.integers(0, 640, n) << 11) | rng.integers(0, 480, n),
        low,
    ).astype(np.uint32)
    w = (typ << 28) | np.where(typ == 8, th, low)
    head = b"% evt 2.0\n% format EVT2;height=480;width=640\n" if seed % 3 else b"% evt 2.0\n"
    a, b = _both(head + w.astype("<u4").tobytes(), monkeypatch)
    _same(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_dat_kernel_equals_numpy(seed, monkeypatch):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(1, 5000))
    t = np.cumsum(rng.integers(0, 3, n)).astype(np.int64) + (2**32 - 1000 if seed % 2 else 0)
    rec = np.zeros(n, [("t", "<u4"), ("a", "<u4")])
    rec["t"] = t & 0xFFFFFFFF
    w = 1 << int(rng.integers(6, 14))
    rec["a"] = rng.integers(0, w, n) | (rng.integers(0, 300, n) << 14) | (rng.integers(0, 2, n) << 28)
    head = b"% Version 2\n" + (b"% Width 8192\n% Height 300\n" if seed % 3 == 0 else b"") + bytes([0, 8])
    a, b = _both(head + rec.tobytes(), monkeypatch)
    _same(a, b)
    if seed % 2 and not isinstance(a, str):
        assert a[1]["time_wraps"] == 1


def test_npz_views_are_crc_checked_and_copied(tmp_path: Path):
    ev = _synthetic(20_000, 346, 260, seed=5)
    path = tmp_path / "a.npz"
    events.write_npz(path, ev, 346, 260)
    rec = read(path)
    assert np.array_equal(rec.events, ev) and rec.events.flags.owndata and rec.events.flags.writeable
    assert (rec.width, rec.height) == (346, 260)
    data = bytearray(path.read_bytes())
    i = data.index(ev[10_000:10_001].tobytes())
    data[i + 9] ^= 0x01  # one bit of an x coordinate: still a plausible event
    with pytest.raises(EventFormatError, match="CRC"):
        read(bytes(data))
    # compressed members and other dtypes still go through the general path
    packed = tmp_path / "c.npz"
    np.savez_compressed(packed, events=ev, width=np.int64(346), height=np.int64(260))
    assert np.array_equal(read(packed).events, ev)
    tonic = np.zeros(len(ev), [("x", "<i2"), ("y", "<i2"), ("t", "<u8"), ("p", "?")])
    for k in ("x", "y", "t"):
        tonic[k] = ev[k]
    tonic["p"] = ev["p"] == 1
    np.save(tmp_path / "tonic.npy", tonic)
    assert np.array_equal(read(tmp_path / "tonic.npy").events, ev)
    wide_p = ev.copy()
    wide_p["p"] *= 7  # p other than 0/1 is normalised, as before
    np.save(tmp_path / "p.npy", wide_p)
    assert np.array_equal(read(tmp_path / "p.npy").events, ev)


def _binning_inputs(seed: int) -> np.ndarray:
    rng = np.random.default_rng(300 + seed)
    n = int(rng.integers(0, 3000))
    if seed % 3 == 0:  # a signed input dtype: negative coordinates and polarities fall outside
        ev = np.zeros(n, [("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")])
        ev["x"] = rng.integers(-5, 70, n)
        ev["y"] = rng.integers(-5, 50, n)
        ev["p"] = rng.integers(-1, 3, n)
    else:
        ev = np.zeros(n, EVENT_DTYPE)
        ev["x"] = rng.integers(0, 70, n)
        ev["y"] = rng.integers(0, 50, n)
        ev["p"] = rng.integers(0, 2 if seed % 2 else 3, n)
    ev["t"] = rng.integers(-2_000, 60_000, n)
    if seed % 4:
        ev.sort(order="t", kind="stable")
    return ev


@pytest.mark.parametrize("seed", range(9))
def test_binning_kernel_equals_numpy(seed, monkeypatch):
    from events.binning import ROI, Binner, BinSpec, bin_events

    ev = _binning_inputs(seed)
    nonzero = 0
    for roi, pool in ((ROI(0, 0, 64, 48), 1), (ROI(3, 5, 40, 30), 4), (ROI(10, 7, 13, 9), 2)):
        for polarity in ("split", "merge", "signed"):
            for mode in ("presence", "count"):
                for t0, n_bins in ((None, None), (0, 7), (-1_000, 3)):
                    got = []
                    for flag in ("1", "0"):
                        monkeypatch.setenv("VDIB_NUMBA", flag)
                        got.append(bin_events(ev, roi, 5_000, t0, n_bins, polarity, mode, pool))
                    assert got[0].dtype == got[1].dtype and np.array_equal(got[0], got[1])
                    nonzero += int(np.count_nonzero(got[0]))
    assert nonzero > 0 or len(ev) < 50  # the cases are not all empty
    # the streaming Binner on the numpy path equals bin_events on the compiled one
    if len(ev) and seed % 4:
        spec = BinSpec(ROI(0, 0, 64, 48), 5_000, "split", "count")
        monkeypatch.setenv("VDIB_NUMBA", "1")
        whole = spec.bin(ev)
        monkeypatch.setenv("VDIB_NUMBA", "0")
        b = Binner(spec, max_gap_us=None)
        frames = [seg.frames for i in range(0, len(ev), 97) for seg in b.push(ev[i : i + 97])]
        frames += [seg.frames for seg in b.flush()]
        assert np.array_equal(np.concatenate(frames), whole)
        assert b.late_events == 0


def test_saturating_counts_in_the_kernel(monkeypatch):
    from events.binning import ROI, bin_events

    ev = np.zeros(700, EVENT_DTYPE)
    ev["x"], ev["y"], ev["p"] = 3, 2, 1
    ev["t"] = np.arange(700)
    ev["p"][:300] = 0
    for flag in ("1", "0"):
        monkeypatch.setenv("VDIB_NUMBA", flag)
        out = bin_events(ev, ROI(0, 0, 8, 4), 10_000, 0, 1, "split", "count")
        assert out[0, 1, 2, 3] == 255 and out[0, 0, 2, 3] == 255 and out.sum() == 510
        signed = bin_events(ev, ROI(0, 0, 8, 4), 10_000, 0, 1, "signed", "count")
        assert signed[0, 0, 2, 3] == 0  # min(400, 255) - min(300, 255)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(
        [
            b"% evt 3.0\n",
            b"% evt 2.0\n",
            b"% Version 2\n",
            b"% Version 2\n\x00\x08",
            b"% evt 3.0\n% format EVT3;height=480;width=640\n",
        ]
    ),
    body=st.binary(max_size=2048),
)
def test_kernels_and_numpy_agree_on_random_bytes(prefix: bytes, body: bytes):
    """Random words behind EVT/DAT headers: the compiled and numpy decoders give the same
    recording or the same kind of error."""
    import os

    out = []
    old = os.environ.get("VDIB_NUMBA")
    try:
        for flag in ("1", "0"):
            os.environ["VDIB_NUMBA"] = flag
            try:
                rec = read(prefix + body)
                out.append((rec.events, rec.metadata, rec.width, rec.height))
            except EventFormatError as exc:
                out.append(str(exc))
    finally:
        if old is None:
            os.environ.pop("VDIB_NUMBA", None)
        else:
            os.environ["VDIB_NUMBA"] = old
    a, b = out
    if isinstance(a, str) or isinstance(b, str):
        assert isinstance(a, str) and isinstance(b, str)
        assert a == b or ("max_events" in a and "max_events" in b)
    else:
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]


def test_evt3_vector_without_any_base(monkeypatch):
    """Regression (numpy path): a vector word in a stream with no VECT_BASE_X at all was an
    IndexError ("malformed input"); it is skipped and counted, as by the compiled decoder."""
    data = b"% evt 3.0\n" + np.array([0, 0, 0, 0, 0x8000, 0x4000 | 0x5], "<u2").tobytes()
    a, b = _both(data, monkeypatch)
    _same(a, b)
    assert not isinstance(a, str) and len(a[0]) == 0
    assert a[1]["skipped"]["vector_without_base"] == 1


def _small_aedat4() -> bytes:
    import io

    buf = io.BytesIO()
    ev = _synthetic(3000, 64, 48, seed=9)
    events.write_aedat4(buf, ev, 64, 48, "lz4", packet_events=500)
    return buf.getvalue()


_A4 = _small_aedat4()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, len(_A4) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_aedat4_kernel_and_numpy_agree_on_mutated_files(flips):
    import os

    data = bytearray(_A4)
    for i, v in flips:
        data[i] ^= v
    out = []
    old = os.environ.get("VDIB_NUMBA")
    try:
        for flag in ("1", "0"):
            os.environ["VDIB_NUMBA"] = flag
            try:
                rec = read(bytes(data))
                out.append((rec.events, rec.width, rec.height, rec.metadata.get("time_backsteps")))
            except EventFormatError as exc:
                out.append(str(exc))
    finally:
        if old is None:
            os.environ.pop("VDIB_NUMBA", None)
        else:
            os.environ["VDIB_NUMBA"] = old
    a, b = out
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]


def test_kernel_switch(monkeypatch):
    """VDIB_NUMBA: unset = kernels for inputs of at least MIN_SIZE, 1 = always, 0 = never."""
    pytest.importorskip("numba")
    from events.formats._common import scan_packed

    monkeypatch.delenv("VDIB_NUMBA", raising=False)
    assert _jit.kernel(scan_packed, _jit.MIN_SIZE - 1) is None
    assert _jit.kernel(scan_packed, _jit.MIN_SIZE) is not None
    assert _jit.kernel(scan_packed) is not None  # size unknown: long-lived users
    monkeypatch.setenv("VDIB_NUMBA", "1")
    assert _jit.kernel(scan_packed, 10) is not None
    monkeypatch.setenv("VDIB_NUMBA", "0")
    assert _jit.kernel(scan_packed, 10**9) is None and not _jit.enabled()
