"""`vdib table1 --collect-only`: cells read from their cell.json records, seeds averaged, next to the paper's number."""

from __future__ import annotations

import json


def test_collect_averages_seeds_and_writes_tables(tmp_path):
    from training.studies.common import GridCell, write_cell
    from training.studies.table1 import collect

    root = tmp_path / "runs"
    for seed, acc in ((0, 0.90), (1, 0.91)):
        run = root / f"run-{seed}"  # the directory name carries nothing: the cell is in cell.json
        write_cell(run, GridCell("ttfs", "time", "vdib-bptt", seed).to_dict())
        d = run / "final"
        d.mkdir(parents=True)
        d.joinpath("config.json").write_text(
            json.dumps(
                {
                    "metrics": {
                        "judge_accuracy": acc,
                        "mse": 0.01,
                        "ssim": 0.8,
                        "spike_rate": 0.1,
                        "examples": 100,
                        "train_seconds": 2.0,
                        "n": 10,
                    },
                    "provenance": {"data": {"train_items": 10}},
                }
            )
        )
    rows = collect(root, tmp_path / "out")["rows"]
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert (
        abs(rows[0]["judge_accuracy_mean"] - 90.5) < 1e-6 and abs(rows[0]["judge_accuracy_std"] - 0.5) < 1e-6
    )
    assert rows[0]["paper"] == (92.82, 0.25)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| ttfs | time | `vdib-bptt` | 90.50 ± 0.50 % (seeds 0,1) | 92.82 ± 0.25 % |" in md
    assert json.loads((tmp_path / "out" / "table1.json").read_text())["rows"][0]["runs"][1]["seed"] == 1
    assert (tmp_path / "out" / "table1.png").stat().st_size > 10_000


def test_collect_skips_runs_without_a_cell_record_and_groups_variants(tmp_path):
    from training.studies.common import GridCell, write_cell
    from training.studies.table1 import collect

    root = tmp_path / "runs"
    metrics = {
        "judge_accuracy": 0.5,
        "mse": 0.01,
        "ssim": 0.8,
        "spike_rate": 0.1,
        "examples": 100,
        "train_seconds": 2.0,
        "n": 10,
    }
    for name, cell in (
        ("a", GridCell("rate", "rate", "vdib", 0)),
        ("b", GridCell("rate", "rate", "vdib", 0, "vdib-lr")),
        ("ttfs-time-vdib-s0", None),
    ):
        (root / name / "final").mkdir(parents=True)
        (root / name / "final" / "config.json").write_text(json.dumps({"metrics": metrics}))
        if cell is not None:
            write_cell(root / name, cell.to_dict())
    rows = collect(root, tmp_path / "out")["rows"]
    assert [(r["encoding"], r["decoding"], r["rule"]) for r in rows] == [
        ("rate", "rate", "vdib"),
        ("rate", "rate", "vdib-lr"),
    ]


def test_cell_records_round_trip_and_reject_bad_fields():
    import pytest

    from training.studies.common import CellError, GridCell

    c = GridCell("ttfs", "rate", "vdib", 2, "vdib-lr", ("rule.lr=1e-4",))
    assert GridCell.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.name == "ttfs-rate-vdib-lr-s2" and c.label == "vdib-lr"
    for bad in (
        {"encoding": "ttfs", "decoding": "rate", "rule": "vdib"},
        {"encoding": "dvs", "decoding": "rate", "rule": "vdib", "seed": 0},
        {"encoding": "ttfs", "decoding": "rate", "rule": "vdib", "seed": "0"},
    ):
        with pytest.raises(CellError):
            GridCell.from_dict(bad)


def test_run_cell_records_the_cell_and_collect_reads_it(tmp_path, shared_mnist):
    """A tiny real cell: cell.json before training, one cells.jsonl record after, tables from the records."""
    from training.studies.common import GridCell, read_cell, read_jsonl
    from training.studies.table1 import collect, run_cell

    small = (
        "model.hidden=[16]",
        "model.n_readout=8",
        "model.tau_d=4",
        "data.T=4",
        "model.decoder_options={hidden = 16}",
        "data.test_limit=16",
        "eval.final_limit=16",
        "eval.limit=16",
        "train.batch_size=8",
        f'data.dir="{shared_mnist}"',
        f'eval.judge="{tmp_path / "no-judge"}"',
        "run.threads=1",
    )
    cell = GridCell("rate", "time", "vdib-bptt", 3, overrides=small)
    rec = run_cell(tmp_path / "runs", cell, examples=16, train_limit=16)
    assert read_cell(tmp_path / "runs" / cell.name) == cell.to_dict()
    lines = read_jsonl([tmp_path / "runs" / "cells.jsonl"])
    assert lines == [rec] and GridCell.from_dict(rec) == cell
    assert rec["examples"] == 16 and rec["tau_d"] == 4 and 0.0 < rec["mse"] < 1.0
    rows = collect(tmp_path / "runs", tmp_path / "out")["rows"]
    assert [(r["encoding"], r["decoding"], r["rule"], r["seeds"]) for r in rows] == [
        ("rate", "time", "vdib-bptt", [3])
    ]
