"""MNIST-DVS at other bin widths dt: the default MNIST-DVS config rebinned, one model per dt.

``vdib dvs-dt [--dts 10 25 50] [--jobs N] [--root DIR] [--out DIR]``: simulates the digits once
and bins them at every dt, trains one cell per dt under ``--root`` (default ``runs/dvs-dt``),
evaluates it on the simulated test digits and the real recordings, and writes
``dvs-dt.{json,md,png}`` to ``--out`` (default: the root).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model import load_checkpoint

from .. import data as D
from ..config import TrainingConfig, load_config
from ..evaluate import decode_recording, evaluate_model, judge_label
from ..judge import default_judge_dir, load_judge
from ..metrics import last_record
from ..state import latest_checkpoint
from ..trainer import train
from . import report
from .common import REPO, write_cell

__all__ = [
    "DVS_DEFAULT",
    "REAL_MNIST_DVS",
    "dvs_dt_cell_name",
    "dvs_dt_config",
    "dvs_dt_overrides",
    "dvs_dt_study",
    "evaluate_dvs_dt_cell",
    "presimulate",
    "run_dvs_dt_cells",
    "train_dvs_dt_cell",
]

DVS_DEFAULT = REPO / "configs" / "mnist-dvs-default.toml"
REAL_MNIST_DVS = (REPO / ".." / "shared" / "data" / "events" / "aedat2").resolve()

Log = Callable[[str], None]


def dvs_dt_overrides(dt_ms: float, window_ms: float = 600.0, base: TrainingConfig | None = None) -> list[str]:
    """Config overrides that rebin the default MNIST-DVS config at ``dt_ms`` with its time spans kept.

    The training window stays ``window_ms`` long (``data.crop_T = window_ms / dt``) and the
    decoder keeps seeing the same span as the default's ``tau_d`` frames at its dt
    (30 x 10 ms = 300 ms: 30, 12 and 6 frames at 10, 25 and 50 ms).
    """
    base = base or load_config(DVS_DEFAULT)
    dt_us = round(dt_ms * 1000)
    if dt_us <= 0:
        raise ValueError(f"dt must be positive, got {dt_ms} ms")
    span_us = base.model.tau_d * base.data.dt_us
    crop = round(window_ms * 1000 / dt_us)
    tau_d = max(1, round(span_us / dt_us))
    if crop < tau_d:
        raise ValueError(f"window {window_ms} ms is shorter than the decoder span {span_us / 1000:g} ms")
    if crop * dt_us > base.data.duration_us:
        raise ValueError(
            f"window {window_ms} ms is longer than the recordings ({base.data.duration_us / 1000:g} ms)"
        )
    return [f"data.dt_us={dt_us}", f"data.crop_T={crop}", f"model.tau_d={tau_d}"]


def dvs_dt_cell_name(dt_ms: float) -> str:
    return f"dt{dt_ms:g}ms"


def dvs_dt_config(
    root: Path,
    dt_ms: float,
    train_digits: int,
    test_digits: int,
    examples: int,
    window_ms: float,
    extra: list[str],
    workers: int,
) -> TrainingConfig:
    """The resolved config of one dt cell (the default MNIST-DVS config, rebinned, saved in its run dir)."""
    run_dir = root / dvs_dt_cell_name(dt_ms)
    over = [
        f'run.dir="{run_dir}"',
        'run.save=""',
        'run.save_dtype="float32"',
        f'run.title="mnist-dvs at dt = {dt_ms:g} ms"',
        f"train.examples={examples}",
        f"data.train_limit={train_digits}",
        f"data.test_limit={test_digits}",
        f"eval.limit={test_digits}",
        f"eval.final_limit={test_digits}",
        f"data.workers={workers}",
        f"train.eval_every={max(examples // 5, 1)}",
        f"train.checkpoint_every={max(examples // 10, 1)}",
        *dvs_dt_overrides(dt_ms, window_ms),
        *extra,
    ]
    cfg = load_config(DVS_DEFAULT, over)
    cfg.run.command = f"vdib dvs-dt (cell {dvs_dt_cell_name(dt_ms)})"
    return cfg


_SHARED_DATA_KEYS = ("train_limit", "test_limit", "duration_us", "simulate", "cache_dir", "mnist_dir", "dir")


def presimulate(cfgs: list[TrainingConfig], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Simulate the training and test digits of ``cfgs`` once and bin them at every dt (fills the caches
    the trainer reads); returns the simulation's wall time."""
    d0 = cfgs[0].data
    dts = [c.data.dt_us for c in cfgs]
    for c in cfgs:
        for k in _SHARED_DATA_KEYS:
            if getattr(c.data, k) != getattr(d0, k):
                raise ValueError(f"dt cells differ in data.{k}: cannot share one simulation")
    mdir = d0.mnist_dir or d0.dir or None
    times = {}
    for split, seed, lim in (("train", 0, d0.train_limit), ("test", 10_000_000, d0.test_limit)):
        t0 = time.perf_counter()
        imgs, labs = D.load_mnist_split(mdir, split, lim or None)
        D.simulate_mnist_dvs_sets(
            imgs,
            labs,
            dts,
            seed=seed,
            tag=split,
            duration_us=d0.duration_us,
            cache_dir=d0.cache_dir or None,
            progress=progress,
            simulate_kwargs=d0.simulate,
            workers=d0.workers,
        )
        times[split] = {"digits": int(len(imgs)), "seconds": round(time.perf_counter() - t0, 1)}
    return times


def _same_training(saved: dict[str, Any], cfg: TrainingConfig) -> bool:
    """Whether a saved training config equals ``cfg`` up to settings that do not change the model
    (simulation worker processes, torch threads, the command line)."""

    def norm(c: dict[str, Any]) -> dict[str, Any]:
        c = json.loads(json.dumps(c))
        for sec, key in (("data", "workers"), ("run", "threads"), ("run", "command")):
            c.get(sec, {}).pop(key, None)
        return c

    return norm(saved) == norm(cfg.to_dict())


def train_dvs_dt_cell(cfg: TrainingConfig, progress: bool = False) -> dict[str, Any]:
    """Train one dt cell: reuse its finished model when it was trained with this very config, else resume
    from its last checkpoint (or start): raising ``--examples`` or ``train.max_seconds`` continues a
    finished cell. Runs in a worker process under ``--jobs``."""
    run_dir = Path(cfg.run.dir)
    record = {
        "study": "dvs-dt",
        "cell": run_dir.name,
        "dt_us": cfg.data.dt_us,
        "crop_T": cfg.data.crop_T,
        "tau_d": cfg.model.tau_d,
    }
    final = run_dir / "final" / "config.json"
    if final.is_file():
        meta = json.loads(final.read_text())
        if _same_training(meta.get("training", {}), cfg):
            return {**record, "reused": True, "pid": os.getpid()}
    write_cell(run_dir, record)
    s = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress)
    return {
        **record,
        "reused": False,
        "examples": s["examples"],
        "train_seconds": s["train_seconds"],
        "stopped_early": s["stopped_early"],
        "device": s["device"],
        "pid": os.getpid(),
    }


def run_dvs_dt_cells(
    cfgs: list[TrainingConfig], jobs: int = 1, poll_s: float = 30.0, progress: bool = False, log: Log = print
) -> list[dict[str, Any]]:
    """Train the dt cells, ``jobs`` at a time in separate (spawned) processes, printing a status line per
    running cell every ``poll_s`` seconds."""
    results = []
    if jobs <= 1:
        for cfg in cfgs:
            log(f"[dvs-dt] training {Path(cfg.run.dir).name} ({cfg.train.examples} examples)")
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
                cfg = futs[f]
                rec = last_record(Path(cfg.run.dir) / "metrics.jsonl", "train")
                if rec:
                    log(
                        f"[dvs-dt] {time.perf_counter() - t0:6.0f} s  {Path(cfg.run.dir).name}: "
                        f"{rec['examples']}/{cfg.train.examples} examples, {rec['seconds']:.0f} s, "
                        f"decoder loss {rec.get('decoder_loss', float('nan')):.1f}"
                    )
    order = {c.data.dt_us: i for i, c in enumerate(cfgs)}
    return sorted(results, key=lambda r: order[r["dt_us"]])


def evaluate_dvs_dt_cell(
    cfg: TrainingConfig,
    real_dir: Path | None,
    judge: torch.nn.Module | None,
    keep: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Judge accuracy, SSIM and MSE against the exact source digit on the simulated test digits, and the
    judge's class of each real recording in ``real_dir`` decoded as the service would."""
    run_dir = Path(cfg.run.dir)
    nat, meta = load_checkpoint(run_dir / "final", device=device)
    d = cfg.data
    imgs, labs = D.load_mnist_split(d.mnist_dir or d.dir or None, "test", d.test_limit or None)
    test = D.simulate_mnist_dvs_set(
        imgs,
        labs,
        "source",
        d.dt_us,
        d.duration_us,
        seed=10_000_000,
        cache_dir=d.cache_dir or None,
        progress=False,
        simulate_kwargs=d.simulate,
        tag="test",
    )
    res = evaluate_model(nat, test, judge, None, cfg.eval.batch_size, cfg.run.seed, device, keep=keep)
    samples = res.pop("samples")
    m = meta.get("metrics", {})
    row: dict[str, Any] = {
        "dt_ms": d.dt_us / 1000,
        "dt_us": d.dt_us,
        "crop_T": d.crop_T,
        "tau_d": cfg.model.tau_d,
        "T": d.duration_us // d.dt_us,
        "examples": m.get("examples"),
        "train_seconds": m.get("train_seconds"),
        "stopped_early": m.get("stopped_early"),
        "device": m.get("device"),
        "train_digits": meta.get("provenance", {}).get("data", {}).get("train_items"),
        **{
            k: res[k]
            for k in ("n", "judge_accuracy", "ssim", "mse", "spike_rate", "judge_accuracy_per_class")
            if k in res
        },
    }
    real = []
    if real_dir is not None and real_dir.is_dir():
        nat_cpu = nat.to("cpu")
        for path, digit, _ in D.scan_mnist_dvs(real_dir):
            final, snaps = decode_recording(nat_cpu, path, seed=0, every=max(1, round(200_000 / d.dt_us)))
            entry: dict[str, Any] = {"file": path.name, "digit": digit}
            if judge is not None:
                entry["decoded_class"] = judge_label(final[None], judge)[0]
                lab = judge_label(snaps, judge) if len(snaps) else []
                entry["snapshots_correct"] = f"{sum(v == digit for v in lab)}/{len(lab)}"
            real.append(entry)
            samples.setdefault("real", []).append(final)
    row["real"] = real
    return {
        "row": row,
        "samples": {k: (torch.stack(v) if isinstance(v, list) else v) for k, v in samples.items()},
    }


def dvs_dt_study(
    dts_ms: list[float],
    root: Path,
    out: Path,
    train_digits: int = 5000,
    test_digits: int = 1000,
    examples: int = 150_000,
    window_ms: float = 600.0,
    extra: list[str] | None = None,
    workers: int = 1,
    jobs: int = 1,
    real_dir: Path | None = REAL_MNIST_DVS,
    progress: bool = True,
    command: str = "vdib dvs-dt",
    log: Log = print,
) -> dict[str, Any]:
    """``vdib dvs-dt``: simulate once, train one default MNIST-DVS model per dt, evaluate, write results."""
    cfgs = [
        dvs_dt_config(root, dt, train_digits, test_digits, examples, window_ms, list(extra or []), workers)
        for dt in dts_ms
    ]
    t0 = time.perf_counter()
    log(
        f"[dvs-dt] simulating {train_digits} training + {test_digits} test digits once, binned at "
        + ", ".join(f"{dt:g}" for dt in dts_ms)
        + f" ms, {workers} worker process(es)"
    )
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
        log(
            f"[dvs-dt] {dvs_dt_cell_name(r['dt_ms'])}: "
            + json.dumps(
                {
                    k: r[k]
                    for k in ("judge_accuracy", "ssim", "mse", "spike_rate", "examples", "train_seconds")
                    if k in r
                }
                | {"real": [(e["file"], e.get("decoded_class")) for e in r["real"]]}
            )
        )
    base_span = cfgs[0].model.tau_d * cfgs[0].data.dt_us / 1000
    info = {
        "command": command,
        "window_ms": window_ms,
        "decoder_span_ms": base_span,
        "train_digits": train_digits,
        "test_digits": test_digits,
        "examples": examples,
        "simulation": sim_times,
        "training": train_results,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "real_dir": str(real_dir) if real_dir else None,
        "real_note": real_note,
    }
    report.write_dvs_dt(rows, samples, out, info)
    log(f"[dvs-dt] wrote {out / 'dvs-dt.md'}, {out / 'dvs-dt.json'}, {out / 'dvs-dt.png'}")
    return {**info, "rows": rows}
