"""Tables and plots of the studies: each ``write_*`` takes a study's rows (plain JSON data) and
writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out``.

Figures use matplotlib's object-oriented API (``matplotlib.figure.Figure``), so no pyplot state or
GUI backend is involved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .common import write_json

__all__ = [
    "plot_tsne",
    "write_ablation",
    "write_dvs_dt",
    "write_predictive",
    "write_table1",
    "write_time_vs_rate",
]

Row = dict[str, Any]


def _write_md(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ Table 1


def write_table1(rows: list[Row], paper: dict[str, tuple[float, float]], out: Path) -> None:
    """``table1.{json,md,png}``: our accuracy per cell (mean ± std over seeds) next to the paper's."""
    write_json(out / "table1.json", {"rows": rows, "paper": paper})
    lines = [
        "| input | decoding | rule | judge accuracy (ours) | paper, same cell (200k examples, 3 seeds) | MSE | SSIM | "
        "readout rate | examples | train digits | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        std = f" ± {r['judge_accuracy_std']:.2f}" if r["judge_accuracy_std"] is not None else ""
        pp = f"{r['paper'][0]:.2f} ± {r['paper'][1]:.2f} %" if r["paper"] else "-"
        lines.append(
            f"| {r['encoding']} | {r['decoding']} | `{r['rule']}` | {r['judge_accuracy_mean']:.2f}{std} % "
            f"(seeds {','.join(map(str, r['seeds']))}) | {pp} | {r['mse']:.4f} | {r['ssim']:.3f} | "
            f"{r['spike_rate']:.3f} | {r['examples']} | {r['train_items']} | {r['train_seconds']:.0f} |"
        )
    _write_md(out / "table1.md", lines)
    if not rows:
        return
    fig = Figure(figsize=(8, 4.0))
    ax = fig.subplots()
    labels, ours, ours_sd, papers, papers_sd = [], [], [], [], []
    for r in rows:
        labels.append(f"{r['encoding']}\n{r['decoding']}\n{r['rule']}")
        ours.append(r["judge_accuracy_mean"])
        ours_sd.append(r["judge_accuracy_std"] or 0.0)
        papers.append(r["paper"][0] if r["paper"] else math.nan)
        papers_sd.append(r["paper"][1] if r["paper"] else 0.0)
    xs = np.arange(len(rows))
    seeds = max(len(r["seeds"]) for r in rows)
    b1 = ax.bar(
        xs - 0.2, ours, 0.4, yerr=ours_sd, capsize=3, label=f"ours ({seeds} seed{'s' if seeds > 1 else ''})"
    )
    b2 = ax.bar(
        xs + 0.2, papers, 0.4, yerr=papers_sd, capsize=3, label="paper (VDIB rule, 200k examples, 3 seeds)"
    )
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


# ------------------------------------------------------------------------- predictive coding


def write_predictive(res: dict[str, Any], out: Path, name: str = "predictive") -> None:
    """``<name>.{json,md,png}``: accuracy / MSE versus lag δ and readout rate / accuracy versus β."""
    lag_rows, beta_rows, beta_lag = res["lags"], res["betas"], res["beta_lag"]
    write_json(out / f"{name}.json", res)
    md = ["| lag δ | accuracy | MSE | readout rate | train s |", "|---|---|---|---|---|"]
    md += [
        f"| {r['lag']} | {100 * r['accuracy']:.1f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} | {r['train_seconds']} |"
        for r in lag_rows
    ]
    md += ["", f"| β (δ = {beta_lag}) | accuracy | MSE | readout rate |", "|---|---|---|---|"]
    md += [
        f"| {r['beta']} | {100 * r['accuracy']:.1f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} |"
        for r in beta_rows
    ]
    _write_md(out / f"{name}.md", md)
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    if lag_rows:
        ax = axes[0]
        ax.plot(
            [r["lag"] for r in lag_rows], [100 * r["accuracy"] for r in lag_rows], "o-", label="accuracy (%)"
        )
        ax.set_xlabel("target lag δ")
        ax.set_ylabel("accuracy (%)")
        ax2 = ax.twinx()
        ax2.plot([r["lag"] for r in lag_rows], [r["mse"] for r in lag_rows], "s--", color="C1", label="MSE")
        ax2.set_ylabel("MSE")
        ax.set_title("accuracy / MSE vs lag (β = 1)")
    if beta_rows:
        ax = axes[1]
        ax.semilogx(
            [r["beta"] for r in beta_rows], [r["spike_rate"] for r in beta_rows], "o-", label="readout rate"
        )
        ax.set_xlabel("β")
        ax.set_ylabel("readout spike rate")
        ax2 = ax.twinx()
        ax2.semilogx(
            [r["beta"] for r in beta_rows], [100 * r["accuracy"] for r in beta_rows], "s--", color="C1"
        )
        ax2.set_ylabel("accuracy (%)")
        ax.set_title(f"rate / accuracy vs β (δ = {beta_lag})")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


# ----------------------------------------------------------------------------------- t-SNE


def plot_tsne(panels: list[Row], out_png: Path) -> None:
    """One scatter per model: ``panels`` of ``{"label", "embedding" [n, 2], "labels" [n], "silhouette"}``."""
    fig = Figure(figsize=(4.2 * len(panels), 4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    sc = None
    for ax, p in zip(axes, panels, strict=True):
        emb = np.asarray(p["embedding"])
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=np.asarray(p["labels"]), cmap="tab10", s=4)
        ax.set_title(f"{p['label']}\nsilhouette {p['silhouette']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if sc is not None:
        fig.colorbar(sc, ax=list(axes), ticks=range(10), fraction=0.03)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)


# -------------------------------------------------------------------------------- ablation


def write_ablation(rows: list[Row], info: dict[str, Any], out: Path) -> None:
    """``ablation.{json,md}``: one row per variant of the ``vdib`` rule."""
    write_json(
        out / "ablation.json", {"encoding": info["encoding"], "decoding": info["decoding"], "rows": rows}
    )
    md = [
        f"`vdib` rule ablation ({info['encoding']} input, {info['decoding']} decoding, {info['examples']} "
        f"examples, seed {info['seed']})",
        "",
        "| variant | judge accuracy | MSE | readout rate | train time (s) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['variant']} | {100 * r['judge_accuracy']:.2f} % | {r['mse']:.4f} | {r['spike_rate']:.3f} | "
        f"{r['train_seconds']:.0f} |"
        for r in rows
    ]
    _write_md(out / "ablation.md", md)


# --------------------------------------------------------------------------- time vs rate


def _pct(v: float | None, sd: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + " %"


def write_time_vs_rate(budget: list[Row], taus: list[Row], out: Path) -> None:
    """``time_vs_rate.{md,json,png}``: the time − rate gap versus the budget and versus τ_d."""
    md = [
        "Time minus rate decoding (judge accuracy on the 10,000 reconstructed test digits; same encoder, "
        "rule, seeds, data order and budget; decoder hidden width 128·τ_d on both sides unless marked). "
        "`vdib-lr`: the `vdib` rule with the encoder's learning rate 10x below the decoder's.",
        "",
        "**Versus the training budget** (τ_d = T = 30)",
        "",
        "| input | rule | examples | seeds | time decoding | rate decoding | time − rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in budget:
        d = f"{r['time_minus_rate']:+.2f}" if r["time_minus_rate"] is not None else "-"
        md.append(
            f"| {r['encoding']} | `{r['rule']}` | {r['key'][0]} | {r['seeds']} | {_pct(r['time'], r['time_std'])} | "
            f"{_pct(r['rate'], r['rate_std'])} | {d} |"
        )
    if taus:
        md += [
            "",
            "**Versus the decoder window τ_d** (T = 30; `parameter-matched`: the time decoder's hidden layer "
            "narrowed to 473 units so that it has the rate decoder's 4.0 M weights)",
            "",
            "| input | rule | τ_d | decoder | examples | time decoding | rate decoding | time − rate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in taus:
            tau, matched, n = r["key"]
            gap = r["time_minus_rate"]
            md.append(
                f"| {r['encoding']} | `{r['rule']}` | {tau} | {'parameter-matched' if matched else 'width-matched'} "
                f"| {n} | {_pct(r['time'], None)} | {_pct(r['rate'], None)} | "
                f"{'-' if gap is None else f'{gap:+.2f}'} |"
            )
    _write_md(out / "time_vs_rate.md", md)
    write_json(out / "time_vs_rate.json", {"budget": budget, "tau_d": taus})

    fig = Figure(figsize=(11 if taus else 6.5, 4.0))
    axes = fig.subplots(1, 2 if taus else 1, squeeze=False)
    ax = axes[0][0]
    for i, (enc, rule) in enumerate(sorted({(r["encoding"], r["rule"]) for r in budget})):
        sel = [
            r
            for r in budget
            if r["encoding"] == enc and r["rule"] == rule and r["time_minus_rate"] is not None
        ]
        if sel:
            xs = [r["key"][0] for r in sel]
            ys = [r["time_minus_rate"] for r in sel]
            err = [((r["time_std"] or 0) ** 2 + (r["rate_std"] or 0) ** 2) ** 0.5 for r in sel]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt="-o" if rule == "vdib-bptt" else "--s",
                color=f"C{i}",
                capsize=3,
                label=f"{enc} input, {rule}",
            )
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
            sel = sorted(
                (
                    r
                    for r in taus
                    if r["encoding"] == enc and not r["key"][1] and r["time_minus_rate"] is not None
                ),
                key=lambda r: r["key"][0],
            )
            ax.plot(
                [r["key"][0] for r in sel],
                [r["time_minus_rate"] for r in sel],
                "-o",
                color=f"C{i}",
                label=f"{enc} input (width-matched)",
            )
            pm = [
                r for r in taus if r["encoding"] == enc and r["key"][1] and r["time_minus_rate"] is not None
            ]
            if pm:
                ax.plot(
                    [r["key"][0] for r in pm],
                    [r["time_minus_rate"] for r in pm],
                    "*",
                    ms=12,
                    color=f"C{i}",
                    label=f"{enc} input (parameter-matched)",
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("decoder window τ_d (steps, T = 30)")
        ax.set_title(f"gap versus τ_d ({taus[0]['rule']}, {taus[0]['key'][2]} examples, 1 seed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_rate.png", dpi=110)


# ----------------------------------------------------------------------------- MNIST-DVS dt


def write_dvs_dt(
    rows: list[Row], samples: list[dict[str, torch.Tensor]], out: Path, info: dict[str, Any]
) -> None:
    """``dvs-dt.{json,md,png}``: the table, and a plot of judge accuracy / SSIM versus dt with a row
    of sample reconstructions per dt (targets on top; the real recordings' decodings at the right)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "dvs-dt.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    md = [
        "MNIST-DVS at bin widths dt: the default MNIST-DVS configuration (`configs/mnist-dvs-default.toml`, "
        "exact-source targets, `vdib-bptt`) trained on simulated MNIST-DVS, scored against the exact source digit "
        "of the simulated test digits; real recordings decoded as the service would (judge's class).",
        "",
        f"Training window {info['window_ms']:g} ms; decoder span {info['decoder_span_ms']:g} ms; "
        f"{info['train_digits']} training / {info['test_digits']} test digits; command: `{info['command']}`.",
        "",
        "| dt (ms) | bins (2 s) | crop_T | tau_d | judge accuracy | SSIM | MSE | readout rate | examples | "
        "train s | real recordings: decoded class |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{100 * r['judge_accuracy']:.2f} %" if r.get("judge_accuracy") is not None else "- (no judge)"
        real = (
            ", ".join(
                f"{e['file']} ({e['digit']}) -> {e.get('decoded_class', '?')} "
                f"[{e.get('snapshots_correct', '?')} snapshots]"
                for e in r["real"]
            )
            or "-"
        )
        md.append(
            f"| {r['dt_ms']:g} | {r['T']} | {r['crop_T']} | {r['tau_d']} | {acc} | {r['ssim']:.3f} | "
            f"{r['mse']:.4f} | {r['spike_rate']:.3f} | {r['examples']}{' (time budget)' if r.get('stopped_early') else ''} | "
            f"{r['train_seconds']:.0f} | {real} |"
        )
    if any(r.get("stopped_early") for r in rows):
        md += [
            "",
            "Cells marked by the time budget (`train.max_seconds`) stopped early, so the dts saw different "
            "numbers of examples (a coarser dt has fewer bins per window and steps faster): compare the "
            "examples column before reading the dt trend.",
        ]
    md += ["", "![judge accuracy and SSIM versus dt; sample reconstructions per dt](dvs-dt.png)"]
    if info.get("real_note"):
        md += ["", info["real_note"]]
    _write_md(out / "dvs-dt.md", md)

    k = max((len(s["recon"]) + len(s.get("real", [])) for s in samples), default=0)
    fig = Figure(figsize=(max(8.0, 1.0 * k + 1), 3.2 + 1.1 * (len(rows) + 1)))
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
    show: list[tuple[str, Any]] = [("target", samples[0]["target"] if samples else None)] + [
        (f"{r['dt_ms']:g} ms", s) for r, s in zip(rows, samples, strict=True)
    ]
    for i, (label, item) in enumerate(show):
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
