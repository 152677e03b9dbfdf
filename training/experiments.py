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

        fig, ax = plt.subplots(figsize=(8, 4.0))
        labels, ours, ours_sd, papers, papers_sd = [], [], [], [], []
        for r in rows:
            labels.append(f"{r['encoding']}\n{r['decoding']}\n{r['rule']}")
            ours.append(r["judge_accuracy_mean"])
            ours_sd.append(r["judge_accuracy_std"] or 0.0)
            papers.append(r["paper"][0] if r["paper"] else math.nan)
            papers_sd.append(r["paper"][1] if r["paper"] else 0.0)
        xs = np.arange(len(rows))
        seeds = max(len(r["seeds"]) for r in rows)
        b1 = ax.bar(xs - 0.2, ours, 0.4, yerr=ours_sd, capsize=3, label=f"ours ({seeds} seed{'s' if seeds > 1 else ''})")
        b2 = ax.bar(xs + 0.2, papers, 0.4, yerr=papers_sd, capsize=3, label="paper (VDIB rule, 200k examples, 3 seeds)")
        ax.bar_label(b1, fmt="%.1f", fontsize=6, padding=2)
        ax.bar_label(b2, fmt="%.1f", fontsize=6, padding=2)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("judge accuracy on reconstructions (%)")
        ax.set_ylim(0, 112)
        ax.set_yticks(range(0, 101, 20))
        ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
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


def _pairs(recs: list[dict], key) -> list[dict]:
    """Group cells by ``key(record, rule)`` + decoding; mean and std over seeds of each side."""
    import numpy as np

    by: dict[tuple, dict[str, list[float]]] = {}
    for r in recs:
        enc, dec, rest = r["cell"].split("-", 2)
        rule = rest.rsplit("-s", 1)[0]
        by.setdefault((enc, rule, *key(r)), {}).setdefault(dec, []).append(100 * r["judge_accuracy"])
    rows = []
    for k, v in sorted(by.items()):
        row = {"encoding": k[0], "rule": k[1], "key": list(k[2:]), "seeds": min(len(x) for x in v.values())}
        for dec in ("time", "rate"):
            row[dec] = float(np.mean(v[dec])) if dec in v else None
            row[dec + "_std"] = float(np.std(v[dec])) if dec in v and len(v[dec]) > 1 else None
        row["time_minus_rate"] = row["time"] - row["rate"] if row["time"] is not None and row["rate"] is not None else None
        rows.append(row)
    return rows


def time_vs_rate(cells_jsonl: Path, out: Path, tau_jsonl: Path | None = None,
                 extra_jsonl: list[Path] | None = None) -> dict[str, list[dict]]:
    """Matched time/rate decoding pairs; writes ``out/time_vs_rate.{md,json,png}``.

    ``cells_jsonl`` (+ ``extra_jsonl``): one line per finished Table 1 cell as ``vdib table1``
    prints them (several seeds of a cell are averaged) -> the gap versus the training budget.
    ``tau_jsonl``: the same cells with ``tau_d`` (and ``parameter_matched``) fields, from
    ``scripts/table1-gpu.sh sweep`` -> the gap versus the decoder window.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(p: Path) -> list[dict]:
        return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]

    recs = read(cells_jsonl) + [r for p in (extra_jsonl or []) for r in read(p)]
    budget = _pairs(recs, lambda r: (int(r["examples"]),))
    taus = _pairs(read(tau_jsonl), lambda r: (int(r["tau_d"]), bool(r.get("parameter_matched")), int(r["examples"]))) \
        if tau_jsonl else []

    def pct(v: float | None, sd: float | None) -> str:
        return "-" if v is None else f"{v:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + " %"

    md = ["Time minus rate decoding (judge accuracy on the 10,000 reconstructed test digits; same encoder, "
          "rule, seeds, data order and budget; decoder hidden width 128·τ_d on both sides unless marked). "
          "`vdib-lr`: the `vdib` rule with the encoder's learning rate 10x below the decoder's.", "",
          "**Versus the training budget** (τ_d = T = 30)", "",
          "| input | rule | examples | seeds | time decoding | rate decoding | time − rate |", "|---|---|---|---|---|---|---|"]
    for r in budget:
        d = f"{r['time_minus_rate']:+.2f}" if r["time_minus_rate"] is not None else "-"
        md.append(f"| {r['encoding']} | `{r['rule']}` | {r['key'][0]} | {r['seeds']} | {pct(r['time'], r['time_std'])} | "
                  f"{pct(r['rate'], r['rate_std'])} | {d} |")
    if taus:
        md += ["", "**Versus the decoder window τ_d** (T = 30; `parameter-matched`: the time decoder's hidden layer "
               "narrowed to 473 units so that it has the rate decoder's 4.0 M weights)", "",
               "| input | rule | τ_d | decoder | examples | time decoding | rate decoding | time − rate |",
               "|---|---|---|---|---|---|---|---|"]
        rate_of = {(r["encoding"], r["rule"], r["key"][0], r["key"][2]): r["rate"] for r in taus if r["rate"] is not None}
        for r in taus:
            tau, matched, n = r["key"]
            rate = r["rate"] if r["rate"] is not None else rate_of.get((r["encoding"], r["rule"], tau, n))
            gap = r["time"] - rate if r["time"] is not None and rate is not None else None
            r["rate"], r["time_minus_rate"] = rate, gap
            md.append(f"| {r['encoding']} | `{r['rule']}` | {tau} | {'parameter-matched' if matched else 'width-matched'} "
                      f"| {n} | {pct(r['time'], None)} | {pct(rate, None)} | "
                      f"{'-' if gap is None else f'{gap:+.2f}'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_vs_rate.md").write_text("\n".join(md) + "\n")
    (out / "time_vs_rate.json").write_text(json.dumps({"budget": budget, "tau_d": taus}, indent=2) + "\n")

    fig, axes = plt.subplots(1, 2 if taus else 1, figsize=(11 if taus else 6.5, 4.0), squeeze=False)
    ax = axes[0][0]
    for i, (enc, rule) in enumerate(sorted({(r["encoding"], r["rule"]) for r in budget})):
        sel = [r for r in budget if r["encoding"] == enc and r["rule"] == rule and r["time_minus_rate"] is not None]
        if sel:
            xs = [r["key"][0] for r in sel]
            ys = [r["time_minus_rate"] for r in sel]
            err = [((r["time_std"] or 0) ** 2 + (r["rate_std"] or 0) ** 2) ** 0.5 for r in sel]
            ax.errorbar(xs, ys, yerr=err, fmt="-o" if rule == "vdib-bptt" else "--s", color=f"C{i}", capsize=3,
                        label=f"{enc} input, {rule}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training examples (log)")
    ax.set_ylabel("time − rate decoding (judge accuracy, points)")
    ax.set_title("gap versus training budget (τ_d = 30)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if taus:
        ax = axes[0][1]
        for i, enc in enumerate(sorted({r["encoding"] for r in taus})):
            sel = sorted((r for r in taus if r["encoding"] == enc and not r["key"][1] and r["time_minus_rate"] is not None),
                         key=lambda r: r["key"][0])
            ax.plot([r["key"][0] for r in sel], [r["time_minus_rate"] for r in sel], "-o", color=f"C{i}",
                    label=f"{enc} input (width-matched)")
            pm = [r for r in taus if r["encoding"] == enc and r["key"][1] and r["time_minus_rate"] is not None]
            if pm:
                ax.plot([r["key"][0] for r in pm], [r["time_minus_rate"] for r in pm], "*", ms=12, color=f"C{i}",
                        label=f"{enc} input (parameter-matched)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("decoder window τ_d (steps, T = 30)")
        ax.set_title(f"gap versus τ_d ({taus[0]['rule']}, {taus[0]['key'][2]} examples, 1 seed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_rate.png", dpi=110)
    plt.close(fig)
    return {"budget": budget, "tau_d": taus}


# --------------------------------------------------------------------------------------------
# MNIST-DVS: the bin width dt (issue #4, section 4)
# --------------------------------------------------------------------------------------------

DVS_DEFAULT = REPO / "configs" / "mnist-dvs-default.toml"
REAL_MNIST_DVS = (REPO / ".." / "shared" / "data" / "events" / "aedat2").resolve()


def dvs_dt_overrides(dt_ms: float, window_ms: float = 600.0, base: dict | None = None) -> list[str]:
    """Config overrides that rebin the default MNIST-DVS config at ``dt_ms`` with its time spans kept.

    The training window stays ``window_ms`` long (``data.crop_T = window_ms / dt``) and the
    decoder keeps seeing the same span as the default's ``tau_d`` frames at its dt
    (30 x 10 ms = 300 ms: 30, 12 and 6 frames at 10, 25 and 50 ms).
    """
    from .config import load_config

    base = base or load_config(DVS_DEFAULT)
    dt_us = round(dt_ms * 1000)
    if dt_us <= 0:
        raise ValueError(f"dt must be positive, got {dt_ms} ms")
    base_dt = int(base["data"]["dt_us"])
    span_us = int(base["model"]["tau_d"]) * base_dt
    crop = round(window_ms * 1000 / dt_us)
    tau_d = max(1, round(span_us / dt_us))
    if crop < tau_d:
        raise ValueError(f"window {window_ms} ms is shorter than the decoder span {span_us / 1000:g} ms")
    if crop * dt_us > int(base["data"]["duration_us"]):
        raise ValueError(f"window {window_ms} ms is longer than the recordings ({base['data']['duration_us'] / 1000:g} ms)")
    return [f"data.dt_us={dt_us}", f"data.crop_T={crop}", f"model.tau_d={tau_d}"]


def dvs_dt_cell_name(dt_ms: float) -> str:
    return f"dt{dt_ms:g}ms"


def dvs_dt_config(root: Path, dt_ms: float, train_digits: int, test_digits: int, examples: int, window_ms: float,
                  extra: list[str], workers: int) -> dict:
    """The resolved config of one dt cell (the default MNIST-DVS config, rebinned, saved in its run dir)."""
    from .config import load_config

    run_dir = root / dvs_dt_cell_name(dt_ms)
    over = [f'run.dir="{run_dir}"', 'run.save=""', 'run.save_dtype="float32"',
            f'run.title="mnist-dvs at dt = {dt_ms:g} ms"', f"train.examples={examples}",
            f"data.train_limit={train_digits}", f"data.test_limit={test_digits}", f"eval.limit={test_digits}",
            f"eval.final_limit={test_digits}", f"data.workers={workers}",
            f"train.eval_every={max(examples // 5, 1)}", f"train.checkpoint_every={max(examples // 10, 1)}",
            *dvs_dt_overrides(dt_ms, window_ms), *extra]
    cfg = load_config(DVS_DEFAULT, over)
    cfg["run"]["command"] = f"vdib dvs-dt (cell {dvs_dt_cell_name(dt_ms)})"
    return cfg


def presimulate(cfgs: list[dict], progress: bool = True) -> dict:
    """Simulate the training and test digits of ``cfgs`` once and bin them at every dt (fills the caches
    the trainer reads); returns the simulation's wall time."""
    import time

    from . import data as D

    d0 = cfgs[0]["data"]
    dts = [int(c["data"]["dt_us"]) for c in cfgs]
    for c in cfgs:
        d = c["data"]
        for k in ("train_limit", "test_limit", "duration_us", "simulate", "cache_dir", "mnist_dir", "dir"):
            if d[k] != d0[k]:
                raise ValueError(f"dt cells differ in data.{k}: cannot share one simulation")
    mdir = d0["mnist_dir"] or d0["dir"] or None
    kw = dict(duration_us=d0["duration_us"], cache_dir=d0["cache_dir"] or None, progress=progress,
              simulate_kwargs=d0["simulate"], workers=int(d0["workers"]))
    times = {}
    for split, seed, lim in (("train", 0, d0["train_limit"]), ("test", 10_000_000, d0["test_limit"])):
        t0 = time.perf_counter()
        imgs, labs = D.load_mnist_split(mdir, split, lim or None)
        D.simulate_mnist_dvs_sets(imgs, labs, dts, seed=seed, tag=split, **kw)
        times[split] = {"digits": int(len(imgs)), "seconds": round(time.perf_counter() - t0, 1)}
    return times


def train_dvs_dt_cell(cfg: dict, progress: bool = False) -> dict:
    """Train one dt cell: reuse its finished model when it was trained with this very config, else resume
    from its last checkpoint (or start): raising ``--examples`` or ``train.max_seconds`` continues a
    finished cell. Runs in a worker process under ``--jobs``."""
    import os

    from .state import latest_checkpoint
    from .trainer import train

    run_dir = Path(cfg["run"]["dir"])
    final = run_dir / "final" / "config.json"
    if final.is_file():
        meta = json.loads(final.read_text())
        if _same_training(meta.get("training", {}), cfg):
            return {"cell": run_dir.name, "reused": True, "pid": os.getpid()}
    s = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)
    return {"cell": run_dir.name, "reused": False, "examples": s["examples"], "train_seconds": s["train_seconds"],
            "stopped_early": s["stopped_early"], "device": s["device"], "pid": os.getpid()}


def _same_training(saved: dict, cfg: dict) -> bool:
    """Whether a saved training config equals ``cfg`` up to settings that do not change the model
    (simulation worker processes, torch threads)."""
    def norm(c: dict) -> dict:
        c = json.loads(json.dumps(c))
        for sec, key in (("data", "workers"), ("run", "threads"), ("run", "command")):
            c.get(sec, {}).pop(key, None)
        return c

    return norm(saved) == norm(cfg)


def _last_train_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for ln in path.read_text().splitlines():
        if '"kind": "train"' in ln or '"kind":"train"' in ln:
            last = ln
    try:
        return json.loads(last) if last else None
    except json.JSONDecodeError:
        return None


def run_dvs_dt_cells(cfgs: list[dict], jobs: int = 1, poll_s: float = 30.0, progress: bool = False,
                     log=print) -> list[dict]:
    """Train the dt cells, ``jobs`` at a time in separate (spawned) processes, printing a status line per
    running cell every ``poll_s`` seconds."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    results = []
    if jobs <= 1:
        for cfg in cfgs:
            log(f"[dvs-dt] training {Path(cfg['run']['dir']).name} ({cfg['train']['examples']} examples)")
            r = train_dvs_dt_cell(cfg, progress)
            log(f"[dvs-dt] done {json.dumps(r)}")
            results.append(r)
        return results
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(train_dvs_dt_cell, cfg, False): cfg for cfg in cfgs}
        log(f"[dvs-dt] training {len(cfgs)} cells, {jobs} at a time")
        pending = set(futs)
        while pending:
            done, pending = cf.wait(pending, timeout=poll_s, return_when=cf.FIRST_COMPLETED)
            for f in done:
                r = f.result()  # a failed cell raises here
                log(f"[dvs-dt] done {json.dumps(r)}")
                results.append(r)
            for f in pending:
                rec = _last_train_record(Path(futs[f]["run"]["dir"]))
                if rec:
                    log(f"[dvs-dt] {time.perf_counter() - t0:6.0f} s  {Path(futs[f]['run']['dir']).name}: "
                        f"{rec['examples']}/{futs[f]['train']['examples']} examples, {rec['seconds']:.0f} s, "
                        f"decoder loss {rec.get('decoder_loss', float('nan')):.1f}")
    order = {Path(c["run"]["dir"]).name: i for i, c in enumerate(cfgs)}
    return sorted(results, key=lambda r: order[r["cell"]])


def evaluate_dvs_dt_cell(cfg: dict, real_dir: Path | None, judge, keep: int = 8, device: str = "cpu") -> dict:
    """Judge accuracy, SSIM and MSE against the exact source digit on the simulated test digits, and the
    judge's class of each real recording in ``real_dir`` decoded as the service would."""
    import torch

    from model import load_checkpoint

    from . import data as D
    from .evaluate import decode_recording, evaluate_model, judge_label

    run_dir = Path(cfg["run"]["dir"])
    nat, meta = load_checkpoint(run_dir / "final", device=device)
    d = cfg["data"]
    imgs, labs = D.load_mnist_split(d["mnist_dir"] or d["dir"] or None, "test", d["test_limit"] or None)
    test = D.simulate_mnist_dvs_set(imgs, labs, "source", int(d["dt_us"]), int(d["duration_us"]), seed=10_000_000,
                                    cache_dir=d["cache_dir"] or None, progress=False, simulate_kwargs=d["simulate"],
                                    tag="test")
    res = evaluate_model(nat, test, judge, None, int(cfg["eval"]["batch_size"]), int(cfg["run"]["seed"]), device,
                         keep=keep)
    samples = res.pop("samples")
    m = meta.get("metrics", {})
    row = {"dt_ms": int(d["dt_us"]) / 1000, "dt_us": int(d["dt_us"]), "crop_T": int(d["crop_T"]),
           "tau_d": int(cfg["model"]["tau_d"]), "T": int(d["duration_us"]) // int(d["dt_us"]),
           "examples": m.get("examples"), "train_seconds": m.get("train_seconds"),
           "stopped_early": m.get("stopped_early"), "device": m.get("device"),
           "train_digits": meta.get("provenance", {}).get("data", {}).get("train_items"),
           **{k: res[k] for k in ("n", "judge_accuracy", "ssim", "mse", "spike_rate", "judge_accuracy_per_class")
              if k in res}}
    real = []
    if real_dir is not None and real_dir.is_dir():
        nat_cpu = nat.to("cpu")
        for path, digit, _ in D.scan_mnist_dvs(real_dir):
            final, snaps = decode_recording(nat_cpu, path, seed=0, every=max(1, round(200_000 / int(d["dt_us"]))))
            entry = {"file": path.name, "digit": digit}
            if judge is not None:
                entry["decoded_class"] = judge_label(final[None], judge)[0]
                lab = judge_label(snaps, judge) if len(snaps) else []
                entry["snapshots_correct"] = f"{sum(v == digit for v in lab)}/{len(lab)}"
            real.append(entry)
            samples.setdefault("real", []).append(final)
    row["real"] = real
    return {"row": row, "samples": {k: (torch.stack(v) if isinstance(v, list) else v) for k, v in samples.items()}}


def write_dvs_dt(rows: list[dict], samples: list[dict], out: Path, info: dict) -> None:
    """``out/dvs-dt.{json,md,png}``: the table, and a plot of judge accuracy / SSIM versus dt with a row
    of sample reconstructions per dt (targets on top; the real recordings' decodings at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "dvs-dt.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    md = ["MNIST-DVS at bin widths dt: the default MNIST-DVS configuration (`configs/mnist-dvs-default.toml`, "
          "exact-source targets, `vdib-bptt`) trained on simulated MNIST-DVS, scored against the exact source digit "
          "of the simulated test digits; real recordings decoded as the service would (judge's class).", "",
          f"Training window {info['window_ms']:g} ms; decoder span {info['decoder_span_ms']:g} ms; "
          f"{info['train_digits']} training / {info['test_digits']} test digits; command: `{info['command']}`.", "",
          "| dt (ms) | bins (2 s) | crop_T | tau_d | judge accuracy | SSIM | MSE | readout rate | examples | "
          "train s | real recordings: decoded class |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['judge_accuracy']:.2f} %" if r.get("judge_accuracy") is not None else "- (no judge)"
        real = ", ".join(f"{e['file']} ({e['digit']}) -> {e.get('decoded_class', '?')} "
                         f"[{e.get('snapshots_correct', '?')} snapshots]" for e in r["real"]) or "-"
        md.append(f"| {r['dt_ms']:g} | {r['T']} | {r['crop_T']} | {r['tau_d']} | {acc} | {r['ssim']:.3f} | "
                  f"{r['mse']:.4f} | {r['spike_rate']:.3f} | {r['examples']}{' (time budget)' if r.get('stopped_early') else ''} | "
                  f"{r['train_seconds']:.0f} | {real} |")
    if any(r.get("stopped_early") for r in rows):
        md += ["", "Cells marked by the time budget (`train.max_seconds`) stopped early, so the dts saw different "
               "numbers of examples (a coarser dt has fewer bins per window and steps faster): compare the "
               "examples column before reading the dt trend."]
    md += ["", "![judge accuracy and SSIM versus dt; sample reconstructions per dt](dvs-dt.png)"]
    if info.get("real_note"):
        md += ["", info["real_note"]]
    (out / "dvs-dt.md").write_text("\n".join(md) + "\n")

    k = max((len(s["recon"]) + len(s.get("real", [])) for s in samples), default=0)
    fig = plt.figure(figsize=(max(8.0, 1.0 * k + 1), 3.2 + 1.1 * (len(rows) + 1)))
    gs = fig.add_gridspec(len(rows) + 2, max(k, 2), height_ratios=[3.2] + [1.0] * (len(rows) + 1))
    ax = fig.add_subplot(gs[0, :])
    xs = [r["dt_ms"] for r in rows]
    if all(r.get("judge_accuracy") is not None for r in rows):
        ax.plot(xs, [100 * r["judge_accuracy"] for r in rows], "o-", label="judge accuracy (%)")
    ax.set_xlabel("bin width dt (ms)")
    ax.set_ylabel("judge accuracy (%)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ssim"] for r in rows], "s--", color="C1", label="SSIM")
    ax2.set_ylabel("SSIM vs source digit")
    ax.set_title("simulated MNIST-DVS test digits, exact source targets", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    show = [("target", samples[0]["target"] if samples else None, "source")] + [
        (f"{r['dt_ms']:g} ms", s, None) for r, s in zip(rows, samples, strict=True)]
    for i, (label, item, _) in enumerate(show):
        if item is None:
            continue
        imgs = list(item) if i == 0 else list(item["recon"]) + list(item.get("real", []))
        for j, im in enumerate(imgs[:k]):
            a = fig.add_subplot(gs[i + 1, j])
            a.imshow(im.detach().cpu().numpy().reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(label, fontsize=8)
            if i > 0 and j >= len(item["recon"]):
                e = rows[i - 1]["real"][j - len(item["recon"])]
                a.set_title(f"real {e['digit']} -> {e.get('decoded_class', '?')}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dvs-dt.png", dpi=100)
    plt.close(fig)


def dvs_dt_study(dts_ms: list[float], root: Path, out: Path, train_digits: int = 5000, test_digits: int = 1000,
                 examples: int = 150_000, window_ms: float = 600.0, extra: list[str] | None = None,
                 workers: int = 1, jobs: int = 1, real_dir: Path | None = REAL_MNIST_DVS, progress: bool = True,
                 command: str = "vdib dvs-dt", log=print) -> dict:
    """``vdib dvs-dt``: simulate once, train one default MNIST-DVS model per dt, evaluate, write results."""
    import time

    import torch

    from . import data as D
    from .judge import default_judge_dir, load_judge

    cfgs = [dvs_dt_config(root, dt, train_digits, test_digits, examples, window_ms, list(extra or []), workers)
            for dt in dts_ms]
    t0 = time.perf_counter()
    log(f"[dvs-dt] simulating {train_digits} training + {test_digits} test digits once, binned at "
        + ", ".join(f"{dt:g}" for dt in dts_ms) + f" ms, {workers} worker process(es)")
    sim_times = presimulate(cfgs, progress)
    log(f"[dvs-dt] simulation done: {json.dumps(sim_times)}")
    train_results = run_dvs_dt_cells(cfgs, jobs, progress=progress, log=log)
    jdir = default_judge_dir()
    judge = load_judge(jdir) if (jdir / "config.json").is_file() else None
    if judge is None:
        log(f"[dvs-dt] no judge at {jdir}: judge accuracy left out (vdib train-judge)")
    real_note = ""
    if real_dir is None or not real_dir.is_dir() or not D.scan_mnist_dvs(real_dir):
        real_note = f"No real MNIST-DVS recordings at {real_dir}: the real-data sanity check was skipped."
        log(f"[dvs-dt] {real_note}")
        real_dir = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, samples = [], []
    for cfg in cfgs:
        ev = evaluate_dvs_dt_cell(cfg, real_dir, judge, device=device)
        rows.append(ev["row"])
        samples.append(ev["samples"])
        r = ev["row"]
        log(f"[dvs-dt] {dvs_dt_cell_name(r['dt_ms'])}: " + json.dumps(
            {k: r[k] for k in ("judge_accuracy", "ssim", "mse", "spike_rate", "examples", "train_seconds") if k in r}
            | {"real": [(e["file"], e.get("decoded_class")) for e in r["real"]]}))
    base_span = int(cfgs[0]["model"]["tau_d"]) * int(cfgs[0]["data"]["dt_us"]) / 1000
    info = {"command": command, "window_ms": window_ms, "decoder_span_ms": base_span, "train_digits": train_digits,
            "test_digits": test_digits, "examples": examples, "simulation": sim_times, "training": train_results,
            "total_seconds": round(time.perf_counter() - t0, 1), "real_dir": str(real_dir) if real_dir else None,
            "real_note": real_note}
    write_dvs_dt(rows, samples, out, info)
    log(f"[dvs-dt] wrote {out / 'dvs-dt.md'}, {out / 'dvs-dt.json'}, {out / 'dvs-dt.png'}")
    return {**info, "rows": rows}
