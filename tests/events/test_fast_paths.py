"""The compiled (numba) fast paths equal the numpy fallbacks; AEDAT 4 size accounting is a
function of the bytes alone (the total decompression cap does not depend on timing, on what
was read before or on a file changing under the reader)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

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
    if request.param == "numba" and not _jit.enabled():
        pytest.skip("numba not importable")
    monkeypatch.setenv("VDIB_NUMBA", "1" if request.param == "numba" else "0")
    return request.param


def _dv_like_lz4(path: Path, ev: np.ndarray, w: int, h: int, monkeypatch) -> None:
    """Our writer with DV's LZ4 frames: no content size stored."""
    import lz4.frame

    from events import writers

    monkeypatch.setattr(writers, "_compressor", lambda c: (lambda b: lz4.frame.compress(b, store_size=False)))
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
