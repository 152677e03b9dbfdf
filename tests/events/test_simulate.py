"""The DVS simulator: closed-form event counts and times, refractory, mismatch, noise, MNIST-DVS."""

from __future__ import annotations

import math

import numpy as np
import pytest

import events
from events import EVENT_DTYPE
from events.simulate import DVSParams, place_image, recording_stats, simulate, simulate_mnist_dvs

EXACT = DVSParams(threshold_on=0.2, threshold_off=0.2, threshold_sigma=0.0, refractory_us=0.0, eps=1e-9)


def test_step_gives_floor_of_log_change_over_threshold_with_interpolated_times():
    # Intensity 1 -> e^0.9 over 1 ms: ON crossings at log levels 0.2, 0.4, 0.6, 0.8 -> 4 events,
    # the j-th at t = 1000 * 0.2 j / 0.9 us (linear interpolation of log intensity).
    frames = np.ones((2, 3, 4))
    frames[1] = math.exp(0.9)
    ev = simulate(frames, [0, 1000], EXACT, seed=0)
    assert ev.dtype == EVENT_DTYPE and len(ev) == 4 * 12
    assert np.all(ev["p"] == 1)
    want_t = 1000 * 0.2 * np.arange(1, 5) / 0.9
    for x in range(4):
        for y in range(3):
            t = ev["t"][(ev["x"] == x) & (ev["y"] == y)]
            np.testing.assert_allclose(t, want_t, atol=1)
    # Down again by 0.9: the reference sits at 0.8, so OFF crossings at 0.6, 0.4, 0.2, 0.0.
    frames = np.stack([np.ones((1, 1)), np.full((1, 1), math.exp(0.9)), np.ones((1, 1))])
    ev = simulate(frames, [0, 1000, 2000], EXACT)
    assert ev["p"].tolist() == [1] * 4 + [0] * 4
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"][-1] <= 2000


def test_refractory_period_keeps_every_mth_crossing():
    # 10 crossings 100 us apart (log change 2.0 over 1 ms at C = 0.2); R = 250 us keeps the
    # 1st, 4th, 7th, 10th (each at least 250 us after the previous emitted one).
    level = [0.0, 2.0 + 1e-9, 2.2 + 1e-9, 2.4 + 1e-9]
    frames = np.exp(np.array(level))[:, None, None]
    ev = simulate(frames[:2], [0, 1000], EXACT, refractory_us=250.0)
    np.testing.assert_allclose(ev["t"], [100, 400, 700, 1000], atol=1)
    # The refractory period carries across frames: the crossing at 1100 falls within 250 us
    # of the event at 1000 and is dropped; the one at 2000 is emitted.
    ev = simulate(frames, [0, 1000, 1100, 2000], EXACT, refractory_us=250.0)
    np.testing.assert_allclose(ev["t"], [100, 400, 700, 1000, 2000], atol=1)
    ev = simulate(frames, [0, 1000, 1100, 2000], EXACT, refractory_us=0.0)
    np.testing.assert_allclose(ev["t"], [*range(100, 1001, 100), 1100, 2000], atol=1)


def test_threshold_mismatch_spreads_counts_and_seed_reproduces():
    frames = np.stack([np.ones((20, 20)), np.full((20, 20), math.exp(2.0))])
    p = DVSParams(threshold_on=0.2, threshold_off=0.2, threshold_sigma=0.03, refractory_us=0.0)
    a = simulate(frames, [0, 10_000], p, seed=1)
    b = simulate(frames, [0, 10_000], p, seed=1)
    c = simulate(frames, [0, 10_000], p, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    per_pixel = np.bincount(a["y"].astype(int) * 20 + a["x"], minlength=400)
    # log change ~2 over C ~ N(0.2, 0.03): floor(2 / C) is 10 on average but spread (std ~1.5),
    # 400 pixels reach about +-3 sigma of C: 7..18 events.
    assert 9.5 < per_pixel.mean() < 11.5 and per_pixel.std() > 0.8
    assert per_pixel.min() >= 6 and per_pixel.max() <= 20


def test_background_noise_rate_and_polarity():
    frames = np.ones((2, 50, 40))
    p = DVSParams(noise_rate_hz=5.0, noise_on_fraction=0.8)
    ev = simulate(frames, [0, 2_000_000], p, seed=3)
    mean = 5.0 * 50 * 40 * 2.0
    assert abs(len(ev) - mean) < 5 * math.sqrt(mean)
    assert 0.77 < ev["p"].mean() < 0.83
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].min() >= 0 and ev["t"].max() < 2_000_000


def test_moving_bar_leading_edge_on_trailing_edge_off_and_iterables():
    ts = np.arange(0, 50_001, 1000)
    frames = [
        place_image(np.ones((8, 3)), (16, 40), (5 + 0.5 * i, 8.0), 1.0, background=0.1)
        for i in range(len(ts))
    ]
    ev = simulate(np.stack(frames), ts, DVSParams(threshold_sigma=0.0), seed=0)
    ev_iter = simulate(iter(frames), iter(ts.tolist()), DVSParams(threshold_sigma=0.0), seed=0)
    np.testing.assert_array_equal(ev, ev_iter)
    on, off = ev[ev["p"] == 1], ev[ev["p"] == 0]
    assert len(on) > 50 and len(off) > 50
    # the bar moves right: ON events (bright arriving) lie right of OFF events, both move right
    assert on["x"].mean() > off["x"].mean()
    assert np.corrcoef(on["t"], on["x"])[0, 1] > 0.9


def test_bad_input():
    with pytest.raises(ValueError):
        simulate(np.ones((2, 3)), [0, 1])  # frames must be [N, H, W]
    with pytest.raises(ValueError):
        simulate(np.ones((2, 3, 3)), [10, 5])
    with pytest.raises(ValueError):
        simulate(-np.ones((2, 3, 3)), [0, 1])
    with pytest.raises(ValueError):
        DVSParams(threshold_on=0)
    assert len(simulate(np.ones((0, 3, 3)), [])) == 0
    with pytest.raises(ValueError):
        simulate_mnist_dvs(np.zeros((28, 28)), scale=5)


def _digit_zero() -> np.ndarray:
    """A ring 20 px tall, like an MNIST '0' (no data files needed)."""
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot((xx - 13.5) / 0.75, yy - 13.5)
    return np.clip(1.5 - np.abs(r - 8.5), 0, 1)


def test_mnist_dvs_recording_looks_like_the_real_ones():
    rec = simulate_mnist_dvs(_digit_zero(), scale=4, duration_s=1.0, seed=7)
    assert (rec.width, rec.height, rec.format) == (128, 128, "simulated")
    assert rec.metadata["scale"] == 4
    ev = rec.events
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"][0] >= 0 and ev["t"][-1] <= 1_000_000
    s = recording_stats(ev, 128, 128)
    # the real scale-4 recording: 7.1 kev/s, 50 % ON, 5-95 % extent 26 x 21 px
    assert 3_000 < s["events_per_s"] < 15_000
    assert 0.4 < s["on_fraction"] < 0.6
    assert 14 <= s["extent_y_px"] <= 30 and 12 <= s["extent_x_px"] <= 32
    # the digit sits in the MNIST-DVS crop: most events fall in it
    crop = (ev["x"] >= 48) & (ev["x"] < 74) & (ev["y"] >= 54) & (ev["y"] < 80)
    assert crop.mean() > 0.7
    again = simulate_mnist_dvs(_digit_zero(), scale=4, duration_s=1.0, seed=7)
    np.testing.assert_array_equal(again.events, ev)
    big = simulate_mnist_dvs(_digit_zero(), scale=8, duration_s=0.5, seed=7)
    assert recording_stats(big.events, 128, 128)["extent_y_px"] > 1.6 * s["extent_y_px"]


def test_mnist_dvs_close_to_real_recording(shared_events):
    real = events.read(shared_events / "aedat2" / "mnist_0_scale04_0001.aedat")
    r = recording_stats(real.events, 128, 128)
    sim = simulate_mnist_dvs(_digit_zero(), scale=4, duration_s=2.0, seed=0)
    s = recording_stats(sim.events, 128, 128)
    assert 0.5 < s["events_per_s"] / r["events_per_s"] < 2.0
    assert abs(s["on_fraction"] - r["on_fraction"]) < 0.05
    assert 0.5 < s["events_per_active_pixel"] / r["events_per_active_pixel"] < 2.0
    assert abs(s["centre_y"] - r["centre_y"]) < 5 and abs(s["centre_x"] - r["centre_x"]) < 5


def test_render_blocks_replicates_pixels_and_conserves_light():
    from events.simulate import render_blocks

    img = np.zeros((4, 4))
    img[1, 2] = 1.0
    # zoom 3, centre (10.5, 10.5): block (row 1, col 2) spans x [10.5, 13.5), y [7.5, 10.5),
    # which covers the pixel centres x 11..13, y 8..10 (pixel u has its centre at u)
    out = render_blocks(img, (20, 20), (10.5, 10.5), 3.0, background=0.0, blur_px=0.01)
    ys, xs = np.nonzero(out > 0.5)
    assert sorted(set(xs.tolist())) == [11, 12, 13] and sorted(set(ys.tolist())) == [8, 9, 10]
    assert out.sum() == pytest.approx(9.0, rel=1e-6)
    # with blur the light spreads but its total is the block area (9 pixels)
    blurred = render_blocks(img, (20, 20), (10.3, 9.6), 3.0, background=0.0, blur_px=1.0)
    assert blurred.sum() == pytest.approx(9.0, rel=1e-3)
    assert blurred.max() < 1.0


def test_peak_rate_counts_the_busiest_window_without_a_bin_per_window():
    from events.simulate import peak_rate

    t = np.array([0, 5, 9_999, 10_000, 10_001, 10_002, 10_003, 3_000_000_000_000])  # ~35 days
    assert peak_rate(t, 10_000) == 4 / 0.01
    assert peak_rate(t[::-1].copy(), 10_000) == 4 / 0.01
    assert peak_rate(np.zeros(0, np.int64)) == 0.0


def test_simulate_trajectory_follows_the_path():
    from events.simulate import simulate_trajectory

    ts = np.arange(0, 200_001, 1000)
    path = np.stack([10 + 40 * ts / 200_000, np.full(len(ts), 12.0)], axis=1)  # 10 -> 50 px
    ev = simulate_trajectory(np.ones((4, 4)), path, ts, (24, 64), zoom=2.0, seed=0)
    assert len(ev) > 100 and ev["y"].min() >= 12 - 6 and ev["y"].max() <= 12 + 6
    early, late = ev[ev["t"] < 50_000], ev[ev["t"] > 150_000]
    assert late["x"].mean() - early["x"].mean() == pytest.approx(30, abs=6)
    with pytest.raises(ValueError):
        simulate_trajectory(np.ones((4, 4)), path[:-1], ts, (24, 64))
