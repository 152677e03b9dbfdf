"""Re-store a naturalizer checkpoint with smaller weights and re-measure it.

``python -m training.export SRC DST --weights int4 [--title T] [--notes N] [--limit N]`` loads
``SRC`` (any checkpoint ``model.load_checkpoint`` reads), writes ``DST`` with its weights as
``float16``, ``bfloat16``, ``int8`` or ``int4`` (``model.save_checkpoint(quantize=...)``), loads
``DST`` back and evaluates *that* model with the judge (the numbers in the model card are those of
the weights as shipped; the source's numbers are kept under ``metrics.source_eval``), and writes
the model card. This is how the Table 1 checkpoints in ``checkpoints/table1/`` were made from the
GPU runs (their time-decoding MLP decoders hold 31 M parameters: 124 MB as float32, ~19 MB as int4).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.naturalizer import Naturalizer

from .evaluate import evaluate_checkpoint
from .modelcard import write_model_card

WEIGHTS = ("float32", "float16", "bfloat16", "int8", "int4")


def store(nat: Naturalizer, dst: Path, weights: str, meta: dict[str, Any]) -> Path:
    """Save ``nat`` to ``dst`` with ``weights`` storage, keeping ``meta``'s training/metrics/provenance."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    prov = {**meta.get("provenance", {}), "weights_dtype": weights}
    if weights in ("int4", "int8"):
        save_checkpoint(dst, nat.to("cpu"), meta.get("training"), meta.get("metrics"), prov, quantize=weights)
    else:
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[weights]
        save_checkpoint(
            dst, copy.deepcopy(nat).to("cpu").to(dt), meta.get("training"), meta.get("metrics"), prov
        )
    return dst


def export(
    src: str | Path,
    dst: str | Path,
    weights: str = "int4",
    title: str | None = None,
    notes: str = "",
    limit: int | None = None,
    data: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Store ``src`` as ``dst`` with ``weights``, evaluate the stored model, write its model card."""
    src, dst = Path(src), Path(dst)
    nat, meta = load_checkpoint(src)
    store(nat, dst, weights, meta)
    res = evaluate_checkpoint(dst, data=data, limit=limit, progress=progress)
    keep = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    cfg_path = dst / "config.json"
    m = json.loads(cfg_path.read_text())
    before = {
        k: m["metrics"][k] for k in ("judge_accuracy", "mse", "ssim", "spike_rate", "n") if k in m["metrics"]
    }
    m["metrics"] = {**m["metrics"], **keep, "source_eval": before, "stored_weights": weights}
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, cfg_path)  # the digest covers the weights file only, so it stays valid
    write_model_card(dst, title, notes)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return {
        "checkpoint": str(dst),
        "weights": weights,
        "stored": keep,
        "source": before,
        "bytes": sum(f.stat().st_size for f in dst.iterdir() if f.is_file()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--weights", choices=WEIGHTS, default="int4")
    p.add_argument("--title", default=None)
    p.add_argument("--notes", default="")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test items only")
    p.add_argument("--data", type=Path, default=None)
    a = p.parse_args(argv)
    try:
        out = export(a.src, a.dst, a.weights, a.title, a.notes, a.limit, a.data)
    except (CheckpointError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
