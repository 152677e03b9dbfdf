"""Predictive coding with drifting Gaussian blobs (paper sec. 6.1, Figure 2).

20 input neurons carry two drifting blobs; a one-layer encoder (no hidden layer, 20 -> 10 SRM
readouts, τ_e = 5) compresses them and a softmax decoder over the last τ_d = 5 readout frames
predicts the input pattern at time ``t + δ`` (one of 210 classes: every 1- and 2-hot pattern).
Prior rate r = 0.2, β = 1 unless swept, lr 1e-2, T = 100 per training example, tested on one
sequence of T = 1000. The ``vdib`` rule trains it (decoder on every step: ``target_steps="all"``).

Metrics on the test sequence: ``accuracy`` (predicted class = pattern at t + δ), ``mse`` between
the predicted expected pattern :math:`\\hat r_t = \\sum_c p_t(c)\\,\\mathrm{pattern}_c \\in [0,1]^{20}`
and the true binary pattern, and ``spike_rate`` of the readout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from model.blobs import class_patterns, drifting_blobs
from model.encoder import EncoderConfig
from model.naturalizer import Naturalizer, NaturalizerConfig, sliding_windows
from model.rules import build_rule


@dataclass
class BlobConfig:
    lag: int = 0
    beta: float = 1.0
    examples: int = 50_000
    batch_size: int = 32
    T: int = 100
    T_test: int = 1000
    lr: float = 1e-2
    prior_rate: float = 0.2
    tau_e: int = 5
    tau_d: int = 5
    n_readout: int = 10
    seed: int = 0
    rule: Literal["vdib", "vdib-bptt"] = "vdib"
    rule_options: dict[str, Any] | None = None


def build_blob_model(cfg: BlobConfig) -> Naturalizer:
    enc = EncoderConfig(
        n_inputs=20,
        hidden=(),
        n_readout=cfg.n_readout,
        tau_e=cfg.tau_e,
        n_basis=min(8, cfg.tau_e),
        prior_rate=cfg.prior_rate,
    )
    nc = NaturalizerConfig(
        encoder=enc,
        decoder="linear",
        tau_d=cfg.tau_d,
        image_shape=(210,),
        input_shape=(1, 1, 20),
        dt_us=1,
        output="logits",
        preprocessing={"kind": "blobs", "lag": cfg.lag},
    )
    return Naturalizer(nc)


@torch.no_grad()
def evaluate_blobs(nat: Naturalizer, cfg: BlobConfig, seed: int = 12345) -> dict[str, float]:
    """Accuracy, MSE and readout rate on one test sequence of ``T_test`` steps."""
    x, y = drifting_blobs(cfg.T_test, 1, cfg.lag, rng=np.random.default_rng(seed))
    g = torch.Generator().manual_seed(seed)
    spikes = nat.encoder(x, g)
    w = sliding_windows(spikes, cfg.tau_d)  # [T, 1, tau_d, N]
    logits = nat.decoder(w[:, 0])  # [T, 210]
    p = logits.softmax(-1)
    pats = class_patterns()
    pred_pattern = p @ pats
    true_pattern = pats[y[:, 0]]
    return {
        "accuracy": float((logits.argmax(-1) == y[:, 0]).float().mean()),
        "mse": float(((pred_pattern - true_pattern) ** 2).mean()),
        "spike_rate": float(spikes.mean()),
    }


def train_blobs(cfg: BlobConfig, progress: bool = False) -> tuple[Naturalizer, dict[str, Any]]:
    """Train one predictive-coding model; returns (naturalizer, metrics incl. test results)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    nat = build_blob_model(cfg)
    opts = {"target_steps": "all", **(cfg.rule_options or {})}
    rule = build_rule(cfg.rule, nat, lr=cfg.lr, beta=cfg.beta, **opts)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    steps = max(1, cfg.examples // cfg.batch_size)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for _ in tqdm(range(steps), desc=f"blobs lag={cfg.lag} beta={cfg.beta}", disable=not progress):
        x, y = drifting_blobs(cfg.T, cfg.batch_size, cfg.lag, rng=rng)
        last = rule.train_step(x, y, g)
    res: dict[str, Any] = dict(evaluate_blobs(nat, cfg))
    res.update(
        {
            "train_seconds": round(time.perf_counter() - t0, 1),
            "examples": steps * cfg.batch_size,
            "train_readout_rate": last.get("readout_rate"),
            "config": asdict(cfg),
        }
    )
    return nat, res
