"""The scene training data: reproducible clips, disjoint train/test images, the cache."""

from __future__ import annotations

import numpy as np

from training.scene_data import (
    TEST_IMAGES,
    SceneDataConfig,
    SceneDataset,
    clip_tensors,
    image_bank,
    make_clip,
)
from training.scene_data import (
    test_clips as simulated_test_set,
)

SMALL = SceneDataConfig(height=24, width=32, n_bins=6, leaves_size=48, object_size_px=12)


def test_train_and_test_images_are_disjoint():
    train = {n for n, _ in image_bank("train")}
    test = {n for n, _ in image_bank("test")}
    assert train and test and not train & test
    assert test <= set(TEST_IMAGES)
    for _, img in image_bank("train"):
        assert img.ndim == 2 and 0 <= img.min() and img.max() <= 1


def test_clips_are_reproducible_and_shaped():
    a, b = make_clip(3, SMALL), make_clip(3, SMALL)
    assert np.array_equal(a.events, b.events)
    x, y = clip_tensors(a, SMALL.n_bins, SMALL.dt_us)
    assert x.shape == (6, 2, 24, 32) and x.dtype == np.uint8
    assert y.shape == (6, 24, 32) and np.all(np.isfinite(y.astype(np.float32)))
    assert int(x.sum(dtype=np.int64)) == int(
        np.count_nonzero(a.events["t"] < 60_000)
    )  # every event in one bin
    assert not np.array_equal(make_clip(4, SMALL).events, a.events)


def test_dataset_cache_round_trip(tmp_path):
    ds = SceneDataset(SMALL, 3, base_seed=1, cache_dir=tmp_path)
    x, y = ds[2]
    cached = SceneDataset(SMALL, 3, base_seed=1, cache_dir=tmp_path)
    assert cached.cache == ds.cache and (ds.cache / "0000002.npz").exists()
    x2, y2 = cached[2]
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_simulated_test_set_is_deterministic_and_held_out():
    a = simulated_test_set(2, seed=0, height=30, width=40, duration_us=100_000, frame_every_us=50_000)
    b = simulated_test_set(2, seed=0, height=30, width=40, duration_us=100_000, frame_every_us=50_000)
    assert [len(c.events) for c in a] == [len(c.events) for c in b]
    assert a[0].frames.shape == (2, 30, 40) and list(a[0].frame_times_us) == [50_000, 100_000]
