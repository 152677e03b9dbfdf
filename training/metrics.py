"""Image metrics (MSE, SSIM), the run's ``metrics.jsonl`` log and its PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    r"""Per-image SSIM (Wang et al. 2004) of images ``[B, H, W]`` in [0, data_range].

    :math:`\mathrm{SSIM} = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}{(\mu_a^2 + \mu_b^2 + C_1)
    (\sigma_a^2 + \sigma_b^2 + C_2)}` with Gaussian-weighted local statistics (σ = 1.5, 11x11
    window), :math:`C_1 = (0.01 L)^2`, :math:`C_2 = (0.03 L)^2`, averaged over the valid area
    (18x18 on 28x28 digits): equal to skimage's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``.
    """
    a = a.double().unsqueeze(1)
    b = b.double().unsqueeze(1)
    w = _gaussian_window(size, sigma).double()[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a**2
    sbb = F.conv2d(b * b, w) - mu_b**2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean((1, 2, 3)).float()


class MetricsLog:
    """Append-only JSON-lines log (one object per line, flushed per record)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.is_file():
            # on resume, drop records written after the checkpoint so the log has no duplicates
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after_step
            ]
            path.write_text("".join(ln + "\n" for ln in keep))
        self._f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def last_record(path: Path, kind: str) -> dict[str, Any] | None:
    """The newest record of ``kind`` in a JSON-lines log that may be being written (a partial last
    line is skipped); ``None`` when there is none yet."""
    if not path.is_file():
        return None
    for ln in reversed(path.read_text().splitlines()):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == kind:
            return rec
    return None


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6, 3.5))
    return fig, fig.subplots()


def _finish(fig: Figure, ax: Axes, path: Path) -> Path:
    """Legend, grid, tight layout, save as PNG: the tail of every run plot."""
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """``loss.png``, ``spike_rate.png`` (and ``eval.png`` when evaluations exist) from metrics.jsonl."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    out = []
    if train:
        x = [r["examples"] for r in train]
        fig, ax = _figure()
        for key, lab in (("decoder_loss", "decoder loss"), ("loss", "total loss")):
            ys = [r.get(key) for r in train]
            if any(v is not None for v in ys):
                ax.plot(x, [math.nan if v is None else v for v in ys], label=lab, lw=1)
        ax.set_xlabel("training examples")
        ax.set_ylabel("loss (nats per example)")
        ax.set_yscale("log")
        out.append(_finish(fig, ax, run_dir / "loss.png"))
        fig, ax = _figure()
        ax.plot(x, [r.get("readout_rate", math.nan) for r in train], lw=1, label="readout")
        if any("hidden_rate_0" in r for r in train):
            ax.plot(x, [r.get("hidden_rate_0", math.nan) for r in train], lw=1, label="hidden")
        ax.set_xlabel("training examples")
        ax.set_ylabel("spike rate (per neuron per step)")
        out.append(_finish(fig, ax, run_dir / "spike_rate.png"))
    if evals:
        keys = [k for k in ("judge_accuracy", "ssim", "accuracy") if k in evals[-1]]
        if keys:
            fig, ax = _figure()
            for k in keys:
                ax.plot(
                    [r["examples"] for r in evals], [r.get(k, math.nan) for r in evals], marker="o", label=k
                )
            ax.set_xlabel("training examples")
            out.append(_finish(fig, ax, run_dir / "eval.png"))
    return out


def image_grid(images: torch.Tensor, path: Path, rows: int = 2, titles: list[str] | None = None) -> Path:
    """Save a grid of ``[N, H, W]`` images in [0, 1] as a PNG."""
    n = images.shape[0]
    cols = math.ceil(n / rows)
    fig = Figure(figsize=(1.2 * cols, 1.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
