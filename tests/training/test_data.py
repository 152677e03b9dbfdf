"""Datasets: MNIST loading and spike encodings, bit-packed frame sets (drifting blobs: tests/model/test_blobs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import data


def test_ttfs_formula_and_silent_zeros():
    T = 30
    x = torch.tensor([[1.0, 0.0, 0.5, 1 / 255, 0.9]])
    s = data.ttfs_encode(x, T)
    assert s.shape == (T, 1, 5)
    counts = s.sum(0)[0]
    assert counts.tolist() == [1, 0, 1, 1, 1]  # exactly one spike, none for black pixels
    # 1-based t = T - round(x (T-1))
    for i, v in [(0, 1.0), (2, 0.5), (3, 1 / 255), (4, 0.9)]:
        t1 = int(s[:, 0, i].nonzero()[0, 0]) + 1
        assert t1 == T - round(v * (T - 1))
    assert int(s[:, 0, 0].nonzero()[0, 0]) == 0  # brightest first


def test_rate_encoding_mean_and_seed():
    x = torch.tensor([[0.0, 0.25, 0.75, 1.0]])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s = data.rate_encode(x.expand(2000, 4), 10, g1)
    np.testing.assert_allclose(s.mean((0, 1)).numpy(), [0.0, 0.25, 0.75, 1.0], atol=0.01)
    assert torch.equal(s, data.rate_encode(x.expand(2000, 4), 10, g2))


def test_frameset_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.random((5, 7, 2, 26, 26)) < 0.1).astype(np.uint8)
    fs = data.FrameSet(
        data.pack_frames(frames),
        (2, 26, 26),
        rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        np.arange(5),
        {"k": 1},
    )
    np.testing.assert_array_equal(fs.frames(np.arange(5)), frames)
    fs.save(tmp_path / "f.npz")
    fs2 = data.FrameSet.load(tmp_path / "f.npz")
    x, tgt, lab = fs2.batch(np.array([3, 1]))
    assert x.shape == (7, 2, 2 * 26 * 26)
    np.testing.assert_array_equal(x[:, 0].numpy().reshape(7, 2, 26, 26), frames[3])
    np.testing.assert_allclose(tgt[1].numpy(), fs.targets[1].reshape(-1) / 255.0)
    assert lab.tolist() == [3, 1] and fs2.meta == {"k": 1}


def test_prototypes_are_class_members():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    protos = data.prototype_images(imgs, labels)
    for c in range(10):
        assert any((protos[c] == imgs[i]).all() for i in np.flatnonzero(labels == c))


def test_mnist_files_at_hand(shared_mnist):
    x, y = data.load_mnist_split(shared_mnist, "train", limit=100)
    assert x.shape == (100, 28, 28) and x.dtype == np.uint8 and y.shape == (100,)
    xt, _ = data.load_mnist_split(shared_mnist, "test")
    assert xt.shape == (10_000, 28, 28)


def test_standard_names_win(tmp_path):
    for name in (
        "train10k-images-idx3-ubyte",
        "train10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ):
        (tmp_path / name).write_bytes(b"")
    assert data.find_mnist_files(tmp_path, "train")[0].name == "train-images-idx3-ubyte.gz"
    with pytest.raises(data.DatasetError):
        data.find_mnist_files(tmp_path, "test")


def test_scan_mnist_dvs_layout(tmp_path):
    for d, s, i in [(0, 4, 1), (0, 4, 950), (3, 4, 2), (3, 8, 2)]:
        p = tmp_path / f"grabbed_data{d}" / f"scale{s}"
        p.mkdir(parents=True, exist_ok=True)
        (p / f"mnist_{d}_scale{s:02d}_{i:04d}.aedat").write_bytes(b"")
    recs = data.scan_mnist_dvs(tmp_path, scale=4)
    assert [(r[1], r[2]) for r in recs] == [(0, 1), (0, 950), (3, 2)]
    assert [data.mnist_dvs_split_of(r[2]) for r in recs] == ["train", "test", "train"]


def test_frameset_crop_windows_are_contiguous():
    rng = np.random.default_rng(1)
    frames = (rng.random((3, 20, 2, 4, 4)) < 0.3).astype(np.uint8)
    fs = data.FrameSet(
        data.pack_frames(frames), (2, 4, 4), np.zeros((3, 28, 28), np.uint8), np.arange(3), {}, crop_T=5
    )
    x, _, _ = fs.batch(np.arange(3), torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32)
    for b in range(3):
        seq = x[:, b].numpy().reshape(5, 2, 4, 4)
        starts = [s for s in range(16) if (frames[b, s : s + 5] == seq).all()]
        assert starts  # the window is some contiguous run of the recording


def _fake_sim(img, seed=0, duration_s=2.0):
    """A cheap stand-in for events.simulate_mnist_dvs: events at the digit's bright pixels."""
    import events

    rng = np.random.default_rng(seed)
    ys, xs = np.nonzero(np.asarray(img) > 128)
    n = len(xs) * 3
    ev = np.zeros(n, dtype=events.EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, int(duration_s * 1e6), n))
    ev["x"] = np.tile(xs, 3) + 48
    ev["y"] = np.tile(ys, 3) + 54
    ev["p"] = rng.integers(0, 2, n)
    return ev


def test_simulated_set_targets_cache_and_workers(tmp_path, shared_mnist):
    imgs, labs = data.load_mnist_split(shared_mnist, "train", limit=20)
    kw = dict(dt_us=50_000, cache_dir=tmp_path, progress=False, simulate=_fake_sim)
    src = data.simulate_mnist_dvs_set(imgs, labs, "source", **kw)
    assert len(src) == 20 and src.T == 40 and src.frame_shape == (2, 26, 26)
    np.testing.assert_array_equal(src.targets, imgs)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = data.simulate_mnist_dvs_set(
        imgs, labs, "source", workers=2, **{**kw, "cache_dir": tmp_path / "w"}
    )
    np.testing.assert_array_equal(again.packed, src.packed)  # independent of the number of workers
    proto = data.simulate_mnist_dvs_set(imgs, labs, "prototype", **kw)  # served from the cache
    np.testing.assert_array_equal(proto.packed, src.packed)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for c in np.unique(labs):
        members = proto.targets[labs == c]
        assert (members == members[0]).all()  # one image per class
