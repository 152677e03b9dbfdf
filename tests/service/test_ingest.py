"""service.ingest.StreamBinner gives the bins, counters and resets of events.Binner."""

from __future__ import annotations

import numpy as np
import pytest

from events import EVENT_DTYPE, Binner, BinSpec, expand_segments
from service.ingest import StreamBinner, make_binner
from service.protocol import encode_events


def _stream(seed: int, n: int = 3000, sensor: int = 40) -> np.ndarray:
    """Mostly sorted events with jitter (late events), a few long silences (gaps), coordinates
    partly outside the ROI and rare polarities other than 0/1."""
    rng = np.random.default_rng(seed)
    steps = rng.exponential(400.0, n).astype(np.int64)
    gaps = rng.random(n) < 0.003
    steps[gaps] += rng.integers(50_000, 2_500_000, gaps.sum())
    t = 1_000_000 + np.cumsum(steps)
    t += rng.integers(-15_000, 3_000, n) * (rng.random(n) < 0.05)  # some events arrive late
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = t
    ev["x"] = rng.integers(0, sensor, n)
    ev["y"] = rng.integers(0, sensor, n)
    ev["p"] = rng.integers(0, 2, n)
    ev["p"][rng.random(n) < 0.01] = 3
    return ev


def _chunks(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 60), replace=False))
    return [0, *cuts.tolist(), n]


def _ref(b: Binner, pushes: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames, ends, resets = [], [], []
    for chunk in pushes:
        segs = expand_segments(b.push(chunk) if chunk is not None else b.flush(), b.spec.dt_us)
        for s in segs:
            frames.append(s.frames)
            ends.append(s.bin_end_us)
            r = np.zeros(len(s.frames), bool)
            r[:1] = s.reset
            resets.append(r)
    return np.concatenate(frames), np.concatenate(ends), np.concatenate(resets)


def _fast(b: StreamBinner, pushes: list[np.ndarray | None], packed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames, ends, resets = [], [], []
    for chunk in pushes:
        if chunk is None:
            parts = b.flush()
        elif packed:
            data = np.frombuffer(encode_events(chunk), np.uint8)
            parts = b.push_packed(data, 12, len(chunk), check=False)
        else:
            parts = b.push(chunk)
        for f, e, r in parts:
            frames.append(f)
            ends.append(e)
            resets.append(r)
    return np.concatenate(frames), np.concatenate(ends), np.concatenate(resets)


@pytest.mark.parametrize(
    ("seed", "polarity", "mode", "pool", "t0", "packed"),
    [
        (0, "split", "presence", 1, None, True),
        (1, "split", "count", 1, None, False),
        (2, "merge", "presence", 2, 900_000, True),
        (3, "merge", "count", 3, None, True),
        (4, "split", "presence", 2, 1_005_000, False),
    ],
)
def test_stream_binner_equals_events_binner(seed, polarity, mode, pool, t0, packed):
    ev = _stream(seed)
    spec = BinSpec((5, 7, 24, 18), 10_000, polarity, mode, pool)
    bounds = _chunks(len(ev), seed)
    rng = np.random.default_rng(seed + 100)
    pushes: list[np.ndarray | None] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pushes.append(ev[a:b])
        if rng.random() < 0.1:
            pushes.append(None)  # a flush in the middle of the stream
    pushes.append(None)
    ref_b = Binner(spec, t0=t0, max_gap_us=200_000)
    fast_b = StreamBinner(spec, t0=t0, max_gap_us=200_000)
    rf, re, rr = _ref(ref_b, pushes)
    ff, fe, fr = _fast(fast_b, pushes, packed)
    assert ref_b.late_events > 0 and ref_b.gaps > 0 and rr.sum() == ref_b.gaps  # the stream exercises both
    assert rf.shape == ff.shape and np.array_equal(rf, ff)
    assert np.array_equal(re, fe) and np.array_equal(rr, fr)
    assert (fast_b.late_events, fast_b.gaps) == (ref_b.late_events, ref_b.gaps)


def test_long_silence_without_gap_emits_every_empty_bin():
    spec = BinSpec((0, 0, 4, 4), 1_000, "split", "presence", 1)
    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 500, 95_000]  # 94 empty bins in between, more than one kernel call holds
    ev["x"] = [1, 2, 3]
    ref = expand_segments(Binner(spec, max_gap_us=None).push(ev), spec.dt_us)
    got = StreamBinner(spec, max_gap_us=None).push(ev)
    assert np.array_equal(np.concatenate([s.frames for s in ref]), np.concatenate([g[0] for g in got]))
    assert np.array_equal(np.concatenate([s.bin_end_us for s in ref]), np.concatenate([g[1] for g in got]))


def test_packed_polarity_check_and_fallback():
    spec = BinSpec((0, 0, 4, 4), 1_000, "split", "presence", 1)
    ev = np.zeros(2, EVENT_DTYPE)
    ev["t"] = [0, 2_000]
    ev["p"] = [1, 2]
    b = StreamBinner(spec)
    with pytest.raises(ValueError, match="polarity"):
        b.push_packed(np.frombuffer(encode_events(ev), np.uint8), 12, 2)
    assert b.t0 is None and b.late_events == 0  # nothing was binned
    signed = make_binner(BinSpec((0, 0, 4, 4), 1_000, "signed", "presence", 1), None, 10_000)
    assert not isinstance(signed, StreamBinner)
    (frames, ends, reset), = signed.push(ev[:1]) + signed.flush()
    assert frames.dtype == np.int8 and ends == [1_000] and reset == [False]
