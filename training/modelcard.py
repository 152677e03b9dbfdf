"""Model cards (README.md) for naturalizer checkpoints, written from their config.json."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_model_card(ckpt_dir: str | Path, title: str | None = None, notes: str = "") -> Path:
    """Write ``ckpt_dir/README.md``: data, rule, model config, metrics, training time, hardware."""
    d = Path(ckpt_dir)
    meta = json.loads((d / "config.json").read_text())
    m, t, met, prov = (
        meta["model"],
        meta.get("training", {}),
        meta.get("metrics", {}),
        meta.get("provenance", {}),
    )
    data, rule, train = t.get("data", {}), t.get("rule", {}), t.get("train", {})
    enc = m["encoder"]
    size_mb = sum(p.stat().st_size for p in d.iterdir() if p.is_file()) / 1e6
    if data.get("kind") == "mnist":
        data_line = (
            f"MNIST digits ({prov.get('data', {}).get('train_items', '?')} training digits), "
            f"{data.get('encoding')} encoding, T = {data.get('T')} steps"
        )
    else:
        data_line = (
            f"{data.get('kind')} ({prov.get('data', {}).get('train_items', '?')} training digits), "
            f"target = {data.get('target')}, dt = {data.get('dt_us')} µs, "
            f"{data.get('duration_us', 0) / 1e6:g} s per recording, training windows of "
            f"{data.get('crop_T') or 'all'} bins"
        )
    lines = [
        f"# {title or d.name}",
        "",
        notes.strip(),
        "",
        "## Model",
        f"- Encoder SNN: {enc['n_inputs']} inputs (frame {tuple(m['input_shape'])}) -> hidden {enc['hidden']} "
        f"(deterministic LIF) -> {enc['n_readout']} stochastic SRM readouts; τ_e = {enc['tau_e']}, "
        f"{enc['n_basis']} raised-cosine bases, prior rate r = {enc['prior_rate']}.",
        f"- Decoder: `{m['decoder']}` over the last τ_d = {m['tau_d']} readout frames "
        f"(options {m.get('decoder_options') or '{}'}), output {tuple(m['image_shape'])} in [0, 1].",
        f"- Input preprocessing (stored in `config.json` → `model.preprocessing`): "
        f"`{json.dumps(m.get('preprocessing', {}))}`; dt_us = {m['dt_us']}, polarity = {m['polarity']}, "
        f"mode = {m['mode']}.",
        f"- Files: `weights.safetensors` + `config.json` ({size_mb:.1f} MB); load with `model.load_checkpoint`.",
        "",
        "## Training",
        f"- Data: {data_line}.",
        f"- Rule: `{rule.get('name')}` (lr {rule.get('lr')}, β {rule.get('beta')}, options "
        f"{rule.get('options') or '{}'}), hidden init `{t.get('model', {}).get('hidden_init')}`"
        + (f" (scale {prov['hidden_init_scale']:.3g})" if "hidden_init_scale" in prov else "")
        + ".",
        f"- Batch {train.get('batch_size')}, {met.get('examples', '?')} training examples "
        f"({met.get('steps', '?')} steps), seed {t.get('run', {}).get('seed')}.",
        f"- Training time: {met.get('train_seconds', '?')} s on {prov.get('hardware', '?')}"
        + (" (stopped at the time limit)" if met.get("stopped_early") else "")
        + ".",
        "",
        "## Metrics (test set)",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ("judge_accuracy", "mse", "ssim", "spike_rate", "n"):
        if k in met:
            lines.append(f"| {k} | {_fmt(met[k])} |")
    lines += [
        "",
        "`judge_accuracy`: the LeNet-5 judge (checkpoints/judge) on the reconstructions; `mse`, "
        "`ssim`: against the target images; `spike_rate`: readout spikes per neuron per step.",
        "",
    ]
    cmd = prov.get("command")
    if cmd:
        lines += ["## Reproduce", "```", cmd, "```", ""]
    (d / "README.md").write_text("\n".join(lines))
    return d / "README.md"
