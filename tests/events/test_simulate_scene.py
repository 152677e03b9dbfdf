"""Statistics of the general-scene simulator: leak, hot pixels, warping, dead leaves, clips."""

from __future__ import annotations

import numpy as np
import pytest

from events.simulate import (
    DVSParams,
    SceneConfig,
    dead_leaves,
    object_mask,
    simulate,
    simulate_scene,
    warp_image,
)


def test_leak_gives_on_events_at_the_leak_rate():
    # static scene: only the leak makes events; each pixel's reference sinks by one threshold
    # every 1/leak_rate seconds -> leak_rate ON events per pixel per second
    frames = np.full((101, 20, 20), 0.5)
    ts = np.linspace(0, 2_000_000, 101)
    p = DVSParams(
        threshold_on=0.2, threshold_off=0.2, threshold_sigma=0.0, refractory_us=0.0, leak_rate_hz=5.0
    )
    ev = simulate(frames, ts, p, seed=0)
    assert len(ev) and np.all(ev["p"] == 1)
    per_pixel = len(ev) / 400 / 2.0
    assert per_pixel == pytest.approx(5.0, abs=0.55)  # floor of 10 crossings per pixel


def test_hot_pixels_fire_at_their_rate_with_one_polarity_each():
    frames = np.full((11, 50, 40), 0.5)
    ts = np.linspace(0, 1_000_000, 11)
    p = DVSParams(hot_pixel_fraction=0.01, hot_pixel_rate_hz=200.0)
    ev = simulate(frames, ts, p, seed=1)
    pix = ev["y"].astype(int) * 40 + ev["x"]
    hot = np.unique(pix)
    assert len(hot) == 20  # 1 % of 2000 pixels
    assert len(ev) / 20 == pytest.approx(200.0, rel=0.15)
    for q in hot:
        assert len(np.unique(ev["p"][pix == q])) == 1


def test_warp_identity_and_shift():
    img = np.random.default_rng(0).random((30, 40))
    assert np.allclose(warp_image(img, np.eye(3), (30, 40)), img)
    m = np.array([[1.0, 0, 2.0], [0, 1.0, 1.0], [0, 0, 1.0]])  # output (u, v) samples source (u+2, v+1)
    out = warp_image(img, m, (20, 30))
    assert np.allclose(out, img[1:21, 2:32])


def test_dead_leaves_covers_the_image_with_natural_statistics():
    img = dead_leaves((128, 128), seed=3)
    assert img.shape == (128, 128) and np.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1
    assert 0.15 < img.std() < 0.45  # many leaves of different grey
    # scale-invariant: the power spectrum falls with frequency
    f = np.abs(np.fft.fft2(img - img.mean())) ** 2
    assert f[1:4, 1:4].mean() > 10 * f[30:40, 30:40].mean()
    assert np.array_equal(dead_leaves((64, 64), seed=5), dead_leaves((64, 64), seed=5))


def test_object_mask_is_soft_and_inside():
    m = object_mask((40, 40), seed=0)
    assert 0 <= m.min() and m.max() <= 1 and m[20, 20] == 1.0 and m[0, 0] < 0.5


def test_scene_clip_is_reproducible_and_consistent():
    bg = dead_leaves((96, 96), seed=0)
    objs = [(dead_leaves((24, 24), seed=1), object_mask((24, 24), seed=1))]
    cfg = SceneConfig(height=32, width=48)
    a = simulate_scene(bg, objs, duration_us=200_000, config=cfg, seed=7)
    b = simulate_scene(bg, objs, duration_us=200_000, config=cfg, seed=7)
    assert np.array_equal(a.events, b.events) and np.array_equal(a.frames, b.frames)
    assert a.frames.shape == (20, 32, 48) and a.frame_times_us[-1] == 200_000
    assert a.frames.min() >= 0 and a.frames.max() <= 1
    ev = a.events
    assert len(ev) > 100 and np.all(np.diff(ev["t"]) >= 0)
    assert ev["x"].max() < 48 and ev["y"].max() < 32 and 0 <= ev["t"].min() and ev["t"].max() <= 200_000
    d = a.metadata["dvs"]
    assert cfg.threshold[0] <= d["threshold_on"] <= cfg.threshold[1]
    assert d["threshold_off"] / d["threshold_on"] <= cfg.threshold_ratio + 1e-9
    # events follow the frames: where intensity rose over the clip, ON events dominate
    rise = np.log(a.frames[-1] + 0.05) - np.log(a.frames[0] + 0.05)
    net = np.zeros((32, 48))
    sel = ev["t"] >= a.frame_times_us[0]
    np.add.at(net, (ev["y"][sel], ev["x"][sel]), np.where(ev["p"][sel] == 1, 1.0, -1.0))
    strong = np.abs(rise) > 1.0
    if strong.sum() > 20:
        assert np.mean(np.sign(net[strong]) == np.sign(rise[strong])) > 0.7
    c = simulate_scene(bg, objs, duration_us=200_000, config=cfg, seed=8)
    assert not np.array_equal(a.events, c.events)


def test_scene_config_spread_of_sensors():
    bg = dead_leaves((64, 64), seed=0)
    th = [
        simulate_scene(bg, duration_us=20_000, config=SceneConfig(height=16, width=16), seed=s).metadata[
            "dvs"
        ]["threshold_on"]
        for s in range(40)
    ]
    assert min(th) < 0.25 and max(th) > 0.55
