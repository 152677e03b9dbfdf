"""``vdib dvs-dt``: one simulation binned at several dt, one default MNIST-DVS model per dt, results JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import data
from training.studies.dvs_dt import dvs_dt_overrides


def _counting_sim(calls):
    def sim(img, seed=0, duration_s=2.0):
        import events

        calls.append(seed)
        rng = np.random.default_rng(seed)
        ys, xs = np.nonzero(np.asarray(img) > 128)
        n = len(xs) * 3
        ev = np.zeros(n, dtype=events.EVENT_DTYPE)
        ev["t"] = np.sort(rng.integers(0, int(duration_s * 1e6), n))
        ev["x"], ev["y"], ev["p"] = np.tile(xs, 3) + 48, np.tile(ys, 3) + 54, rng.integers(0, 2, n)
        return ev

    return sim


def test_overrides_keep_the_time_spans():
    assert dvs_dt_overrides(10) == ["data.dt_us=10000", "data.crop_T=60", "model.tau_d=30"]
    assert dvs_dt_overrides(25) == ["data.dt_us=25000", "data.crop_T=24", "model.tau_d=12"]
    assert dvs_dt_overrides(50, window_ms=400) == ["data.dt_us=50000", "data.crop_T=8", "model.tau_d=6"]
    with pytest.raises(ValueError, match="shorter than the decoder span"):
        dvs_dt_overrides(10, window_ms=100)


def test_sets_simulate_once_and_match_the_single_dt_caches(tmp_path, shared_mnist):
    imgs, labs = data.load_mnist_split(shared_mnist, "train", limit=6)
    calls: list[int] = []
    sets = data.simulate_mnist_dvs_sets(
        imgs,
        labs,
        [10_000, 25_000, 50_000],
        cache_dir=tmp_path,
        progress=False,
        simulate=_counting_sim(calls),
    )
    assert sorted(calls) == list(range(6))  # each digit simulated once for the three bin widths
    assert [sets[d].T for d in (10_000, 25_000, 50_000)] == [200, 80, 40]
    assert len(list(tmp_path.glob("*.npz"))) == 3
    for dt in (10_000, 50_000):  # the single-dt function reads the same cache files (no new simulation)
        one = data.simulate_mnist_dvs_set(
            imgs, labs, "source", dt, cache_dir=tmp_path, progress=False, simulate=_counting_sim(calls)
        )
        np.testing.assert_array_equal(one.packed, sets[dt].packed)
    assert len(calls) == 6
    # and a single-dt simulation into a fresh cache bins exactly the same frames
    fresh = data.simulate_mnist_dvs_set(
        imgs, labs, "source", 25_000, cache_dir=tmp_path / "b", progress=False, simulate=_counting_sim([])
    )
    np.testing.assert_array_equal(fresh.packed, sets[25_000].packed)
    # events in 10 ms bins -> present in the 50 ms bin that holds them
    f10, f50 = sets[10_000].frames(0), sets[50_000].frames(0)
    np.testing.assert_array_equal(f10.reshape(40, 5, *f10.shape[1:]).max(1), f50)


def test_dvs_dt_writes_one_row_per_dt(tmp_path, shared_mnist):
    from training.studies.dvs_dt import REAL_MNIST_DVS, dvs_dt_study

    out = tmp_path / "out"
    logs: list[str] = []
    res = dvs_dt_study(
        [25, 50],
        tmp_path / "runs",
        out,
        train_digits=16,
        test_digits=8,
        examples=64,
        extra=[f'data.cache_dir="{tmp_path / "cache"}"', "run.threads=1"],
        workers=1,
        jobs=1,
        real_dir=REAL_MNIST_DVS,
        progress=False,
        log=logs.append,
    )
    saved = json.loads((out / "dvs-dt.json").read_text())
    assert (out / "dvs-dt.md").is_file() and (out / "dvs-dt.png").stat().st_size > 0
    rows = saved["rows"]
    assert [r["dt_ms"] for r in rows] == [25, 50] and [r["tau_d"] for r in rows] == [12, 6]
    assert [r["crop_T"] for r in rows] == [24, 12] and [r["T"] for r in rows] == [80, 40]
    for r in rows:
        assert r["n"] == 8 and r["examples"] == 64
        assert 0.0 <= r["judge_accuracy"] <= 1.0
        assert -1.0 <= r["ssim"] <= 1.0 and 0.0 < r["mse"] < 1.0 and 0.0 <= r["spike_rate"] <= 1.0
        for e in r["real"]:
            assert e["digit"] == 0 and e["decoded_class"] in range(10)
    assert saved["simulation"]["train"]["digits"] == 16 and res["rows"] == rows
    assert any("simulation done" in m for m in logs) and any("wrote" in m for m in logs)
    # a second call reuses the finished cells (no training)
    again = dvs_dt_study(
        [25, 50],
        tmp_path / "runs",
        out,
        train_digits=16,
        test_digits=8,
        examples=64,
        extra=[f'data.cache_dir="{tmp_path / "cache"}"', "run.threads=1"],
        workers=1,
        jobs=1,
        real_dir=None,
        progress=False,
        log=logs.append,
    )
    assert all(t["reused"] for t in again["training"])
    cell = json.loads((tmp_path / "runs" / "dt25ms" / "cell.json").read_text())
    assert cell == {"study": "dvs-dt", "cell": "dt25ms", "dt_us": 25000, "crop_T": 24, "tau_d": 12}
    assert [r["ssim"] for r in again["rows"]] == [r["ssim"] for r in rows]
    assert "skipped" in (out / "dvs-dt.md").read_text()
