"""The scene evaluation protocol (EVREAL std), the baselines' equations and the cost counter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from events import EVENT_DTYPE
from training import scene_baselines as sb
from training import scene_eval as se

pytest.importorskip("skimage")

ECD = se.shared_data_dir() / "events-gt" / "ecd_slider_depth"
DAVIS346 = se.shared_data_dir() / "events" / "aedat4" / "evlib_davis346_trimmed.aedat4"
needs_ecd = pytest.mark.skipif(not ECD.is_dir(), reason="../shared/data/events-gt absent")
needs_davis = pytest.mark.skipif(not DAVIS346.is_file(), reason="../shared/data/events/aedat4 absent")


def make_events(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    ev = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (t, x, y, p) in enumerate(rows):
        ev[i] = (t, x, y, p)
    return ev


def random_events(n: int, width: int, height: int, seed: int = 0, span_us: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(1000, 1000 + span_us, n))
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_identical_image_scores_perfectly_raw_and_hist():
    rng = np.random.default_rng(1)
    gt = rng.random((40, 50)).astype(np.float32)
    s = se.score_frame(gt, gt)
    assert s["ssim_raw"] == pytest.approx(1.0, abs=1e-9)
    assert s["mse_raw"] == 0.0
    assert s["ssim_hist"] == pytest.approx(1.0, abs=1e-9)
    assert s["mse_hist"] == pytest.approx(0.0, abs=1e-12)


def test_score_uses_the_protocols_ssim_settings_and_clips():
    from skimage.metrics import mean_squared_error, structural_similarity

    assert se.SSIM_KWARGS == {
        "gaussian_weights": True,
        "sigma": 1.5,
        "use_sample_covariance": False,
        "data_range": 1.0,
    }
    rng = np.random.default_rng(2)
    gt = rng.random((30, 40))
    recon = rng.normal(0.5, 0.6, (30, 40))  # outside [0, 1]: clipped before scoring
    s = se.score_frame(recon, gt)
    clipped = np.clip(recon, 0, 1)
    assert s["ssim_raw"] == pytest.approx(
        structural_similarity(
            gt, clipped, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
    )
    assert s["mse_raw"] == pytest.approx(mean_squared_error(gt, clipped))
    # the default skimage SSIM (7x7 uniform window, sample covariance) is a different number
    assert s["ssim_raw"] != pytest.approx(structural_similarity(gt, clipped, data_range=1.0), abs=1e-4)


def test_hist_matching_a_constant_image_makes_it_near_white():
    rng = np.random.default_rng(3)
    gt = rng.random((32, 32))
    s = se.score_frame(np.full_like(gt, 0.5), gt)
    assert s["mse_hist"] > s["mse_raw"]


def test_shape_mismatch_is_a_typed_error():
    with pytest.raises(se.SceneEvalError):
        se.score_frame(np.zeros((10, 12)), np.zeros((12, 10)))


# ---------------------------------------------------------------------------------------------
# timestamp matching within 1 ms
# ---------------------------------------------------------------------------------------------


def test_match_within_one_millisecond():
    gt = np.array([10_000, 50_000, 90_000, 130_000])
    recon = np.array([10_000, 50_999, 91_001, 129_000, 131_500])
    idx = se.match_within_tolerance(recon, gt)
    assert idx.tolist() == [0, 1, -1, 3]
    assert se.match_within_tolerance(np.array([], dtype=np.int64), gt).tolist() == [-1] * 4
    # the nearest of two candidates wins
    assert se.match_within_tolerance(np.array([999, 1200]), np.array([1100])).tolist() == [1]


class _Late:
    """Reports one output 2 ms late: that frame must not be scored."""

    name = "late"

    def __init__(self):
        self.output_times_us = None

    def reconstruct(self, events, width, height, timestamps_us):
        t = np.asarray(timestamps_us).copy()
        t[1] -= 2000
        self.output_times_us = t
        return np.full((len(t), height, width), 0.5, np.float32)

    def info(self):
        return {"params": 0}


def _toy_sequence(n_frames: int = 3) -> se.TestSequence:
    ev = random_events(500, 16, 12, seed=4)
    times = np.linspace(ev["t"][0] + 10_000, ev["t"][-1], n_frames).astype(np.int64)
    frames = np.random.default_rng(5).random((n_frames, 12, 16)).astype(np.float32)
    return se.TestSequence("toy", ev, 16, 12, frames, times)


def test_frames_outside_tolerance_are_missed_not_scored():
    seq = _toy_sequence()
    r = se.evaluate_on_sequence(_Late(), seq)
    assert r.frames_scored == 2 and r.frames_missed == 1
    assert [f["t_us"] for f in r.per_frame] == [float(seq.frame_times_us[0]), float(seq.frame_times_us[2])]


def test_in_span_drops_frames_before_first_and_after_last_event():
    ev = make_events([(1000, 0, 0, 1), (5000, 1, 0, 0)])
    frames = np.zeros((4, 2, 2), np.float32)
    kept, t, dropped = se.in_span(ev, frames, np.array([0, 1000, 5000, 6000]))
    assert t.tolist() == [1000, 5000] and dropped == 2 and len(kept) == 2


def test_bad_method_output_shape_is_a_typed_error():
    class Bad:
        name = "bad"

        def reconstruct(self, events, width, height, timestamps_us):
            return np.zeros((1, height, width), np.float32)

        def info(self):
            return {}

    with pytest.raises(se.SceneEvalError):
        se.evaluate_on_sequence(Bad(), _toy_sequence())


# ---------------------------------------------------------------------------------------------
# baselines: equations
# ---------------------------------------------------------------------------------------------


def hpf_closed_form(
    ev: np.ndarray, width: int, height: int, T: int, a: float, b: float, c: float
) -> np.ndarray:
    """L_p(T) = sum_k c_k exp(-a (T - t_k)) exp(-b * (events at p after k)), per pixel."""
    L = np.zeros((height, width))
    for yy in range(height):
        for xx in range(width):
            sel = ev[(ev["x"] == xx) & (ev["y"] == yy) & (ev["t"] <= T)]
            n = len(sel)
            for k, e in enumerate(sel):
                step = c if e["p"] else -c
                L[yy, xx] += step * math.exp(-a * (T - int(e["t"])) * 1e-6) * math.exp(-b * (n - 1 - k))
    return L


@pytest.mark.parametrize("cutoff_hz", [0.06, 5.0])
def test_hpf_matches_its_closed_form(cutoff_hz):
    ev = random_events(400, 5, 4, seed=6, span_us=400_000)
    f = sb.HighPassFilter(cutoff_hz=cutoff_hz)
    times = np.array([ev["t"][150], ev["t"][-1] + 50_000, ev["t"][10]])  # unsorted on purpose
    L = f.log_intensity(ev, 5, 4, times)
    a = 2 * math.pi * cutoff_hz
    for j, T in enumerate(times):
        np.testing.assert_allclose(
            L[j], hpf_closed_form(ev, 5, 4, int(T), a, 0.06, 0.1), rtol=1e-9, atol=1e-12
        )


def test_direct_integration_counts_polarities():
    ev = random_events(300, 4, 3, seed=7)
    L = sb.DirectIntegration().log_intensity(ev, 4, 3, np.array([ev["t"][-1]]))[0]
    on = np.zeros((3, 4))
    off = np.zeros((3, 4))
    np.add.at(on, (ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1]), 1)
    np.add.at(off, (ev["y"][ev["p"] == 0], ev["x"][ev["p"] == 0]), 1)
    np.testing.assert_allclose(L, 0.2 * (on - off), atol=1e-12)


def test_robust_stretch_flat_and_sparse():
    assert np.all(sb.robust_stretch(np.ones((10, 10))) == 0.5)
    img = np.ones((20, 20))
    img[0, 0], img[0, 1] = 0.5, 2.0  # under 1 % of the pixels moved: min-max fallback
    out = sb.robust_stretch(img)
    assert out[0, 0] == 0.0 and out[0, 1] == 1.0 and 0.0 < out[5, 5] < 1.0
    dense = np.random.default_rng(8).normal(size=(50, 50))
    out = sb.robust_stretch(dense)
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out == 0).mean() == pytest.approx(0.01, abs=0.005)


def test_voxel_grid_keeps_each_events_polarity_mass():
    ev = random_events(200, 6, 5, seed=9)
    vox = sb.voxel_grid(ev, 6, 5, bins=5)
    net = np.zeros((5, 6))
    np.add.at(net, (ev["y"], ev["x"]), np.where(ev["p"] > 0, 1.0, -1.0))
    np.testing.assert_allclose(vox.sum(0), net, atol=1e-4)
    assert vox.shape == (5, 5, 6)


@pytest.mark.parametrize("name", ["mid-gray", "direct", "hpf"])
def test_baselines_give_k_h_w_in_unit_range_in_request_order(name):
    ev = random_events(2000, 20, 15, seed=10)
    m = sb.build_baseline(name)
    times = np.array([ev["t"][-1], ev["t"][500], ev["t"][1500]])
    out = m.reconstruct(ev, 20, 15, times)
    assert out.shape == (3, 15, 20) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    again = m.reconstruct(ev, 20, 15, np.sort(times))
    np.testing.assert_array_equal(out[[1, 2, 0]], again)


@pytest.mark.skipif(sb.pienet_available() is not None, reason="event-pienet not installed")
def test_pienet_outputs_and_reports_window_times():
    ev = random_events(3000, 32, 24, seed=11)
    m = sb.build_baseline("pienet-lite")
    times = np.array([ev["t"][1000] + 10, ev["t"][-1]])
    out = m.reconstruct(ev, 32, 24, times)
    assert out.shape == (2, 24, 32) and 0.0 <= out.min() and out.max() <= 1.0
    assert m.output_times_us.tolist() == [int(ev["t"][1000]), int(ev["t"][-1])]


def test_unknown_baseline_is_an_error():
    with pytest.raises(ValueError):
        sb.build_baseline("e2vid")


# ---------------------------------------------------------------------------------------------
# cost counter
# ---------------------------------------------------------------------------------------------


def test_cost_counter_synops_spikes_and_macs():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    x = (torch.rand(1, 2, 10, 10) < 0.1).float()
    nnz = float(x.sum())
    with se.CostCounter(net) as c:
        net(x)
    t = c.totals()
    assert t["spikes"] == nnz
    assert t["synops"] == nnz * 4 * 9
    assert t["binary_layer_dense_macs"] == 10 * 10 * 4 * 2 * 9
    assert t["macs"] == 10 * 10 * 1 * 4 * 9  # only the second (analog-input) conv
    with se.CostCounter(net, spiking=False) as c2:
        net(x)
    assert c2.totals()["synops"] == 0 and c2.totals()["macs"] == 10 * 10 * (4 * 2 + 4) * 9


def test_cost_counter_spike_modules_count_emitted_spikes():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Fire(nn.Module):
        def forward(self, v):
            return (v > 0).float()

    fire = Fire()
    conv = nn.Conv2d(1, 3, 3, padding=1)
    v = torch.randn(1, 1, 8, 8)
    spikes = float((v > 0).sum())
    with se.CostCounter(nn.Sequential(fire, conv), spike_modules=[fire]) as c:
        s = fire(v)
        conv(s)
        conv(s)  # the same spike map read twice: spikes once, SynOps twice
    assert c.totals()["spikes"] == spikes
    assert c.totals()["synops"] == 2 * spikes * 3 * 9


# ---------------------------------------------------------------------------------------------
# the real test sets and the reference numbers (SCENES-REFERENCE.md, "measured here")
# ---------------------------------------------------------------------------------------------


@needs_ecd
def test_ecd_loader_frames_in_span():
    seq = se.load_ecd_slider_depth()
    assert (seq.width, seq.height) == (240, 180)
    assert seq.frame_times_us.tolist() == [38766, 77531, 116296, 155062]
    assert seq.dropped_frames >= 2 and len(seq.events) == 50_000
    assert seq.frames.dtype == np.float32 and 0.0 <= seq.frames.min() and seq.frames.max() <= 1.0


@needs_ecd
@pytest.mark.parametrize(
    "name,ssim,mse", [("mid-gray", 0.378, 0.094), ("direct", 0.305, 0.122), ("hpf", 0.297, 0.145)]
)
def test_ecd_reproduces_the_reference_numbers(name, ssim, mse):
    r = se.summarize([se.evaluate_on_sequence(sb.build_baseline(name), se.load_ecd_slider_depth())])
    assert r["frames"] == 4 and r["missed"] == 0
    assert r["ssim_raw"] == pytest.approx(ssim, abs=6e-4)
    assert r["mse_raw"] == pytest.approx(mse, abs=6e-4)


@needs_ecd
@pytest.mark.skipif(sb.pienet_available() is not None, reason="event-pienet not installed")
@pytest.mark.parametrize("name,ssim", [("pienet", 0.409), ("pienet-lite", 0.488)])
def test_ecd_reproduces_pienet(name, ssim):
    r = se.summarize([se.evaluate_on_sequence(sb.build_baseline(name), se.load_ecd_slider_depth())])
    assert r["frames"] == 4 and r["missed"] == 0
    assert r["ssim_raw"] == pytest.approx(ssim, abs=6e-4)


@needs_davis
def test_davis346_aps_frames_and_hpf_reference():
    pytest.importorskip("dv_processing")
    seq = se.load_davis346()
    assert (seq.width, seq.height) == (346, 260) and len(seq.frames) == 3 and seq.dropped_frames == 1
    r = se.summarize([se.evaluate_on_sequence(sb.build_baseline("hpf"), seq)])
    assert r["ssim_raw"] == pytest.approx(0.352, abs=6e-4)
    assert r["mse_raw"] == pytest.approx(0.031, abs=6e-4)


@needs_ecd
def test_cli_scores_the_floor_as_json(capsys, tmp_path):
    from vdib_cli import main

    rc = main(
        [
            "scenes",
            "evaluate",
            "--methods",
            "mid-gray,hpf",
            "--sets",
            "ecd",
            "--no-timing",
            "--no-progress",
            "--json",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    e = report["results"]["mid-gray"]["ecd_slider_depth"]
    assert e["frames"] == 4 and e["ssim_raw"] == pytest.approx(0.378, abs=6e-4)
    assert report["protocol"]["tolerance_ms"] == 1.0 and "lpips" in report["protocol"]
    assert (tmp_path / "scenes.json").is_file() and (tmp_path / "scenes.md").is_file()
    assert (tmp_path / "ecd_slider_depth.png").is_file()


def test_cli_rejects_unknown_method(capsys):
    from vdib_cli import main

    assert main(["scenes", "evaluate", "--methods", "e2vid", "--no-progress"]) == 2


def test_cost_counter_sees_functional_convs_and_views_under_inference_mode():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    tf = torch.nn.functional
    conv = nn.Conv2d(2, 4, 3, padding=1)
    lin = nn.Linear(128, 3)
    x = (torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.2).float()
    nnz = float(x.sum())
    with torch.inference_mode(), se.CostCounter(nn.ModuleList([conv, lin])) as c:
        tf.conv2d(x, conv.weight * 2, padding=1)  # derived weight: not a module
        lin(x.flatten())  # a view of the same spike map
    t = c.totals()
    assert t["synops"] == nnz * 4 * 9 + nnz * 3
    assert t["spikes"] == nnz  # the view is the same spikes
    assert t["macs"] == 0.0 and t["binary_layer_dense_macs"] == 8 * 8 * 4 * 18 + 3 * 128
    assert set(c.per_weight) == {"functional 4x2x3x3", "1.weight"}


def test_vdib_method_on_an_untrained_scene_net():
    torch = pytest.importorskip("torch")
    scene = pytest.importorskip("model.scene")
    torch.manual_seed(0)
    net = scene.SceneNaturalizer().eval()
    m = se.VdibScenes(net=net, count_cost=True)
    ev = random_events(3000, 40, 30, seed=12, span_us=60_000)
    times = np.array([ev["t"][-1], ev["t"][0] + 25_000])
    out = m.reconstruct(ev, 40, 30, times)
    assert out.shape == (2, 30, 40) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert m.output_times_us.tolist() == times.tolist()
    c = m.last_counters
    assert c["spikes"] == c["spikes_hidden"] + c["spikes_readout"] and c["steps"] >= 6
    assert c["synops"] > 0 and c["macs"] > 0
    assert m.info()["spiking"] is True and m.info()["params"] == sum(p.numel() for p in net.parameters())


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    from vdib_cli import main

    assert (
        main(
            [
                "scenes",
                "evaluate",
                str(tmp_path / "nope"),
                "--methods",
                "vdib",
                "--sets",
                "ecd",
                "--no-progress",
                "--no-timing",
            ]
        )
        == 2
    )


def test_method_without_a_checkpoint_is_skipped_with_a_reason(tmp_path):
    methods, skipped = se.build_methods(["vdib", "mid-gray"], checkpoint=tmp_path)
    assert [m.name for m in methods] == ["mid-gray"]
    assert "vdib" in skipped and skipped["vdib"]
