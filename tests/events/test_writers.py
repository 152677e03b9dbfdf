"""Writers: AEDAT 4.0 files that dv-processing, aedat and faery read back exactly; npz."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from events import EVENT_DTYPE, read, write_aedat4, write_npz


def _sample(n: int = 20_000, w: int = 346, h: int = 260, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = np.zeros(n, EVENT_DTYPE)
    e["t"] = 1_600_000_000_000_000 + np.sort(rng.integers(0, 5_000_000, n))
    e["x"] = rng.integers(0, w, n)
    e["y"] = rng.integers(0, h, n)
    e["p"] = rng.integers(0, 2, n)
    return e


@pytest.mark.parametrize("compression", ["lz4", "lz4_high", "zstd", "zstd_high", "none"])
def test_aedat4_round_trip_through_three_independent_readers(tmp_path: Path, compression):
    ev = _sample()
    path = tmp_path / "out.aedat4"
    write_aedat4(path, ev, 346, 260, compression=compression, packet_events=4096)
    ours = read(path)
    assert ours.format == "aedat4" and (ours.width, ours.height) == (346, 260)
    assert ours.metadata["compression"] == compression
    assert ours.metadata["packets"] == -(-len(ev) // 4096)
    np.testing.assert_array_equal(ours.events, ev)

    aedat = pytest.importorskip("aedat")
    dec = aedat.Decoder(str(path))
    assert dec.id_to_stream()[0] == {"type": "events", "width": 346, "height": 260}
    a = np.concatenate([p["events"] for p in dec])
    np.testing.assert_array_equal(a["t"].astype(np.int64), ev["t"])
    np.testing.assert_array_equal(a["x"], ev["x"])
    np.testing.assert_array_equal(a["on"], ev["p"] == 1)

    dv = pytest.importorskip("dv_processing")
    rec = dv.io.MonoCameraRecording(str(path))
    assert tuple(rec.getEventResolution()) == (346, 260)
    chunks = []
    while (b := rec.getNextEventBatch()) is not None:
        chunks.append(b.numpy())
    d = np.concatenate(chunks)
    np.testing.assert_array_equal(d["timestamp"], ev["t"])
    np.testing.assert_array_equal(d["y"], ev["y"])
    np.testing.assert_array_equal(d["polarity"], ev["p"])

    faery = pytest.importorskip("faery")
    stream = faery.events_stream_from_file(path)
    f = np.concatenate([np.asarray(c) for c in stream])
    np.testing.assert_array_equal(f["t"].astype(np.int64), ev["t"])
    np.testing.assert_array_equal(f["x"], ev["x"])


def test_aedat4_to_file_object_and_empty(tmp_path: Path):
    buf = io.BytesIO()
    write_aedat4(buf, np.zeros(0, EVENT_DTYPE), 128, 128)
    rec = read(buf.getvalue())
    assert len(rec) == 0 and (rec.width, rec.height) == (128, 128)


def test_aedat4_writer_rejects_bad_input(tmp_path: Path):
    ev = _sample(100, 64, 64)
    with pytest.raises(ValueError, match="outside"):
        write_aedat4(tmp_path / "a.aedat4", ev, 32, 32)
    with pytest.raises(ValueError, match="sorted"):
        write_aedat4(tmp_path / "a.aedat4", ev[::-1], 64, 64)
    with pytest.raises(ValueError, match="compression"):
        write_aedat4(tmp_path / "a.aedat4", ev, 64, 64, compression="gzip")
    with pytest.raises(ValueError, match="EVENT_DTYPE"):
        write_aedat4(tmp_path / "a.aedat4", np.zeros(3), 64, 64)


def test_npz_round_trip_keeps_size_and_metadata(tmp_path: Path):
    ev = _sample(1000, 640, 480)
    path = tmp_path / "e.npz"
    write_npz(path, ev, 640, 480, label=np.int64(3))
    rec = read(path)
    assert rec.format == "npz" and (rec.width, rec.height) == (640, 480)
    np.testing.assert_array_equal(rec.events, ev)
    with np.load(path, allow_pickle=False) as z:
        assert int(z["label"]) == 3
    with pytest.raises(ValueError):
        write_npz(tmp_path / "bad.npz", ev, 640, 480, meta={"a": 1})
