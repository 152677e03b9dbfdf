"""Evaluations: reconstruct test data with a naturalizer and score it with the judge.

``judge_accuracy`` is the LeNet judge's accuracy on the reconstructions of the test items (the
paper's Table 1 metric); ``mse`` and ``ssim`` compare reconstructions with the targets (the exact
source digit, or the class prototype for real MNIST-DVS recordings); ``spike_rate`` is the mean
readout rate (spikes per neuron per step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import events
from model.batching import TorchStreams, decode_segments
from model.checkpoint import load_checkpoint
from model.naturalizer import Naturalizer

from . import data as D
from .judge import default_judge_dir, load_judge, predict
from .metrics import image_grid, ssim


class SpikeDataset(Protocol):
    def __len__(self) -> int: ...

    def batch(
        self, idx: Any, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def reconstruct(
    naturalizer: torch.nn.Module,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    return_spikes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x [T, B, N]`` and decode the final window: ``(images [B, 784], spike_rate [B])``.

    With ``return_spikes`` the second item is the readout spikes ``[T, B, n_readout]`` instead.
    """
    y, img = naturalizer(x, generator)
    img = img.reshape(img.shape[0], -1)
    return (img, y) if return_spikes else (img, y.mean((0, 2)))


@torch.no_grad()
def evaluate_model(
    naturalizer: torch.nn.Module,
    dataset: SpikeDataset,
    judge: torch.nn.Module | None,
    limit: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    keep: int = 0,
) -> dict[str, Any]:
    """Reconstruct the first ``limit`` items of ``dataset`` and score them.

    Returns ``judge_accuracy`` (when a judge is given), ``mse`` (per pixel), ``ssim``,
    ``spike_rate``, per-class judge accuracy, ``n`` and ``seconds``; with ``keep > 0`` also the
    first ``keep`` targets and reconstructions (tensors, under ``"samples"``).
    """
    naturalizer.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    preds, labels, mses, ssims, rates = [], [], [], [], []
    samples: dict[str, torch.Tensor] = {}
    for i in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch", disable=not progress):
        idx = torch.arange(i, min(i + batch_size, n))
        x, tgt, lab = dataset.batch(idx, gen, device)
        img, rate = reconstruct(naturalizer, x, gen)
        img, tgt = img.cpu().float(), tgt.cpu().float()
        mses.append(((img - tgt) ** 2).mean(1))
        ssims.append(ssim(img.view(-1, 28, 28), tgt.view(-1, 28, 28)))
        rates.append(rate.cpu())
        labels.append(lab.cpu())
        if judge is not None:
            preds.append(predict(judge, img))
        if keep and "recon" not in samples:
            samples = {
                "target": tgt[:keep].view(-1, 28, 28),
                "recon": img[:keep].view(-1, 28, 28),
                "labels": lab[:keep].cpu(),
            }
    out: dict[str, Any] = {"n": n}
    lab_all = torch.cat(labels)
    if judge is not None:
        p = torch.cat(preds)
        out["judge_accuracy"] = float((p == lab_all).float().mean())
        out["judge_accuracy_per_class"] = [
            float((p[lab_all == c] == c).float().mean()) if (lab_all == c).any() else None for c in range(10)
        ]
    out["mse"] = float(torch.cat(mses).mean())
    out["ssim"] = float(torch.cat(ssims).mean())
    out["spike_rate"] = float(torch.cat(rates).mean())
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if keep:
        out["samples"] = samples
    return out


def build_eval_dataset(
    meta: dict, data: str | Path | None, limit: int | None, progress: bool = True
) -> tuple[SpikeDataset, str]:
    """The test set a checkpoint was trained for, from its ``config.json`` training section.

    MNIST checkpoints: the 10k test digits in ``data`` (idx folder) encoded as in training.
    MNIST-DVS checkpoints: ``data`` holding ``mnist_*_scale04_*.aedat`` recordings -> the real
    test recordings (ids 901-1000; all of them when none has such an id) with prototype targets;
    otherwise the test digits of the MNIST folder ``data`` simulated with ``events.simulate_mnist_dvs``.
    """
    tcfg = meta.get("training", {})
    dcfg = tcfg.get("data", {})
    kind = dcfg.get("kind", "mnist")
    if kind == "mnist":
        imgs, labs = D.load_mnist_split(data or dcfg.get("dir") or None, "test", limit)
        return D.MnistSpikes(
            D.ImageSet.from_uint8(imgs, labs), dcfg.get("encoding", "ttfs"), int(dcfg.get("T", 30))
        ), f"MNIST test ({dcfg.get('encoding')})"
    if kind in ("simulated-mnist-dvs", "mnist-dvs"):
        dt = int(dcfg.get("dt_us", 10_000))
        dur = int(dcfg.get("duration_us", 2_000_000))
        if data is not None and D.scan_mnist_dvs(data):
            recs = D.scan_mnist_dvs(data)
            split = "test" if any(D.mnist_dvs_split_of(r[2]) == "test" for r in recs) else "all"
            return D.load_mnist_dvs(
                data, split, dt, dur, progress=progress, limit=limit
            ), f"MNIST-DVS real ({split})"
        mdir = data or dcfg.get("mnist_dir") or None
        imgs, labs = D.load_mnist_split(mdir, "test", limit)
        fs = D.simulate_mnist_dvs_set(
            imgs,
            labs,
            "source",
            dt,
            dur,
            seed=10_000_000,
            progress=progress,
            simulate_kwargs=dcfg.get("simulate") or {},
            tag="test",
        )
        return fs, "simulated MNIST-DVS test (exact source targets)"
    raise ValueError(f"cannot evaluate a checkpoint trained on {kind!r} with this command")


def write_results(
    out_dir: Path, summary: dict[str, Any], samples: dict[str, torch.Tensor] | None, title: str
) -> None:
    """``summary.json``, ``summary.md`` and ``samples.png`` (targets above reconstructions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
        elif isinstance(v, int | str):
            lines.append(f"| {k} | {v} |")
    if summary.get("judge_accuracy_per_class"):
        lines += [
            "",
            "Judge accuracy per class: "
            + ", ".join(
                f"{c}: {100 * a:.1f} %"
                for c, a in enumerate(summary["judge_accuracy_per_class"])
                if a is not None
            ),
        ]
    if samples:
        lines += ["", "![targets (top) and reconstructions (bottom)](samples.png)"]
        n_recon = samples["recon"].shape[0]
        titles = [f"target {int(v)}" for v in samples["labels"]] + ["recon"] * n_recon
        image_grid(
            torch.cat([samples["target"], samples["recon"]]), out_dir / "samples.png", rows=2, titles=titles
        )
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    judge_dir: str | Path | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """``vdib evaluate``: load a naturalizer checkpoint and the judge, evaluate, write results."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    nat, meta = load_checkpoint(checkpoint, device=dev)
    judge = load_judge(judge_dir or default_judge_dir(), device="cpu")
    ds, what = build_eval_dataset(meta, data, limit, progress)
    res = evaluate_model(nat, ds, judge, limit, batch_size, seed, dev, progress, keep=10)
    samples = res.pop("samples", None)
    summary = {"checkpoint": str(checkpoint), "data": what, **res}
    out = Path(out_dir) if out_dir else Path("results") / "evaluate" / Path(checkpoint).resolve().name
    if what.startswith("MNIST-DVS real") and data is not None:
        recs = sorted(Path(data).rglob("mnist_*_scale04_*.aedat"))
        if recs:  # the first recording decoded along its length, as the service would
            out.mkdir(parents=True, exist_ok=True)
            summary["decoded_over_time"] = {
                "recording": recs[0].name,
                "judge_classes": plot_decoded_over_time(
                    nat.to("cpu"), recs[0], judge, out / "decoded_over_time.png", seed=seed
                ),
            }
    write_results(out, summary, samples, f"Evaluation of {Path(checkpoint).name}")
    summary["results_dir"] = str(out)
    return summary


def judge_label(images: np.ndarray | torch.Tensor, judge: torch.nn.Module) -> list[int]:
    """Judge's class for each image (any of [N, 28, 28] / [N, 784], values in [0, 1])."""
    t = torch.as_tensor(images, dtype=torch.float32)
    return predict(judge, t.reshape(t.shape[0], -1)).tolist()


@torch.no_grad()
def decode_recording(
    naturalizer: Naturalizer, source: str | Path, seed: int = 0, every: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an event recording with a naturalizer as the service does (online, from its start).

    The recording is binned with the checkpoint's preprocessing (ROI, ``dt_us``, polarity,
    presence; ``t0`` = its first event; every bin stepped) by :class:`events.Binner` and decoded
    by :func:`model.batching.decode_segments`, the function service uploads run through, with a
    generator seeded ``seed``. Returns ``(final_image [28, 28], images [k, 28, 28])`` where
    ``images`` holds the decodings after every ``every`` steps (empty when ``every`` = 0).
    """
    cfg = naturalizer.config
    pre = cfg.preprocessing
    rec = events.read(source)
    roi = events.ROI(*pre.get("roi", list(events.MNIST_DVS.roi)))
    spec = events.BinSpec(roi, int(cfg.dt_us), cfg.polarity, cfg.mode, int(pre.get("pool", 1)))
    binner = events.Binner(spec, max_gap_us=None)
    segments = binner.push(rec.events) + binner.flush()
    streams = TorchStreams(naturalizer)
    out = decode_segments(
        streams, segments, torch.Generator().manual_seed(seed), every or None, dt_us=spec.dt_us
    )
    if len(out.spikes) == 0:  # nothing to step: the decoding of an empty window
        empty = np.zeros((1, streams.tau_d, streams.n_readout), np.float32)
        return torch.from_numpy(streams.decode(empty)).reshape(28, 28), torch.zeros(0, 28, 28)
    images = torch.from_numpy(out.images).reshape(-1, 28, 28)
    # frames come after every ``every``-th step, then after the last step when it is not one of them
    return images[-1], images[: len(out.spikes) // every if every else 0]


def plot_decoded_over_time(
    naturalizer: Naturalizer,
    source: str | Path,
    judge: torch.nn.Module,
    out_png: str | Path,
    every_ms: float = 200.0,
    seed: int = 0,
) -> list[int]:
    """Decode ``source`` online (:func:`decode_recording`) and save the summed input frame, a
    snapshot every ``every_ms`` and the final image, each titled with the judge's class.

    Returns the judge's classes of the snapshots followed by the final one."""
    cfg = naturalizer.config
    every = max(1, round(every_ms * 1000 / int(cfg.dt_us)))
    final, snaps = decode_recording(naturalizer, source, seed=seed, every=every)
    images = [*snaps, final]
    labels = judge_label(torch.stack(images), judge)
    pre = cfg.preprocessing
    rec = events.read(source)
    roi = events.ROI(*pre.get("roi", list(events.MNIST_DVS.roi)))
    summed = events.bin_events(
        rec.events,
        roi,
        int(cfg.dt_us),
        None,
        None,
        polarity=cfg.polarity,
        mode=cfg.mode,
        pool=int(pre.get("pool", 1)),
    ).sum(axis=(0, 1))
    n = len(images) + 1
    cols = min(n, 7)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    panels = (
        [(summed, "input (sum)")]
        + [
            (img.numpy(), f"{(i + 1) * every * int(cfg.dt_us) / 1000:.0f} ms: {lab}")
            for i, (img, lab) in enumerate(zip(snaps, labels[:-1], strict=True))
        ]
        + [(final.numpy(), f"final: {labels[-1]}")]
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(img, cmap="gray")
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{Path(source).name} decoded online (judge's class per snapshot)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return labels
