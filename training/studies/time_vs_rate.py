"""Time minus rate decoding: matched pairs of Table 1 cells versus the training budget and τ_d.

``vdib time-vs-rate [--cells JSONL ...] [--tau-cells JSONL] [--out DIR]`` (default ``runs/time-vs-rate``).
The inputs are cell records as ``vdib table1`` appends them to ``ROOT/cells.jsonl`` (fields
``encoding``, ``decoding``, ``rule``, ``seed``, optional ``variant``, ``examples``,
``judge_accuracy``; the τ_d sweep's also ``tau_d`` and ``parameter_matched``); the committed ones
are ``docs/results/table1-cells.jsonl``, ``table1-vdib-lr-cells.jsonl`` and
``time_vs_rate-tau-cells.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import report
from .common import GridCell, read_jsonl

__all__ = ["pairs", "time_vs_rate"]

Record = dict[str, Any]


def pairs(records: list[Record], key: Callable[[Record], tuple[Any, ...]]) -> list[Record]:
    """Group cells by (encoding, rule label, ``key(record)``); mean and std over seeds of each decoding."""
    by: dict[tuple[Any, ...], dict[str, list[float]]] = {}
    for r in records:
        cell = GridCell.from_dict(r)
        by.setdefault((cell.encoding, cell.label, *key(r)), {}).setdefault(cell.decoding, []).append(
            100 * float(r["judge_accuracy"])
        )
    rows = []
    for k, v in sorted(by.items()):
        row: Record = {
            "encoding": k[0],
            "rule": k[1],
            "key": list(k[2:]),
            "seeds": min(len(x) for x in v.values()),
        }
        for dec in ("time", "rate"):
            row[dec] = float(np.mean(v[dec])) if dec in v else None
            row[dec + "_std"] = float(np.std(v[dec])) if dec in v and len(v[dec]) > 1 else None
        row["time_minus_rate"] = (
            row["time"] - row["rate"] if row["time"] is not None and row["rate"] is not None else None
        )
        rows.append(row)
    return rows


def _tau_key(r: Record) -> tuple[int, bool, int]:
    return int(r["tau_d"]), bool(r.get("parameter_matched", False)), int(r["examples"])


def time_vs_rate(
    cells_jsonl: Path, out: Path, tau_jsonl: Path | None = None, extra_jsonl: list[Path] | None = None
) -> dict[str, list[Record]]:
    """Matched time/rate decoding pairs; writes ``out/time_vs_rate.{md,json,png}``.

    ``cells_jsonl`` (+ ``extra_jsonl``): finished Table 1 cells (several seeds of a cell are
    averaged) -> the gap versus the training budget. ``tau_jsonl``: the τ_d sweep's cells -> the gap
    versus the decoder window; a parameter-matched time decoder is compared with the rate decoder
    of the same τ_d and budget.
    """
    recs = read_jsonl([cells_jsonl, *(extra_jsonl or [])])
    budget = pairs(recs, lambda r: (int(r["examples"]),))
    taus = pairs(read_jsonl([tau_jsonl]), _tau_key) if tau_jsonl else []
    rate_of = {
        (r["encoding"], r["rule"], r["key"][0], r["key"][2]): r["rate"] for r in taus if r["rate"] is not None
    }
    for r in taus:
        tau, _, n = r["key"]
        rate = r["rate"] if r["rate"] is not None else rate_of.get((r["encoding"], r["rule"], tau, n))
        r["rate"] = rate
        r["time_minus_rate"] = r["time"] - rate if r["time"] is not None and rate is not None else None
    report.write_time_vs_rate(budget, taus, out)
    return {"budget": budget, "tau_d": taus}
