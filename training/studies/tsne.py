"""The paper's Figure 3 (bottom): t-SNE of the SNN's readout spike windows, one panel per model.

``vdib tsne LABEL=CHECKPOINT ... [--out PNG]`` (default ``runs/tsne/tsne.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import load_checkpoint

from ..evaluate import build_eval_dataset, reconstruct
from . import report

__all__ = ["tsne_embedding", "tsne_figure"]


def tsne_embedding(path: Path, n: int = 1000, data: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Encode the first ``n`` test items of a checkpoint; embed its last τ_d readout frames (the
    decoder's input, flattened ``τ_d · N_Y``) with PCA(50) + t-SNE. Returns the embedding, the
    digit labels and the silhouette score of the digit classes (higher = better separated)."""
    from sklearn.decomposition import PCA  # dev/eval-only dependency
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    nat, meta = load_checkpoint(path)
    ds, _ = build_eval_dataset(meta, data, n, progress=False)
    g = torch.Generator().manual_seed(seed)
    x, _, lab = ds.batch(torch.arange(min(n, len(ds))), g)
    _, y = reconstruct(nat, x, g, return_spikes=True)
    feats = y[-nat.config.tau_d :].permute(1, 0, 2).reshape(y.shape[1], -1).numpy()
    z = PCA(min(50, feats.shape[1], feats.shape[0]), random_state=seed).fit_transform(feats)
    emb = TSNE(2, random_state=seed, init="pca", perplexity=30).fit_transform(z)
    return {"embedding": emb, "labels": lab.numpy(), "silhouette": float(silhouette_score(emb, lab.numpy()))}


def tsne_figure(
    checkpoints: list[tuple[str, Path]], out_png: Path, n: int = 1000, data: Path | None = None, seed: int = 0
) -> dict[str, float]:
    """One panel per ``(label, checkpoint)``; writes ``out_png``; returns each model's silhouette score."""
    panels = [{"label": label, **tsne_embedding(path, n, data, seed)} for label, path in checkpoints]
    report.plot_tsne(panels, out_png)
    return {p["label"]: p["silhouette"] for p in panels}
