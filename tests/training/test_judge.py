"""The LeNet-5 judge: padding, augmentation, save/load without pickle, the shipped checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from training import judge


def test_padding_and_shape():
    x = torch.rand(3, 784)
    p = judge.to_judge_input(x)
    assert p.shape == (3, 1, 32, 32)
    assert p[:, :, :2].abs().sum() == 0 and p[:, :, :, -2:].abs().sum() == 0
    torch.testing.assert_close(p[:, 0, 2:30, 2:30], x.view(3, 28, 28))


def test_augmentation_is_small_and_seeded():
    x = judge.to_judge_input(torch.rand(8, 784))
    cfg = judge.JudgeConfig()
    a = judge.random_affine(x, cfg, torch.Generator().manual_seed(1))
    b = judge.random_affine(x, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    ident = judge.JudgeConfig(max_rotate_deg=0, max_shift_px=0, scale_range=0, max_shear=0)
    torch.testing.assert_close(judge.random_affine(x, ident, torch.Generator()), x, atol=1e-5, rtol=0)


def test_tiny_training_save_load_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    # two separable "classes": bright top half vs bright bottom half
    x = torch.zeros(256, 28, 28)
    y = torch.arange(256) % 2
    x[y == 0, :14] = 1.0
    x[y == 1, 14:] = 1.0
    x = (x + 0.1 * torch.rand(x.shape, generator=g)).clamp(0, 1).view(256, -1)
    cfg = judge.JudgeConfig(epochs=3, batch_size=32, lr=3e-3)
    model, metrics = judge.train_judge(x, y, x, y, cfg, progress=False)
    assert metrics["test_accuracy"] > 0.95
    judge.save_judge(tmp_path / "j", model, cfg, metrics, {"hardware": "test"})
    cfgj = json.loads((tmp_path / "j" / "config.json").read_text())
    assert cfgj["format"] == judge.JUDGE_FORMAT and cfgj["metrics"]["n_train"] == 256
    assert (tmp_path / "j" / "README.md").read_text().startswith("# Judge")
    loaded = judge.load_judge(tmp_path / "j")
    torch.testing.assert_close(judge.predict(loaded, x), judge.predict(model, x))


def test_shipped_judge_accuracy(shared_mnist):
    path = judge.default_judge_dir()
    if not (path / "config.json").is_file():
        pytest.skip("judge checkpoint not trained")
    model = judge.load_judge(path)
    _, _, tex, tey, _, _ = judge.load_mnist_tensors(shared_mnist, 10)
    acc = judge.accuracy(model, tex, tey)
    assert acc >= 0.985
    assert abs(acc - json.loads((path / "config.json").read_text())["metrics"]["test_accuracy"]) < 1e-3
