"""``vdib evaluate CHECKPOINT --json``: one JSON object with the judge accuracy, MSE, SSIM, rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.metrics import ssim


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 28, 28, generator=g)
    b = (a + 0.3 * torch.randn(4, 28, 28, generator=g)).clamp(0, 1)
    ours = ssim(a, b)
    ref = [
        skm.structural_similarity(
            a[i].double().numpy(),
            b[i].double().numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(4)
    ]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(4))


def test_evaluate_cli_json(tmp_path, capsys, shared_mnist):
    import vdib_cli
    from tests.training.test_trainer import tiny_cfg
    from training.judge import default_judge_dir
    from training.trainer import train

    if not (default_judge_dir() / "config.json").is_file():
        pytest.skip("judge not trained")
    train(tiny_cfg(tmp_path / "run", **{"rule.name": '"vdib-bptt"'}), progress=False)
    rc = vdib_cli.main(
        [
            "evaluate",
            str(tmp_path / "run" / "final"),
            "--data",
            str(shared_mnist),
            "--json",
            "--limit",
            "40",
            "--out",
            str(tmp_path / "res"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("judge_accuracy", "mse", "ssim", "spike_rate"):
        assert isinstance(out[key], float)
    assert out["n"] == 40 and 0 <= out["judge_accuracy"] <= 1 and 0 < out["spike_rate"] < 1
    assert (tmp_path / "res" / "summary.json").is_file() and (tmp_path / "res" / "samples.png").is_file()
    assert json.loads((tmp_path / "res" / "summary.json").read_text())["mse"] == pytest.approx(out["mse"])
