"""Predictive coding with drifting blobs (the paper's Figure 2): accuracy / MSE versus the target
lag δ (β = 1) and readout rate / accuracy versus β (δ = ``beta_lag``).

``vdib predictive [--lags ...] [--betas ...] [--examples N] [--out DIR]`` (default ``runs/predictive``);
every point is one training run of :func:`training.predictive.train_blobs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ..predictive import BlobConfig, train_blobs
from . import report

__all__ = ["predictive_study"]


def predictive_study(
    lags: list[int],
    betas: list[float],
    examples: int,
    seed: int,
    out: Path,
    beta_lag: int = -2,
    progress: bool = False,
    kl_reduction: Literal["mean", "sum"] = "mean",
    name: str = "predictive",
) -> dict[str, Any]:
    """Train one model per lag and per β; writes ``out/<name>.{json,md,png}`` and returns the rows."""
    lag_rows, beta_rows = [], []
    for lag in lags:
        _, r = train_blobs(
            BlobConfig(
                lag=lag, beta=1.0, examples=examples, seed=seed, rule_options={"kl_reduction": kl_reduction}
            ),
            progress,
        )
        lag_rows.append({"lag": lag, **{k: v for k, v in r.items() if k != "config"}})
    for beta in betas:
        _, r = train_blobs(
            BlobConfig(
                lag=beta_lag,
                beta=beta,
                examples=examples,
                seed=seed,
                rule_options={"kl_reduction": kl_reduction},
            ),
            progress,
        )
        beta_rows.append({"beta": beta, **{k: v for k, v in r.items() if k != "config"}})
    res = {
        "examples": examples,
        "seed": seed,
        "beta_lag": beta_lag,
        "kl_reduction": kl_reduction,
        "lags": lag_rows,
        "betas": beta_rows,
    }
    report.write_predictive(res, out, name)
    return res
