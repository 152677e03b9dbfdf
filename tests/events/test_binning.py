"""bin_events against a per-event reference, and the streaming Binner against bin_events."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import events
from events import EVENT_DTYPE, EventFormatError, EventLimitError
from events.binning import MNIST_DVS, ROI, Binner, BinSpec, bin_events, expand_segments


def reference(ev, roi, dt, t0, n_bins, polarity="split", mode="presence", pool=1):
    """One event at a time, the definition in INTERFACES.md written as plainly as possible."""
    h, w = roi.height // pool, roi.width // pool
    acc = np.zeros((n_bins, 2, h, w), dtype=np.int64)
    for t, x, y, p in zip(
        ev["t"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist(), strict=True
    ):
        k = (t - t0) // dt
        dx, dy = x - roi.x, y - roi.y
        if 0 <= k < n_bins and 0 <= dx < w * pool and 0 <= dy < h * pool and p in (0, 1):
            acc[k, p, dy // pool, dx // pool] += 1
    if polarity == "merge":
        acc = acc.sum(axis=1, keepdims=True)
    cells = (acc > 0).astype(np.int64) if mode == "presence" else np.minimum(acc, 255)
    if polarity == "signed":
        return np.clip(cells[:, 1:2] - cells[:, 0:1], -128, 127).astype(np.int8)
    return cells.astype(np.uint8)


def random_events(rng, n, width=40, height=30, t_span=50_000, sort=True):
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = rng.integers(0, t_span, n) + 1_000
    if sort:
        ev["t"].sort()
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


@pytest.mark.parametrize("polarity", ["split", "merge", "signed"])
@pytest.mark.parametrize("mode", ["presence", "count"])
@pytest.mark.parametrize("pool", [1, 3])
def test_bin_events_matches_reference(polarity, mode, pool):
    rng = np.random.default_rng(1)
    ev = random_events(rng, 3000, t_span=20_000)
    # Concentrate events so that counts exceed 1 and saturation at 255 happens in a few cells.
    hot = np.zeros(600, EVENT_DTYPE)
    hot["t"], hot["x"], hot["y"], hot["p"] = 5_000, 12, 9, 1
    ev = np.sort(np.concatenate([ev, hot]), order="t", kind="stable")
    roi = ROI(5, 4, 22, 17)
    got = bin_events(ev, roi, 1_000, 2_000, 15, polarity, mode, pool)
    want = reference(ev, roi, 1_000, 2_000, 15, polarity, mode, pool)
    c = 2 if polarity == "split" else 1
    assert got.shape == (15, c, 17 // pool, 22 // pool)
    assert got.dtype == (np.int8 if polarity == "signed" else np.uint8)
    np.testing.assert_array_equal(got, want)
    if mode == "count" and pool == 1 and polarity == "split":
        assert got[3, 1, 9 - 4, 12 - 5] == 255  # 600+ events saturate


def test_unsorted_and_out_of_window_events_and_input_untouched():
    rng = np.random.default_rng(2)
    ev = random_events(rng, 200_000, width=300, height=200, t_span=3_000_000, sort=False)
    ev["p"][::97] = 7  # not a polarity: ignored
    before = ev.copy()
    roi = ROI(100, 50, 64, 48)
    got = bin_events(ev, roi, 7_000, 500_000, 200, "split", "presence", 2)
    np.testing.assert_array_equal(ev, before)
    sel = ev[:20_000]  # the reference is slow: compare on a sub-set
    np.testing.assert_array_equal(
        bin_events(sel, roi, 7_000, 500_000, 200, "split", "presence", 2),
        reference(sel, roi, 7_000, 500_000, 200, "split", "presence", 2),
    )
    assert got.sum() > 0


def test_defaults_t0_first_event_and_n_bins_cover_last():
    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [1_234, 5_000, 31_233]
    ev["x"] = [0, 1, 2]
    out = bin_events(ev, ROI(0, 0, 4, 1), 10_000)
    # t0 = 1234: bins [1234, 11234), [11234, 21234), [21234, 31234) -> 3 bins, last event in bin 2.
    assert out.shape == (3, 2, 1, 4)
    assert out[0, 0, 0].tolist() == [1, 1, 0, 0]
    assert out[2, 0, 0].tolist() == [0, 0, 1, 0]
    assert bin_events(ev[:0], ROI(0, 0, 4, 1), 10_000).shape == (0, 2, 1, 4)
    # unsorted: the latest event is not the last one; it still sets the number of bins
    un = ev[[1, 2, 0]]
    out2 = bin_events(un, ROI(0, 0, 4, 1), 10_000, t0=1_234)
    np.testing.assert_array_equal(out2, out)
    # all events before t0: no bins
    assert bin_events(ev, ROI(0, 0, 4, 1), 10_000, t0=100_000).shape == (0, 2, 1, 4)


def test_large_output_count_path_matches_small_path():
    # More than 2**24 cells takes the per-chunk bincount path.
    rng = np.random.default_rng(3)
    ev = random_events(rng, 100_000, width=256, height=256, t_span=2_000_000)
    ev["x"][:5000], ev["y"][:5000], ev["p"][:5000], ev["t"][:5000] = 17, 9, 1, 5_000
    big = bin_events(ev, ROI(0, 0, 256, 256), 1_000, 1_000, 300, mode="count")
    assert big.size > 1 << 24
    small = np.concatenate(
        [
            bin_events(ev, ROI(0, 0, 256, 256), 1_000, 1_000 + 1_000 * i, 50, mode="count")
            for i in range(0, 300, 50)
        ]
    )
    np.testing.assert_array_equal(big, small)
    assert big[4, 1, 9, 17] == 255
    early = ev[ev["t"] < 51_000]  # the reference loops in Python: only the events of bins 0..49
    np.testing.assert_array_equal(
        big[:50], reference(early, ROI(0, 0, 256, 256), 1_000, 1_000, 50, mode="count")
    )


def test_binspec_and_roi_validation():
    assert ROI.centre(128, 128, 26, 26) == ROI(51, 51, 26, 26)
    assert ROI.full(346, 260) == ROI(0, 0, 346, 260)
    assert BinSpec(ROI(0, 0, 30, 20), 1000, "merge", pool=4).shape == (1, 5, 7)
    assert MNIST_DVS.shape == (2, 26, 26) and MNIST_DVS.dt_us == 10_000
    for bad in [dict(dt_us=0), dict(polarity="both"), dict(mode="sum"), dict(pool=0), dict(pool=40)]:
        kw = dict(roi=ROI(0, 0, 30, 20), dt_us=1000) | bad
        with pytest.raises(ValueError):
            BinSpec(**kw)
    with pytest.raises(ValueError):
        ROI.centre(20, 20, 26, 26)
    with pytest.raises(ValueError):
        Binner(BinSpec(ROI(0, 0, 4, 4), 1000), max_gap_us=10)


def stream(binner, ev, cuts):
    """Every segment of pushing ``ev`` cut at ``cuts`` and a flush, runs of empty bins expanded."""
    segs = []
    for a, b in zip([0, *cuts], [*cuts, len(ev)], strict=True):
        segs += binner.push(ev[a:b])
    segs += binner.flush()
    return expand_segments(segs, binner.spec.dt_us)


def concat(segs, shape, dtype=np.uint8):
    if not segs:
        return np.zeros((0, *shape), dtype)
    return np.concatenate([s.frames for s in segs])


SPECS = [
    BinSpec(ROI(3, 2, 20, 16), 1_000),
    BinSpec(ROI(0, 0, 40, 30), 2_500, "merge", "count", 2),
    BinSpec(ROI(10, 5, 30, 25), 700, "signed", "count", 1),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    spec_i=st.integers(0, len(SPECS) - 1),
    t0_given=st.booleans(),
    cut_fracs=st.lists(st.floats(0, 1), max_size=8),
)
def test_binner_any_chunking_equals_one_shot(seed, n, spec_i, t0_given, cut_fracs):
    rng = np.random.default_rng(seed)
    ev = random_events(rng, n, t_span=int(rng.integers(1, 60_000)))
    spec = SPECS[spec_i]
    t0 = 900 if t0_given else None
    cuts = sorted(int(f * n) for f in cut_fracs)
    b = Binner(spec, t0=t0, max_gap_us=None)
    segs = stream(b, ev, cuts)
    want = bin_events(ev, spec.roi, spec.dt_us, t0, None, spec.polarity, spec.mode, spec.pool)
    got = concat(segs, spec.shape, want.dtype)
    np.testing.assert_array_equal(got, want)
    assert b.bins_emitted == len(want) and b.late_events == 0 and b.gaps == 0
    assert not any(s.reset for s in segs)
    if segs:
        ends = np.concatenate([s.bin_end_us for s in segs])
        start = t0 if t0 is not None else int(ev["t"][0])
        np.testing.assert_array_equal(ends, start + spec.dt_us * np.arange(1, len(want) + 1))


@pytest.fixture(scope="module")
def mnist_dvs_events(shared_events):
    ev = events.read(shared_events / "aedat2" / "mnist_0_scale04_0001.aedat").events
    return ev, MNIST_DVS.bin(ev)


def test_mnist_dvs_preset_on_the_real_recording(mnist_dvs_events):
    ev, want = mnist_dvs_events
    assert want.shape == ((int(ev["t"][-1]) - int(ev["t"][0])) // 10_000 + 1, 2, 26, 26)
    # the crop holds the digit: most events, and cells set in every bin but a few
    inside = (ev["x"] >= 48) & (ev["x"] < 74) & (ev["y"] >= 54) & (ev["y"] < 80)
    assert inside.mean() > 0.8
    assert (want.reshape(len(want), -1).sum(1) > 0).mean() > 0.95


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(0, 15_744), max_size=60), t0_shift=st.integers(-5_000, 5_000))
def test_binner_real_recording_any_chunking(mnist_dvs_events, cuts, t0_shift):
    ev, want = mnist_dvs_events
    t0 = int(ev["t"][0]) + t0_shift if t0_shift else None
    if t0 is not None:
        want = MNIST_DVS.bin(ev, t0=t0)
    b = Binner(MNIST_DVS, t0=t0, max_gap_us=None)
    got = concat(stream(b, ev, sorted(cuts)), MNIST_DVS.shape)
    np.testing.assert_array_equal(got, want)
    assert b.late_events == (int(np.count_nonzero(ev["t"] < t0)) if t0 is not None else 0)


def test_binner_real_recording_one_event_at_a_time(mnist_dvs_events):
    ev, _ = mnist_dvs_events
    b = Binner(MNIST_DVS, max_gap_us=None)
    segs = []
    for i in range(2000):
        segs += b.push(ev[i : i + 1])
    segs = expand_segments(segs + b.flush(), MNIST_DVS.dt_us)
    np.testing.assert_array_equal(concat(segs, MNIST_DVS.shape), MNIST_DVS.bin(ev[:2000]))


def flatten(segs):
    """Per emitted bin: (end time, starts-a-reset-segment) and the frames, across push calls."""
    marks, frames = [], []
    for s in segs:
        marks += [(int(e), s.reset and i == 0) for i, e in enumerate(s.bin_end_us.tolist())]
        frames.append(s.frames)
    return marks, (np.concatenate(frames) if frames else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    shuffle=st.floats(0, 0.3),
    gaps=st.lists(st.integers(1, 299), max_size=3),
    cut_fracs=st.lists(st.floats(0, 1), max_size=10),
)
def test_binner_late_events_and_gaps_do_not_depend_on_chunking(seed, n, shuffle, gaps, cut_fracs):
    rng = np.random.default_rng(seed)
    ev = random_events(rng, n, t_span=40_000)
    for g in gaps:  # silences longer than max_gap_us
        ev["t"][g % n :] += 200_000
    swap = rng.random(n) < shuffle  # some events arrive out of order (late or not)
    idx = np.arange(n)
    idx[swap] = rng.permutation(idx[swap])
    ev = ev[idx]
    spec = SPECS[seed % len(SPECS)]
    whole = Binner(spec, max_gap_us=50_000)
    ref_marks, ref_frames = flatten(stream(whole, ev, []))
    b = Binner(spec, max_gap_us=50_000)
    marks, frames = flatten(stream(b, ev, sorted(int(f * n) for f in cut_fracs)))
    assert marks == ref_marks
    if ref_frames is not None:
        np.testing.assert_array_equal(frames, ref_frames)
    assert (b.late_events, b.gaps, b.bins_emitted) == (whole.late_events, whole.gaps, whole.bins_emitted)
    # no bin is stepped through a silence: emitted bins are bounded by the active spans
    assert b.bins_emitted <= (40_000 + 50_000) // spec.dt_us * (len(gaps) + 1) + 2 * (len(gaps) + 1)


def test_binner_late_events_dropped_and_counted():
    spec = BinSpec(ROI(0, 0, 4, 4), 1_000)
    ev = np.zeros(6, EVENT_DTYPE)
    ev["t"] = [0, 500, 2_100, 1_900, 2_500, 900]  # 1900 and 900 arrive after bin 2 opened
    ev["x"] = [0, 1, 2, 3, 0, 1]
    b = Binner(spec, t0=0)
    segs = b.push(ev[:3]) + b.push(ev[3:])
    assert b.late_events == 2
    segs += b.flush()
    frames = concat(expand_segments(segs, spec.dt_us), spec.shape)
    kept = ev[[0, 1, 2, 4]]
    np.testing.assert_array_equal(frames, bin_events(kept, spec.roi, 1_000, 0, 3))
    # after a flush the flushed bin is closed: an event in it is late, a later one opens bin 3+.
    assert b.push(ev[4:5]) == [] and b.late_events == 3
    assert b.flush() == []


def test_binner_steps_empty_bins_as_runs_and_reports_gaps():
    spec = BinSpec(ROI(0, 0, 4, 4), 1_000)
    ev = np.zeros(5, EVENT_DTYPE)
    ev["t"] = [100, 4_200, 4_300, 59_200, 60_050]  # 3 empty bins, then a 54.9 ms gap
    ev["x"] = [0, 1, 2, 3, 1]
    b = Binner(spec, max_gap_us=20_000)
    segs = b.push(ev[:4]) + b.push(ev[4:]) + b.flush()
    assert b.gaps == 1
    # t0 = 100: bin 0, bins 1-3 empty (one run, stepped but never materialized), bin 4, the gap,
    # then bin 59 alone
    assert [(s.reset, s.empty, len(s.frames)) for s in segs] == [
        (False, 0, 1),
        (False, 3, 0),
        (False, 0, 1),
        (True, 0, 1),
    ]
    assert [s.n_bins for s in segs] == [1, 3, 1, 1] and segs[1].bin_end_us.tolist() == [2_100]
    first = expand_segments(segs[:3], spec.dt_us)
    np.testing.assert_array_equal(
        np.concatenate([s.frames for s in first]), bin_events(ev[:3], spec.roi, 1_000, 100, 5)
    )
    assert np.concatenate([s.bin_end_us for s in first]).tolist() == [1_100, 2_100, 3_100, 4_100, 5_100]
    assert segs[3].bin_end_us.tolist() == [60_100]
    np.testing.assert_array_equal(segs[3].frames, bin_events(ev[3:], spec.roi, 1_000, 59_100, 1))
    assert b.bins_emitted == 6


def test_binner_gap_is_chunking_independent():
    rng = np.random.default_rng(5)
    spec = BinSpec(ROI(0, 0, 40, 30), 1_000)
    a = random_events(rng, 300, t_span=30_000)
    c = random_events(rng, 300, t_span=30_000)
    c["t"] += 10_000_000  # a 10 s silence
    ev = np.concatenate([a, c])
    outs = []
    for cuts in ([], [300], [1, 299, 301, 450], list(range(0, 600, 7))):
        b = Binner(spec, max_gap_us=500_000)
        segs = stream(b, ev, cuts)
        assert b.gaps == 1
        merged = [(s.reset, s.frames) for s in segs]
        resets = [r for r, _ in merged]
        assert resets.count(True) == 1
        i = resets.index(True)
        before = np.concatenate([f for _, f in merged[:i]])
        after = np.concatenate([f for _, f in merged[i:]])
        outs.append((before, after))
        # No bin is stepped through the silence: about 30 + 30 bins, not 10,000.
        assert b.bins_emitted < 100
    for before, after in outs[1:]:
        np.testing.assert_array_equal(before, outs[0][0])
        np.testing.assert_array_equal(after, outs[0][1])


def test_other_field_dtypes_negative_coordinates_are_outside():
    # e.g. tonic's dtype: x, y int16, p bool; negative coordinates must not wrap into the ROI
    dt = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])
    ev = np.zeros(5, dt)
    ev["t"] = [0, 10, 20, 30, 40]
    ev["x"] = [0, -1, 3, -32768, 2]
    ev["y"] = [0, 0, -2, 1, 1]
    ev["p"] = [True, False, True, True, False]
    out = bin_events(ev, ROI(0, 0, 4, 2), 100, 0, 1)
    want = np.zeros((1, 2, 2, 4), np.uint8)
    want[0, 1, 0, 0] = 1
    want[0, 0, 1, 2] = 1
    np.testing.assert_array_equal(out, want)
    sp = ev.astype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "i1")])
    sp["p"] = [1, 0, 1, 1, -1]  # a negative polarity is not a polarity: ignored
    want[0, 0, 1, 2] = 0
    np.testing.assert_array_equal(bin_events(sp, ROI(0, 0, 4, 2), 100, 0, 1), want)


# ---------------------------------------------------------------- the compiled streaming loop
def _live_stream(seed: int, n: int = 3000, sensor: int = 40) -> np.ndarray:
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


def _bins(b: Binner, pushes: list[np.ndarray | None], packed: bool) -> tuple[list, np.ndarray]:
    """Per bin (end, reset) and the expanded frames of pushing each chunk (None: a flush)."""
    segs = []
    for chunk in pushes:
        if chunk is None:
            segs += b.flush()
        elif packed:
            segs += b.push_packed(
                np.frombuffer(b"head" + chunk.tobytes(), np.uint8), 4, len(chunk), check=False
            )
        else:
            segs += b.push(chunk)
    return flatten(expand_segments(segs, b.spec.dt_us))


@pytest.mark.parametrize(
    ("seed", "polarity", "mode", "pool", "t0", "packed"),
    [
        (0, "split", "presence", 1, None, True),
        (1, "split", "count", 1, None, False),
        (2, "merge", "presence", 2, 900_000, True),
        (3, "merge", "count", 3, None, True),
        (4, "split", "presence", 2, 1_005_000, False),
        (5, "signed", "count", 1, None, True),
    ],
)
def test_compiled_and_numpy_binner_agree_on_live_streams(seed, polarity, mode, pool, t0, packed, monkeypatch):
    """The compiled loop (what a stream's packets take) and the numpy path give the same bins,
    resets, late events and gaps for any chunking, flushes in between included."""
    ev = _live_stream(seed)
    spec = BinSpec((5, 7, 24, 18), 10_000, polarity, mode, pool)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(ev)), size=60, replace=False)).tolist()
    pushes: list[np.ndarray | None] = []
    for a, b in zip([0, *cuts], [*cuts, len(ev)], strict=True):
        pushes.append(ev[a:b])
        if rng.random() < 0.1:
            pushes.append(None)  # a flush in the middle of the stream
    pushes.append(None)
    monkeypatch.setenv("VDIB_NUMBA", "0")
    ref = Binner(spec, t0=t0, max_gap_us=200_000)
    ref_marks, ref_frames = _bins(ref, pushes, False)
    monkeypatch.setenv("VDIB_NUMBA", "1")
    fast = Binner(spec, t0=t0, max_gap_us=200_000)
    marks, frames = _bins(fast, pushes, packed)
    assert ref.late_events > 0 and ref.gaps > 0 and sum(r for _, r in ref_marks) == ref.gaps  # exercised
    assert marks == ref_marks and np.array_equal(frames, ref_frames)
    assert (fast.late_events, fast.gaps, fast.bins_emitted) == (ref.late_events, ref.gaps, ref.bins_emitted)


@pytest.mark.parametrize("numba", ["0", "1"])
def test_long_silences_are_runs_and_max_bins_is_checked_before_binning(numba, monkeypatch):
    monkeypatch.setenv("VDIB_NUMBA", numba)
    spec = BinSpec((0, 0, 4, 4), 1_000, "split", "presence", 1)
    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 500, 999_999_000]  # ~1M empty bins in between, without a gap
    ev["x"] = [1, 2, 3]
    segs = Binner(spec, max_gap_us=None).push(ev)
    assert [(s.empty, len(s.frames)) for s in segs] == [(0, 1), (999_998, 0)]  # nothing materialized
    assert segs[1].bin_end_us.tolist() == [2_000]
    # the same silence against a budget: refused before binning it
    b = Binner(spec, max_gap_us=None)
    with pytest.raises(EventLimitError, match="max_bins=1000"):
        b.push(ev, max_bins=1000)
    b = Binner(spec, max_gap_us=None)
    assert sum(s.n_bins for s in b.push(ev[:2], max_bins=0)) == 0  # the open bin is not complete
    dense = np.zeros(50, EVENT_DTYPE)
    dense["t"] = np.arange(50) * 1_000  # 49 complete bins, each with an event
    with pytest.raises(EventLimitError):
        Binner(spec).push(dense, max_bins=48)
    assert sum(s.n_bins for s in Binner(spec).push(dense, max_bins=49)) == 49


def test_packed_polarity_check_bins_nothing(monkeypatch):
    spec = BinSpec((0, 0, 4, 4), 1_000, "split", "presence", 1)
    ev = np.zeros(2, EVENT_DTYPE)
    ev["t"] = [0, 2_000]
    ev["p"] = [1, 2]
    for numba in ("0", "1"):
        monkeypatch.setenv("VDIB_NUMBA", numba)
        b = Binner(spec)
        with pytest.raises(EventFormatError, match="polarity"):
            b.push_packed(np.frombuffer(ev.tobytes(), np.uint8), 0, 2)
        assert b.t0 is None and b.late_events == 0  # nothing was binned
        with pytest.raises(EventFormatError, match="do not fit"):
            b.push_packed(np.frombuffer(ev.tobytes(), np.uint8), 1, 2)


def test_huge_rois_cost_their_sides_not_their_area():
    """A 16384 x 16384 sensor pooled to 26 x 26: tables follow the sides (a few hundred kB, cached
    within TABLE_CACHE_BYTES), never the area (GBs); a frame larger than MAX_FRAME_CELLS is refused
    before anything is allocated."""
    from events import binning

    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 10, 20]
    ev["x"] = [0, 8000, 16_000]
    ev["y"] = [0, 8000, 16_000]
    roi, pool = ROI(0, 0, 16380, 16380), 630
    frames = bin_events(ev, roi, 1_000, pool=pool)
    assert frames.shape == (1, 2, 26, 26) and frames.sum() == 3
    b = Binner(BinSpec(roi, 1_000, pool=pool))
    assert b.push(ev) == [] and b.flush()[0].frames.sum() == 3
    assert binning._TABLES.nbytes <= binning.TABLE_CACHE_BYTES
    for i in range(100):  # many ROIs: the cache stays within its bytes
        bin_events(ev, ROI(i, 0, 16000, 16000), 1_000, pool=500)
    assert binning._TABLES.nbytes <= binning.TABLE_CACHE_BYTES
    with pytest.raises(ValueError, match="MAX_FRAME_CELLS|over the limit"):
        BinSpec(ROI(0, 0, 16384, 16384), 1_000)


@pytest.mark.parametrize("seed", range(4))
def test_count_bins_is_what_the_binner_steps(seed):
    """``count_bins`` (a service's budget check before binning) equals the bins the streaming
    binner emits, gaps and runs of empty bins included, for sorted times."""
    from events.binning import count_bins

    ev = _live_stream(seed)
    ev = ev[np.argsort(ev["t"], kind="stable")]
    spec = BinSpec((5, 7, 24, 18), 10_000)
    for gap in (200_000, None):
        b = Binner(spec, max_gap_us=gap)
        n = sum(s.n_bins for s in b.push(ev) + b.flush())
        assert count_bins(ev["t"], spec.dt_us, gap) == n == b.bins_emitted
    assert count_bins(ev["t"][:0], 10, 1) == 0
