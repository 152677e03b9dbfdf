"""The paper's Table 1: encoding x decoding x rule x seed on MNIST, next to the paper's numbers.

``vdib table1 [--examples N] [--seeds 0 1 2] [--rules vdib vdib-bptt] [--encodings rate ttfs]
[--decodings time rate] [--train-limit N] [--variant NAME] [--set KEY=VALUE ...]`` trains every
cell under ``--root`` (default ``runs/table1``; a cell with a partial run resumes from its last
checkpoint, and raising ``--examples`` continues finished cells exactly), appends each finished
cell to ``ROOT/cells.jsonl`` and writes ``table1.{md,json,png}`` to ``--out`` (default: the root;
``--out docs/results`` refreshes the committed tables). ``--collect-only`` only rewrites the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrainingConfig, load_config
from ..state import latest_checkpoint
from ..trainer import train
from . import report
from .common import REPO, GridCell, append_jsonl, read_cell, write_cell

__all__ = ["BASE", "DECODER", "PAPER", "cell_config", "collect", "run_cell"]

BASE = REPO / "configs" / "table1" / "base.toml"
#: The paper's Table 1 (LeNet accuracy on decoded test images, MLP decoder): (mean, std) in %.
PAPER: dict[tuple[str, str], tuple[float, float]] = {
    ("rate", "rate"): (60.50, 0.32),
    ("rate", "time"): (91.32, 0.27),
    ("ttfs", "rate"): (86.43, 0.84),
    ("ttfs", "time"): (92.82, 0.25),
}
#: Decoding -> decoder: time decoding reads the τ_d readout frames, rate decoding their mean.
DECODER = {"time": "mlp", "rate": "rate-mlp"}


def cell_config(root: Path, cell: GridCell, examples: int, train_limit: int) -> TrainingConfig:
    """The resolved training config of one cell (``configs/table1/base.toml`` + the cell's settings)."""
    run_dir = root / cell.name
    over = [
        f'run.dir="{run_dir}"',
        f"run.seed={cell.seed}",
        f'data.encoding="{cell.encoding}"',
        f'model.decoder="{DECODER[cell.decoding]}"',
        f'rule.name="{cell.rule}"',
        f"train.examples={examples}",
        f"data.train_limit={train_limit}",
        *cell.overrides,
    ]
    return load_config(BASE, over)


def run_cell(
    root: Path, cell: GridCell, examples: int, train_limit: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Train one cell (resuming when its run directory holds a checkpoint); returns its record:
    the cell's identity, its resolved τ_d / decoder options, and the final metrics (also appended
    to ``root/cells.jsonl``)."""
    cfg = cell_config(root, cell, examples, train_limit)
    run_dir = Path(cfg.run.dir)
    write_cell(run_dir, cell.to_dict())
    s = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)
    fe = s.get("final_eval", {})
    record = {
        **cell.to_dict(),
        "tau_d": cfg.model.tau_d,
        "decoder_options": dict(cfg.model.decoder_options),
        "examples": s["examples"],
        "train_seconds": s["train_seconds"],
        **{k: v for k, v in fe.items() if isinstance(v, float)},
    }
    append_jsonl(root / "cells.jsonl", record)
    return record


def collect(root: Path, out: Path) -> dict[str, Any]:
    """Gather every finished cell under ``root`` (its ``cell.json`` + ``final/config.json``) into
    ``out/table1.{json,md,png}``; seeds of a cell are averaged."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for cfg_path in sorted(root.glob("*/final/config.json")):
        rec = read_cell(cfg_path.parent.parent)
        if rec is None:  # not a study cell (e.g. a run copied in by hand)
            continue
        cell = GridCell.from_dict(rec)
        meta = json.loads(cfg_path.read_text())
        m = meta["metrics"]
        cells.setdefault((cell.encoding, cell.decoding, cell.label), []).append(
            {
                "seed": cell.seed,
                "judge_accuracy": m.get("judge_accuracy"),
                "mse": m.get("mse"),
                "ssim": m.get("ssim"),
                "spike_rate": m.get("spike_rate"),
                "examples": m.get("examples"),
                "train_seconds": m.get("train_seconds"),
                "n_test": m.get("n"),
                "train_items": meta.get("provenance", {}).get("data", {}).get("train_items"),
            }
        )
    rows = []
    for (enc, dec, rule), runs in sorted(cells.items()):
        runs.sort(key=lambda r: r["seed"])
        acc = np.array([r["judge_accuracy"] for r in runs], dtype=float) * 100
        rows.append(
            {
                "encoding": enc,
                "decoding": dec,
                "rule": rule,
                "seeds": [r["seed"] for r in runs],
                "judge_accuracy_mean": float(acc.mean()),
                "judge_accuracy_std": float(acc.std()) if len(acc) > 1 else None,
                "mse": float(np.mean([r["mse"] for r in runs])),
                "ssim": float(np.mean([r["ssim"] for r in runs])),
                "spike_rate": float(np.mean([r["spike_rate"] for r in runs])),
                "examples": runs[0]["examples"],
                "train_items": runs[0]["train_items"],
                "n_test": runs[0]["n_test"],
                "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                "paper": PAPER.get((enc, dec)),
                "runs": runs,
            }
        )
    report.write_table1(rows, {f"{k[0]}/{k[1]}": v for k, v in PAPER.items()}, out)
    return {"rows": rows}
