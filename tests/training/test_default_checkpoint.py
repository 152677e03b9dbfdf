"""The shipped default MNIST-DVS checkpoint decodes the real recording of a 0 into a 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "checkpoints" / "mnist-dvs"


def _load():
    if not (DEFAULT / "config.json").is_file():
        pytest.skip("default checkpoint not trained yet")
    from model import load_checkpoint

    return load_checkpoint(DEFAULT)


def test_default_checkpoint_config_carries_preprocessing():
    nat, meta = _load()
    cfg = nat.config
    assert cfg.input_shape == (2, 26, 26) and cfg.dt_us == 10_000
    assert cfg.polarity == "split" and cfg.mode == "presence"
    assert cfg.preprocessing["roi"] == [48, 54, 26, 26]
    assert meta["training"]["data"]["target"] == "source"
    assert (DEFAULT / "README.md").is_file()
    size = sum(p.stat().st_size for p in DEFAULT.iterdir())
    assert size <= 20 * 1024 * 1024


def test_real_mnist_dvs_zero_decodes_to_zero(shared_events):
    from training.evaluate import decode_recording, judge_label
    from training.judge import default_judge_dir, load_judge

    nat, _ = _load()
    judge = load_judge(default_judge_dir())
    path = shared_events / "aedat2" / "mnist_0_scale04_0001.aedat"
    final, snaps = decode_recording(nat, path, seed=0, every=20)
    assert judge_label(final[None], judge) == [0]
    # not a fluke of one instant: most snapshots along the recording are judged 0 as well
    labels = judge_label(snaps, judge)
    assert labels.count(0) > len(labels) / 2
    assert json.loads((DEFAULT / "config.json").read_text())["model"]["dt_us"] == 10_000


def test_evaluate_on_real_recordings_plots_the_decoding_over_time(shared_events, tmp_path):
    from training.evaluate import evaluate_checkpoint

    _load()
    res = evaluate_checkpoint(
        DEFAULT, data=shared_events / "aedat2", out_dir=tmp_path, progress=False, device="cpu"
    )
    assert res["n"] >= 1 and res["judge_accuracy"] == 1.0  # the recordings at hand are 0s
    dot = json.loads((tmp_path / "summary.json").read_text())["decoded_over_time"]
    assert dot["recording"] == "mnist_0_scale04_0001.aedat"
    classes = dot["judge_classes"]  # a snapshot every 200 ms of the 2.2 s recording, then the final image
    assert len(classes) == 12 and classes[-1] == 0 and classes.count(0) > len(classes) / 2
    assert (tmp_path / "decoded_over_time.png").stat().st_size > 10_000
