"""``vdib events info|convert|render`` and ``vdib simulate mnist-dvs`` end to end."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
from PIL import Image

import events
from events import EVENT_DTYPE
from events.cli import BG_RGB, BOTH_RGB, LEGEND_H, OFF_RGB, ON_RGB, ROI_RGB, event_image
from vdib_cli import main


@pytest.fixture()
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    ev = np.zeros(5000, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(1_000, 301_000, 5000))
    ev["x"] = rng.integers(0, 64, 5000)
    ev["y"] = rng.integers(0, 48, 5000)
    ev["p"] = rng.integers(0, 2, 5000)
    path = tmp_path / "small.npz"
    events.write_npz(path, ev, 64, 48)
    return path, ev


def test_info_json_and_text(small_npz, capsys):
    path, ev = small_npz
    assert main(["events", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "npz" and (info["width"], info["height"]) == (64, 48)
    assert info["events"] == 5000
    assert info["duration_s"] == pytest.approx((ev["t"][-1] - ev["t"][0]) / 1e6)
    assert info["mean_rate_ev_s"] == pytest.approx(5000 / info["duration_s"])
    peak = np.bincount((ev["t"] - ev["t"][0]) // 10_000).max() / 0.01
    assert info["peak_rate_ev_s_10ms"] == pytest.approx(peak)
    assert main(["events", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "64 x 48" in out and "5,000" in out


def test_info_real_recording(shared_events, capsys):
    assert (
        main(["events", "info", str(shared_events / "aedat2" / "mnist_0_scale04_0001.aedat"), "--json"]) == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["width"], info["height"], info["events"]) == ("aedat2", 128, 128, 15744)
    assert info["duration_s"] == pytest.approx(2.21, abs=0.01)


def test_bad_file_exit_code_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.aedat4"
    bad.write_bytes(b"#!AER-DAT4.0\r\n" + b"\xff" * 50)
    assert main(["events", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdib: error:") and "Traceback" not in err
    assert main(["events", "render", str(tmp_path / "missing.aedat"), str(tmp_path / "x.png")]) == 2
    assert main(["events", "convert", str(bad), str(tmp_path / "x.txt")]) == 2


def test_convert_round_trips(small_npz, tmp_path, capsys):
    path, ev = small_npz
    for name in ("out.aedat4", "out.npz"):
        assert main(["events", "convert", str(path), str(tmp_path / name)]) == 0
        rec = events.read(tmp_path / name)
        np.testing.assert_array_equal(rec.events, ev)
        assert (rec.width, rec.height) == (64, 48)


def test_render_png_and_gif(small_npz, tmp_path, capsys):
    path, _ = small_npz
    png, gif = tmp_path / "r.png", tmp_path / "r.gif"
    assert (
        main(
            ["events", "render", str(path), str(png), "--dt-ms", "20", "--frames", "6", "--roi", "8,8,26,26"]
        )
        == 0
    )
    img = Image.open(png)
    assert img.width >= 3 * 64 * 4 and img.height >= 2 * 48 * 4  # 6 tiles, 4x magnified
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert (pixels == [0, 255, 0]).all(axis=1).any() and (pixels == [255, 0, 0]).all(axis=1).any()
    # the legend strip under the sheet names the colours: its swatches are drawn in them
    strip = np.asarray(img.convert("RGB"))[-LEGEND_H:]
    for colour in (ON_RGB, OFF_RGB, BOTH_RGB, ROI_RGB):
        assert (strip == colour).all(axis=2).sum() >= 20, colour
    assert main(["events", "render", str(path), str(gif), "--dt-ms", "50"]) == 0
    anim = Image.open(gif)
    assert anim.n_frames == 6  # 300 ms / 50 ms
    assert anim.height == 48 * 4 + LEGEND_H


def test_render_uses_the_viewers_colours():
    """A pixel with only ON, only OFF and both kinds of events: the same colours as the viewer's
    event panel (service/render.py ``event_rgb`` of the same events as spike frames)."""
    render = pytest.importorskip("service.render")
    ev = np.zeros(4, events.EVENT_DTYPE)
    ev["x"] = [1, 2, 3, 3]
    ev["p"] = [1, 0, 1, 0]
    ours = event_image(ev, 5, 1)
    frames = np.zeros((1, 2, 1, 5), np.uint8)  # [k, C (off, on), H, W]
    for e in ev:
        frames[0, int(e["p"]), int(e["y"]), int(e["x"])] = 1
    np.testing.assert_array_equal(ours, render.event_rgb(frames))
    assert [tuple(c) for c in ours[0]] == [BG_RGB, ON_RGB, OFF_RGB, BOTH_RGB, BG_RGB]


def _write_idx(path, arr, code):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_simulate_mnist_dvs_writes_the_dataset_layout(tmp_path, capsys):
    yy, xx = np.mgrid[:28, :28]
    ring = (np.abs(np.hypot(xx - 13.5, yy - 13.5) - 8) < 2) * 255
    bar = (np.abs(xx - 14) < 2) * (np.abs(yy - 14) < 10) * 255
    _write_idx(tmp_path / "t-images-idx3-ubyte.gz", np.stack([ring, bar, ring]), 0x08)
    _write_idx(tmp_path / "t-labels-idx1-ubyte.gz", np.array([0, 1, 0]), 0x08)
    out = tmp_path / "sim"
    rc = main(
        [
            "simulate",
            "mnist-dvs",
            "--out",
            str(out),
            "--n",
            "3",
            "--scale",
            "4",
            "8",
            "--seed",
            "5",
            "--duration-s",
            "0.3",
            "--mnist",
            str(tmp_path / "t-images-idx3-ubyte.gz"),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader((out / "index.csv").open()))
    assert len(rows) == 6
    paths = sorted(r["path"] for r in rows)
    assert paths == sorted(
        [
            "0/scale04/mnist_0_scale04_0001.aedat4",
            "0/scale04/mnist_0_scale04_0002.aedat4",
            "1/scale04/mnist_1_scale04_0001.aedat4",
            "0/scale08/mnist_0_scale08_0001.aedat4",
            "0/scale08/mnist_0_scale08_0002.aedat4",
            "1/scale08/mnist_1_scale08_0001.aedat4",
        ]
    )
    for r in rows:
        rec = events.read(out / r["path"])
        assert rec.format == "aedat4" and (rec.width, rec.height) == (128, 128)
        assert len(rec) == int(r["events"]) > 100
    # reproducible: same seed, same files
    again = tmp_path / "again"
    main(
        [
            "simulate",
            "mnist-dvs",
            "--out",
            str(again),
            "--n",
            "1",
            "--scale",
            "4",
            "--seed",
            "5",
            "--duration-s",
            "0.3",
            "--mnist",
            str(tmp_path / "t-images-idx3-ubyte.gz"),
        ]
    )
    a = events.read(out / "0/scale04/mnist_0_scale04_0001.aedat4").events
    b = events.read(again / "0/scale04/mnist_0_scale04_0001.aedat4").events
    np.testing.assert_array_equal(a, b)
    assert (
        main(["simulate", "mnist-dvs", "--out", str(out), "--n", "1", "--mnist", str(tmp_path / "nope.gz")])
        == 2
    )


def test_simulate_compare_prints_real_and_simulated(tmp_path, capsys):
    yy, xx = np.mgrid[:28, :28]
    ring = (np.abs(np.hypot(xx - 13.5, yy - 13.5) - 8) < 2) * 255
    _write_idx(tmp_path / "t-images-idx3-ubyte.gz", np.stack([ring, ring]), 0x08)
    _write_idx(tmp_path / "t-labels-idx1-ubyte.gz", np.array([0, 0]), 0x08)
    real = events.simulate_mnist_dvs(ring / 255.0, scale=4, duration_s=0.4, seed=1)
    path = tmp_path / "mnist_0_scale04_0001.aedat4"
    events.write_aedat4(path, real.events, 128, 128)
    assert (
        main(
            [
                "simulate",
                "compare",
                str(path),
                "--n",
                "2",
                "--json",
                "--mnist",
                str(tmp_path / "t-images-idx3-ubyte.gz"),
            ]
        )
        == 0
    )
    (row,) = json.loads(capsys.readouterr().out)
    assert row["scale"] == 4 and row["real"]["events"] == len(real.events)
    sim = row["simulated"]["events_per_s"]["mean"]
    assert 0.5 < sim / row["real"]["events_per_s"] < 2.0
