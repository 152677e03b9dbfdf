"""The ``vdib model`` CLI and a run on the device named by VDIB_TEST_DEVICE (default cpu)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import vdib_cli
from model.naturalizer import OnlineNaturalizer
from model.rules import build_rule
from model.testing import random_spike_frames, tiny_naturalizer

DEVICE = os.environ.get("VDIB_TEST_DEVICE", "cpu")


def test_cli_tiny_info_export(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert vdib_cli.main(["model", "tiny", str(ck), "--input-shape", "2,6,6", "--hidden", "12"]) == 0
    capsys.readouterr()
    assert vdib_cli.main(["model", "info", str(ck)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["input_shape"] == [2, 6, 6] and info["parameters"]["encoder"] > 0
    assert vdib_cli.main(["model", "export-onnx", str(ck), str(tmp_path / "onnx"), "--check"]) == 0
    assert "identical spikes: True" in capsys.readouterr().out
    assert vdib_cli.main(["model", "info", str(tmp_path / "missing")]) == 1


def test_on_device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    nat = tiny_naturalizer(input_shape=(2, 6, 6), hidden=(16,), n_readout=8, tau_d=4, image_shape=(6, 6)).to(
        DEVICE
    )
    frames = random_spike_frames(12, (2, 6, 6), rate=0.1, seed=0).to(DEVICE)
    gen = torch.Generator(device=DEVICE)
    y_b, img_b = nat(frames[:, None], gen.manual_seed(3))
    online = OnlineNaturalizer(nat, torch.Generator(device=DEVICE).manual_seed(3))
    ys = torch.stack([online.push(f) for f in frames])
    assert torch.equal(ys, y_b[:, 0]) and ys.device.type == torch.device(DEVICE).type
    rule = build_rule("vdib", nat, baseline="loo", n_samples=2)
    stats = rule.train_step(
        frames[:, None].expand(-1, 3, -1, -1, -1),
        torch.rand(3, 6, 6, device=DEVICE),
        torch.Generator(device=DEVICE).manual_seed(0),
    )
    assert stats["loss"] == stats["loss"]
