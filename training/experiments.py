"""Experiment grids: Table 1 (encoding x decoding x rule x seed) and result tables next to the paper's.

``vdib table1 [--examples N] [--seeds 0 1 2] [--rules vdib vdib-bptt] [--encodings rate ttfs]
[--decodings time rate] [--train-limit N]`` trains every cell (a cell with a partial run resumes
from its last checkpoint, and raising ``--examples`` continues finished cells exactly), then
writes ``docs/results/table1.{md,json,png}``; ``vdib table1 --collect-only`` only rewrites the
tables from the run directories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "table1" / "base.toml"
PAPER = {  # the paper's Table 1 (LeNet accuracy on decoded test images, MLP decoder), mean, std in %
    ("rate", "rate"): (60.50, 0.32), ("rate", "time"): (91.32, 0.27),
    ("ttfs", "rate"): (86.43, 0.84), ("ttfs", "time"): (92.82, 0.25),
}
DECODER = {"time": "mlp", "rate": "rate-mlp"}


def cell_name(enc: str, dec: str, rule: str, seed: int) -> str:
    return f"{enc}-{dec}-{rule}-s{seed}"


def run_cell(root: Path, enc: str, dec: str, rule: str, seed: int, examples: int, train_limit: int,
             extra: list[str], progress: bool) -> dict:
    """Train one cell (resuming when its run directory holds a checkpoint); returns its summary."""
    from .config import load_config
    from .state import latest_checkpoint
    from .trainer import train

    run_dir = root / cell_name(enc, dec, rule, seed)
    over = [f'run.dir="{run_dir}"', f"run.seed={seed}", f'data.encoding="{enc}"',
            f'model.decoder="{DECODER[dec]}"', f'rule.name="{rule}"', f"train.examples={examples}",
            f"data.train_limit={train_limit}", *extra]
    cfg = load_config(BASE, over)
    return train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)


def collect(root: Path, out: Path) -> dict:
    """Gather every finished cell under ``root`` into ``out/table1.{json,md,png}``."""
    import numpy as np

    cells: dict[tuple[str, str, str], list[dict]] = {}
    for cfg_path in sorted(root.glob("*/final/config.json")):
        meta = json.loads(cfg_path.read_text())
        name = cfg_path.parent.parent.name
        enc, dec, rule, seed = name.split("-", 2)[0], name.split("-", 2)[1], *name.split("-", 2)[2].rsplit("-s", 1)
        m = meta["metrics"]
        cells.setdefault((enc, dec, rule), []).append({
            "seed": int(seed), "judge_accuracy": m.get("judge_accuracy"), "mse": m.get("mse"),
            "ssim": m.get("ssim"), "spike_rate": m.get("spike_rate"), "examples": m.get("examples"),
            "train_seconds": m.get("train_seconds"), "n_test": m.get("n"),
            "train_items": meta.get("provenance", {}).get("data", {}).get("train_items"),
        })
    rows = []
    for (enc, dec, rule), runs in sorted(cells.items()):
        acc = np.array([r["judge_accuracy"] for r in runs], dtype=float) * 100
        rows.append({
            "encoding": enc, "decoding": dec, "rule": rule, "seeds": [r["seed"] for r in runs],
            "judge_accuracy_mean": float(acc.mean()), "judge_accuracy_std": float(acc.std()) if len(acc) > 1 else None,
            "mse": float(np.mean([r["mse"] for r in runs])), "ssim": float(np.mean([r["ssim"] for r in runs])),
            "spike_rate": float(np.mean([r["spike_rate"] for r in runs])),
            "examples": runs[0]["examples"], "train_items": runs[0]["train_items"], "n_test": runs[0]["n_test"],
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
            "paper": PAPER.get((enc, dec)), "runs": runs,
        })
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps({"rows": rows, "paper": {f"{k[0]}/{k[1]}": v for k, v in PAPER.items()}},
                                                indent=2) + "\n")
    lines = [
        "| input | decoding | rule | judge accuracy (ours) | paper, same cell (200k examples, 3 seeds) | MSE | SSIM | readout rate | examples | train digits | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        std = f" ± {r['judge_accuracy_std']:.2f}" if r["judge_accuracy_std"] is not None else ""
        paper = f"{r['paper'][0]:.2f} ± {r['paper'][1]:.2f} %" if r["paper"] else "-"
        lines.append(
            f"| {r['encoding']} | {r['decoding']} | `{r['rule']}` | {r['judge_accuracy_mean']:.2f}{std} % "
            f"(seeds {','.join(map(str, r['seeds']))}) | {paper} | {r['mse']:.4f} | {r['ssim']:.3f} | "
            f"{r['spike_rate']:.3f} | {r['examples']} | {r['train_items']} | {r['train_seconds']:.0f} |")
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels, ours, papers = [], [], []
        for r in rows:
            labels.append(f"{r['encoding']}\n{r['decoding']}\n{r['rule']}")
            ours.append(r["judge_accuracy_mean"])
            papers.append(r["paper"][0] if r["paper"] else math.nan)
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, ours, 0.4, label="ours")
        ax.bar(xs + 0.2, papers, 0.4, label="paper (VDIB rule, 200k examples)")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("judge accuracy on reconstructions (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "table1.png", dpi=110)
        plt.close(fig)
    return {"rows": rows}


def predictive_study(lags: list[int], betas: list[float], examples: int, seed: int, out: Path,
                     beta_lag: int = -2, progress: bool = False, kl_reduction: str = "mean",
                     name: str = "predictive") -> dict:
    """Figure 2: accuracy / MSE versus lag δ (β = 1) and readout rate / accuracy versus β (δ = beta_lag).

    Writes ``out/predictive.{json,md,png}``; every point is one training run of ``examples``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .predictive import BlobConfig, train_blobs

    lag_rows, beta_rows = [], []
    for lag in lags:
        _, r = train_blobs(BlobConfig(lag=lag, beta=1.0, examples=examples, seed=seed,
                                      rule_options={"kl_reduction": kl_reduction}), progress)
        lag_rows.append({"lag": lag, **{k: v for k, v in r.items() if k != "config"}})
    for beta in betas:
        _, r = train_blobs(BlobConfig(lag=beta_lag, beta=beta, examples=examples, seed=seed,
                                      rule_options={"kl_reduction": kl_reduction}), progress)
        beta_rows.append({"beta": beta, **{k: v for k, v in r.items() if k != "config"}})
    out.mkdir(parents=True, exist_ok=True)
    res = {"examples": examples, "seed": seed, "beta_lag": beta_lag, "kl_reduction": kl_reduction,
           "lags": lag_rows, "betas": beta_rows}
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["| lag δ | accuracy | MSE | readout rate | train s |", "|---|---|---|---|---|"]
    md += [f"| {r['lag']} | {100 * r['accuracy']:.1f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} | {r['train_seconds']} |"
           for r in lag_rows]
    md += ["", f"| β (δ = {beta_lag}) | accuracy | MSE | readout rate |", "|---|---|---|---|"]
    md += [f"| {r['beta']} | {100 * r['accuracy']:.1f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} |" for r in beta_rows]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    if lag_rows:
        ax = axes[0]
        ax.plot([r["lag"] for r in lag_rows], [100 * r["accuracy"] for r in lag_rows], "o-", label="accuracy (%)")
        ax.set_xlabel("target lag δ")
        ax.set_ylabel("accuracy (%)")
        ax2 = ax.twinx()
        ax2.plot([r["lag"] for r in lag_rows], [r["mse"] for r in lag_rows], "s--", color="C1", label="MSE")
        ax2.set_ylabel("MSE")
        ax.set_title("accuracy / MSE vs lag (β = 1)")
    if beta_rows:
        ax = axes[1]
        ax.semilogx([r["beta"] for r in beta_rows], [r["spike_rate"] for r in beta_rows], "o-", label="readout rate")
        ax.set_xlabel("β")
        ax.set_ylabel("readout spike rate")
        ax2 = ax.twinx()
        ax2.semilogx([r["beta"] for r in beta_rows], [100 * r["accuracy"] for r in beta_rows], "s--", color="C1")
        ax2.set_ylabel("accuracy (%)")
        ax.set_title(f"rate / accuracy vs β (δ = {beta_lag})")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return res


def tsne_figure(checkpoints: list[tuple[str, Path]], out_png: Path, n: int = 1000, data: Path | None = None,
                seed: int = 0) -> dict:
    """The paper's Figure 3 (bottom): t-SNE of the SNN's readout spike windows, one panel per model.

    For each checkpoint the first ``n`` test items are encoded and the last τ_d readout frames
    (the decoder's input, flattened ``τ_d · N_Y``) are embedded with PCA(50) + t-SNE, coloured by
    digit. Returns the silhouette score of the digit classes in each embedding (higher = classes
    better separated).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from model import load_checkpoint

    from .evaluate import build_eval_dataset, reconstruct

    fig, axes = plt.subplots(1, len(checkpoints), figsize=(4.2 * len(checkpoints), 4))
    axes = np.atleast_1d(axes)
    scores = {}
    for ax, (label, path) in zip(axes, checkpoints, strict=True):
        nat, meta = load_checkpoint(path)
        ds, _ = build_eval_dataset(meta, data, n, progress=False)
        g = torch.Generator().manual_seed(seed)
        x, _, lab = ds.batch(torch.arange(min(n, len(ds))), g)
        _, y = reconstruct(nat, x, g, return_spikes=True)
        feats = y[-nat.config.tau_d:].permute(1, 0, 2).reshape(y.shape[1], -1).numpy()
        z = PCA(min(50, feats.shape[1], feats.shape[0]), random_state=seed).fit_transform(feats)
        emb = TSNE(2, random_state=seed, init="pca", perplexity=30).fit_transform(z)
        scores[label] = float(silhouette_score(emb, lab.numpy()))
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=lab.numpy(), cmap="tab10", s=4)
        ax.set_title(f"{label}\nsilhouette {scores[label]:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=list(axes), ticks=range(10), fraction=0.03)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return scores


ABLATION = [  # (label, config overrides) switched on in turn, on top of the authors' rule
    ("authors: per-parameter baseline, K=1, zero hidden init, SGD",
     ['rule.options={baseline = "per-parameter", n_samples = 1, encoder_optimizer = "sgd"}',
      'model.hidden_init="zero"']),
    ("+ leave-one-out baseline over K=2 readout samples",
     ['rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "sgd"}', 'model.hidden_init="zero"']),
    ("+ calibrated random hidden init (15 % of hidden spikes on)",
     ['rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "sgd"}', 'model.hidden_init="calibrated"']),
    ("+ Adam for the encoder (the `vdib` defaults)",
     ['rule.options={baseline = "loo", n_samples = 2, encoder_optimizer = "adam"}', 'model.hidden_init="calibrated"']),
]


def ablation(root: Path, out: Path, examples: int, encoding: str = "ttfs", decoding: str = "time",
             seed: int = 0, train_limit: int = 0, progress: bool = False) -> list[dict]:
    """The `vdib` rule's fixes switched on one at a time; writes ``out/ablation.{json,md}``."""
    from .config import load_config
    from .state import latest_checkpoint
    from .trainer import train

    rows = []
    for i, (label, over) in enumerate(ABLATION):
        run_dir = root / f"ablation-{i}-{encoding}-{decoding}"
        cfg = load_config(BASE, [f'run.dir="{run_dir}"', f"run.seed={seed}", f'data.encoding="{encoding}"',
                                 f'model.decoder="{DECODER[decoding]}"', 'rule.name="vdib"',
                                 f"train.examples={examples}", f"data.train_limit={train_limit}", *over])
        s = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)
        fe = s["final_eval"]
        rows.append({"variant": label, "judge_accuracy": fe.get("judge_accuracy"), "mse": fe.get("mse"),
                     "spike_rate": fe.get("spike_rate"), "train_seconds": s["train_seconds"],
                     "examples": s["examples"]})
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps({"encoding": encoding, "decoding": decoding, "rows": rows},
                                                      indent=2) + "\n")
        md = [f"`vdib` rule ablation ({encoding} input, {decoding} decoding, {examples} examples, seed {seed})", "",
              "| variant | judge accuracy | MSE | readout rate | train time (s) |", "|---|---|---|---|---|"]
        md += [f"| {r['variant']} | {100 * r['judge_accuracy']:.2f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} | "
               f"{r['train_seconds']:.0f} |" for r in rows]
        (out / "ablation.md").write_text("\n".join(md) + "\n")
    return rows


def time_vs_rate(cells_jsonl: Path, out: Path) -> list[dict]:
    """Matched time/rate decoding pairs at every budget in ``cells_jsonl`` (one line per finished cell,
    as ``vdib table1`` prints them); writes ``out/time_vs_rate.{md,png}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in cells_jsonl.read_text().splitlines() if ln.strip()]
    by: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in recs:
        enc, dec, rest = r["cell"].split("-", 2)
        rule = rest.rsplit("-s", 1)[0]
        by.setdefault((enc, rule, int(r["examples"])), {})[dec] = 100 * r["judge_accuracy"]
    rows = [{"encoding": e, "rule": ru, "examples": n, "time": v.get("time"), "rate": v.get("rate"),
             "time_minus_rate": (v["time"] - v["rate"]) if "time" in v and "rate" in v else None}
            for (e, ru, n), v in sorted(by.items())]
    md = ["| input | rule | examples | time decoding | rate decoding | time − rate |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = f"{r['time']:.2f} %" if r["time"] is not None else "-"
        ra = f"{r['rate']:.2f} %" if r["rate"] is not None else "-"
        d = f"{r['time_minus_rate']:+.2f}" if r["time_minus_rate"] is not None else "-"
        md.append(f"| {r['encoding']} | `{r['rule']}` | {r['examples']} | {t} | {ra} | {d} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_vs_rate.md").write_text("\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (enc, rule) in enumerate(sorted({(r["encoding"], r["rule"]) for r in rows})):
        sel = [r for r in rows if r["encoding"] == enc and r["rule"] == rule]
        for dec, style in (("time", "-o"), ("rate", "--s")):
            pts = [(r["examples"], r[dec]) for r in sel if r[dec] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=f"{enc} / {rule} / {dec} decoding")
    ax.set_xlabel("training examples")
    ax.set_ylabel("judge accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_rate.png", dpi=110)
    plt.close(fig)
    return rows
