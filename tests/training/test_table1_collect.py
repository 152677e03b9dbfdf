"""`vdib table1 --collect-only`: seeds of a cell averaged, next to the paper's number, plot written."""

from __future__ import annotations

import json


def test_collect_averages_seeds_and_writes_tables(tmp_path):
    from training.experiments import collect

    root = tmp_path / "runs"
    for seed, acc in ((0, 0.90), (1, 0.91)):
        d = root / f"ttfs-time-vdib-bptt-s{seed}" / "final"
        d.mkdir(parents=True)
        d.joinpath("config.json").write_text(json.dumps({
            "metrics": {"judge_accuracy": acc, "mse": 0.01, "ssim": 0.8, "spike_rate": 0.1, "examples": 100,
                        "train_seconds": 2.0, "n": 10},
            "provenance": {"data": {"train_items": 10}}}))
    rows = collect(root, tmp_path / "out")["rows"]
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert abs(rows[0]["judge_accuracy_mean"] - 90.5) < 1e-6 and abs(rows[0]["judge_accuracy_std"] - 0.5) < 1e-6
    assert rows[0]["paper"] == (92.82, 0.25)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| ttfs | time | `vdib-bptt` | 90.50 ± 0.50 % (seeds 0,1) | 92.82 ± 0.25 % |" in md
    assert json.loads((tmp_path / "out" / "table1.json").read_text())["rows"][0]["runs"][1]["seed"] == 1
    assert (tmp_path / "out" / "table1.png").stat().st_size > 10_000
