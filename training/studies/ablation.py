"""The ``vdib`` rule's fixes (VDIB-REFERENCE.md pitfalls) switched on one at a time.

``vdib ablation [--examples N] [--encoding ttfs] [--decoding time] [--root DIR] [--out DIR]``: one
cell per variant under ``--root`` (default ``runs/ablation``), tables in ``--out`` (default: the root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ..state import latest_checkpoint
from ..trainer import train
from . import report
from .common import GridCell, write_cell
from .table1 import cell_config

__all__ = ["ABLATION", "ablation"]

ABLATION: list[
    tuple[str, list[str]]
] = [  # (variant, config overrides) switched on in turn, from the authors' rule
    (
        "authors: per-parameter baseline, K=1, zero hidden init, SGD",
        [
            'rule.options={baseline = "per-parameter", n_samples = 1, encoder_optimizer = "sgd"}',
            'model.hidden_init="zero"',
        ],
    ),
    (
        "+ leave-one-out baseline over K=2 readout samples",
        [
            'rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "sgd"}',
            'model.hidden_init="zero"',
        ],
    ),
    (
        "+ calibrated random hidden init (15 % of hidden spikes on)",
        [
            'rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "sgd"}',
            'model.hidden_init="calibrated"',
        ],
    ),
    (
        "+ Adam for the encoder (the `vdib` defaults)",
        [
            'rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "adam"}',
            'model.hidden_init="calibrated"',
        ],
    ),
]


def ablation(
    root: Path,
    out: Path,
    examples: int,
    encoding: Literal["rate", "ttfs"] = "ttfs",
    decoding: Literal["time", "rate"] = "time",
    seed: int = 0,
    train_limit: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train the variants in turn (resuming partial cells); rewrites ``out/ablation.{json,md}`` after each."""
    rows = []
    info = {"encoding": encoding, "decoding": decoding, "examples": examples, "seed": seed}
    for i, (variant, over) in enumerate(ABLATION):
        cell = GridCell(encoding, decoding, "vdib", seed, variant=f"ablation-{i}", overrides=tuple(over))
        cfg = cell_config(root, cell, examples, train_limit)
        run_dir = root / f"ablation-{i}-{encoding}-{decoding}"
        cfg.run.dir = str(run_dir)
        write_cell(run_dir, {**cell.to_dict(), "study": "ablation", "description": variant})
        s = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)
        fe = s["final_eval"]
        rows.append(
            {
                "variant": variant,
                "judge_accuracy": fe.get("judge_accuracy"),
                "mse": fe.get("mse"),
                "spike_rate": fe.get("spike_rate"),
                "train_seconds": s["train_seconds"],
                "examples": s["examples"],
            }
        )
        report.write_ablation(rows, info, out)
    return rows
