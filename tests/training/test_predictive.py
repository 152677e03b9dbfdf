"""Predictive coding: class patterns, a tiny training run, metrics in range."""

from __future__ import annotations

import torch

from model.blobs import blob_class_table, class_patterns
from training.predictive import BlobConfig, evaluate_blobs, train_blobs


def test_class_patterns_match_table():
    pats = class_patterns()
    table = blob_class_table()
    assert pats.shape == (210, 20)
    assert pats[table[3, 3]].tolist() == [1.0 if i == 3 else 0.0 for i in range(20)]
    assert pats[table[2, 7]].sum() == 2 and pats[table[2, 7], 2] == 1 and pats[table[2, 7], 7] == 1


def test_tiny_training_run_learns_something():
    cfg = BlobConfig(lag=0, examples=32 * 100, T=50, T_test=300, seed=0)
    nat, res = train_blobs(cfg)
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 < res["spike_rate"] < 1.0
    # an untrained decoder is at chance (1/210); a short training beats it clearly
    assert res["accuracy"] > 5 / 210
    again = evaluate_blobs(nat, cfg)
    assert again == {k: res[k] for k in again}  # evaluation is seeded
    assert torch.isfinite(torch.cat([p.flatten() for p in nat.parameters()])).all()
