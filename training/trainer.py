"""The trainer: ``vdib train CONFIG.toml`` — data, model, rule, loop, checkpoints, resume, DDP.

One step takes a *global* batch of ``train.batch_size`` examples. Every rank draws the inputs
and the readout's uniforms for the whole global batch from the same seeded generator and keeps
its own slice, so a run on W ranks sees exactly the numbers a single process sees; the rule's
all-reduce hook sums the per-sample learning-signal terms and the gradients across ranks, so
every rank applies the same update (checked by tests/training/test_trainer.py on 2 CPU ranks).

The run directory holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (``kind`` =
"train" every ``log_every`` steps, "eval" at each evaluation), ``loss.png``,
``spike_rate.png``, ``eval.png``, ``checkpoints/step-<n>/`` (the model as
``model.save_checkpoint`` writes it + the rule/optimizer/RNG state) and ``final/`` (the model
only, ready for ``vdib evaluate`` or the service).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

import events
from model.checkpoint import load_checkpoint, save_checkpoint
from model.encoder import EncoderConfig
from model.naturalizer import Naturalizer, NaturalizerConfig
from model.rules import Rule, calibrate_hidden_init
from model.rules import build_rule as model_build_rule

from . import data as D
from .config import TrainingConfig, load_config, to_toml
from .evaluate import SpikeDataset, evaluate_model
from .judge import default_judge_dir, hardware_string, load_judge
from .metrics import MetricsLog, plot_run
from .modelcard import write_model_card
from .state import (
    latest_checkpoint,
    load_train_state,
    rng_state,
    save_train_state,
    save_training_checkpoint,
    set_rng_state,
)

__all__ = ["Dist", "TrainingConfig", "build_datasets", "build_naturalizer", "load_config", "train"]


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Rank / world size and the all-reduce used by the rule (identity on one process)."""

    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (returns it)."""
        if self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` (or a test's spawn) describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    here = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        here = True
    return Dist(tdist.get_rank(), tdist.get_world_size(), here)


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA (this rank's ``LOCAL_RANK`` GPU) when present, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------


@dataclass
class Datasets:
    train: SpikeDataset
    test: SpikeDataset
    n_inputs: int
    input_shape: tuple[int, int, int]
    T: int
    info: dict[str, Any] = field(default_factory=dict)


def build_datasets(cfg: TrainingConfig, progress: bool = True) -> Datasets:
    """Training and test sets of ``cfg.data`` (see :class:`training.config.DataConfig`)."""
    d = cfg.data
    lim_tr, lim_te = d.train_limit or None, d.test_limit or None
    if d.kind == "mnist":
        tr = D.load_mnist_split(d.dir or None, "train", lim_tr)
        te = D.load_mnist_split(d.dir or None, "test", lim_te)
        mtrain = D.MnistSpikes(D.ImageSet.from_uint8(*tr), d.encoding, d.T)
        mtest = D.MnistSpikes(D.ImageSet.from_uint8(*te), d.encoding, d.T)
        return Datasets(
            mtrain, mtest, 784, (1, 28, 28), d.T, {"train_items": len(mtrain), "test_items": len(mtest)}
        )
    if d.kind == "simulated-mnist-dvs":
        mdir = d.mnist_dir or d.dir or None

        def simulated(split: str, limit: int | None, target: str, seed: int) -> D.FrameSet:
            images, labels = D.load_mnist_split(mdir, split, limit)
            return D.simulate_mnist_dvs_set(
                images,
                labels,
                target,
                d.dt_us,
                d.duration_us,
                seed,
                d.cache_dir or None,
                progress,
                d.simulate,
                split,
                workers=d.workers,
            )

        train = simulated("train", lim_tr, d.target, 0)
        test = simulated("test", lim_te, "source", 10_000_000)  # tests score against the exact source digit
    elif d.kind == "mnist-dvs":
        protos = D.prototype_images(*D.load_mnist_split(d.mnist_dir or None, "train"))
        train, test = (
            D.load_mnist_dvs(
                d.dir,
                split,
                d.dt_us,
                d.duration_us,
                prototypes=protos,
                cache_dir=d.cache_dir or None,
                progress=progress,
                limit=lim,
            )
            for split, lim in (("train", lim_tr), ("test", lim_te))
        )
    else:
        raise ValueError(f"data.kind {d.kind!r} is trained with training.predictive (blobs)")
    train.crop_T = d.crop_T
    return Datasets(
        train,
        test,
        train.n_inputs,
        train.frame_shape,
        train.T,
        {"train_items": len(train), "test_items": len(test)},
    )


def preprocessing_of(cfg: TrainingConfig, ds: Datasets) -> dict[str, Any]:
    """What a consumer of the checkpoint must do to the input (stored in the model config)."""
    d = cfg.data
    if d.kind == "mnist":
        return {"kind": "mnist", "encoding": d.encoding, "T": d.T, "image": "28x28 in [0, 1], row-major"}
    spec = D.mnist_dvs_spec(d.dt_us)
    return {
        "kind": d.kind,
        "roi": list(spec.roi),
        "roi_convention": "events top-left convention (x right, y down; jAER x mirrored as in "
        "events.MNIST_DVS): ROI(48, 54, 26, 26) on a 128x128 DVS128 sensor",
        "sensor": [128, 128],
        "dt_us": int(d.dt_us),
        "duration_us": int(d.duration_us),
        "T": ds.T,
        "polarity": spec.polarity,
        "mode": spec.mode,
        "pool": spec.pool,
        "t0": "first event of the recording",
        "preset": "events.MNIST_DVS",
        "events_version": getattr(events, "__version__", None),
        **cfg.model.preprocessing,
    }


def build_naturalizer(cfg: TrainingConfig, ds: Datasets) -> Naturalizer:
    """A fresh :class:`model.Naturalizer` for the config and data."""
    m = cfg.model
    enc = EncoderConfig(
        n_inputs=ds.n_inputs,
        hidden=tuple(m.hidden),
        n_readout=m.n_readout,
        tau_e=m.tau_e,
        n_basis=m.n_basis,
        fb_memory=m.fb_memory,
        prior_rate=m.prior_rate,
    )
    d = cfg.data
    nc = NaturalizerConfig(
        encoder=enc,
        decoder=m.decoder,
        tau_d=m.tau_d,
        image_shape=(28, 28),
        input_shape=ds.input_shape,
        dt_us=int(d.dt_us) if d.kind != "mnist" else 1,
        polarity="split",
        mode="presence",
        preprocessing=preprocessing_of(cfg, ds),
        decoder_options=dict(m.decoder_options),
    )
    init = "random" if m.hidden_init == "calibrated" else m.hidden_init
    return Naturalizer(nc, hidden_init=init, hidden_init_scale=m.hidden_init_scale)


def init_hidden(
    cfg: TrainingConfig, nat: Naturalizer, ds: Datasets, device: torch.device
) -> dict[str, float]:
    """Apply ``model.hidden_init``: "zero"/"random" (done by the model) or "calibrated".

    "calibrated" bisects the random-init scale until ``model.hidden_active`` (default 0.15) of
    the hidden neurons spike on a batch of training data (VDIB-REFERENCE.md pitfall 3).
    """
    m = cfg.model
    if m.hidden_init != "calibrated" or not nat.config.encoder.hidden:
        return {}
    g = torch.Generator().manual_seed(int(cfg.run.seed) + 99)
    idx = torch.randperm(len(ds.train), generator=g)[:64]
    x, _, _ = ds.train.batch(idx, g, "cpu")
    enc = nat.encoder
    scale = calibrate_hidden_init(enc.cpu(), x, m.hidden_active, seed=int(cfg.run.seed))
    enc.to(device)
    return {"hidden_init_scale": scale}


def build_rule(cfg: TrainingConfig, naturalizer: Naturalizer, dist: Dist) -> Rule:
    """The learning rule from ``model.rules`` with the run's all-reduce hook (sum over ranks)."""
    r = cfg.rule
    rule = model_build_rule(r.name, naturalizer, lr=r.lr, beta=r.beta, **r.options)
    if dist.world > 1:
        rule.all_reduce = dist.all_reduce_sum
    return rule


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a function of (seed, epoch) only, so resume needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def global_batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of global batch ``step`` (epochs of ``n // batch`` full batches, reshuffled each)."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = _epoch_perm(n, seed, epoch)
    if n < batch:  # tiny datasets: wrap around
        perm = perm.repeat(math.ceil(batch / n))
    return perm[k * batch : (k + 1) * batch]


def _slice(dist: Dist, b: int) -> slice:
    if b % dist.world:
        raise ValueError(f"global batch {b} is not divisible by {dist.world} ranks")
    per = b // dist.world
    return slice(dist.rank * per, (dist.rank + 1) * per)


def _rule_step(rule: Any, x: torch.Tensor, target: torch.Tensor, uniforms: torch.Tensor) -> dict[str, float]:
    """One update with the readout uniforms the trainer drew for this rank's rows (DDP-exact)."""
    return rule.train_step(x, target, uniforms=uniforms)


def evaluate_now(
    nat: torch.nn.Module, ds: Any, judge: Any, limit: int, batch_size: int, seed: int, device: torch.device
) -> dict:
    res = evaluate_model(nat, ds, judge, limit or None, batch_size, seed, device)
    res.pop("judge_accuracy_per_class", None)
    res["eval_seconds"] = res.pop("seconds")  # "seconds" in metrics.jsonl is training time
    return res


def train(cfg: TrainingConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the training a config describes; returns the final summary."""
    r = cfg.run
    if r.threads:
        torch.set_num_threads(int(r.threads))
    device = pick_device(r.device)
    dist = init_distributed(device)
    run_dir = Path(r.dir)
    seed = int(r.seed)
    torch.manual_seed(seed)

    ds = build_datasets(cfg, progress=progress and dist.is_main)
    nat = build_naturalizer(cfg, ds).to(device)
    init_info = init_hidden(cfg, nat, ds, device)
    rule = build_rule(cfg, nat, dist)
    n_samples = int(getattr(getattr(rule, "opts", None), "n_samples", 1))
    gen = torch.Generator(device=device).manual_seed(seed + 17)
    B = int(cfg.train.batch_size)
    total_steps = math.ceil(int(cfg.train.examples) / B)
    step = 0
    elapsed_before = 0.0

    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and dist.is_main:
        print_fn = __import__("logging").getLogger(__name__).warning
        print_fn("no checkpoint in %s: starting from scratch", run_dir)
    if ckpt is not None:
        loaded, _ = load_checkpoint(ckpt, device=device)
        nat.load_state_dict(loaded.state_dict())
        st = load_train_state(ckpt)
        rule.load_state_dict(st["rule"])
        set_rng_state(st["rng"], None, {"sampling": gen})
        step = int(st["step"])
        elapsed_before = float(st.get("elapsed", 0.0))

    judge = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        jdir = Path(cfg.eval.judge) if cfg.eval.judge else default_judge_dir()
        if (jdir / "config.json").is_file():
            judge = load_judge(jdir, device=device)
    log = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=step) if dist.is_main else None

    t_cfg = cfg.train
    eval_every = max(1, round(t_cfg.eval_every / B))
    ckpt_every = max(1, round(t_cfg.checkpoint_every / B))
    bar = None
    if progress and dist.is_main:
        bar = tqdm(
            total=total_steps, initial=step, desc=f"train {run_dir.name}", unit="step", mininterval=1.0
        )
    sl = _slice(dist, B)
    t_start = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def checkpoint() -> None:
        if not dist.is_main:
            return

        def write(tmp: Path) -> None:
            save_checkpoint(
                tmp,
                nat,
                training_config=cfg.to_dict(),
                metrics={"step": step, "examples": step * B},
                provenance={"run_dir": str(run_dir)},
            )
            save_train_state(
                tmp,
                {
                    "step": step,
                    "elapsed": elapsed(),
                    "rule": rule.state_dict(),
                    "rng": rng_state(None, {"sampling": gen}),
                },
            )

        save_training_checkpoint(run_dir, step, write, keep=int(r.keep_checkpoints))

    stopped_early = False
    first_step = step
    while step < total_steps:
        idx = global_batch_indices(len(ds.train), B, seed, step)
        x, target, _ = ds.train.batch(idx, gen, device)  # the whole global batch on every rank
        uniforms = torch.rand((x.shape[0], B * n_samples, cfg.model.n_readout), generator=gen, device=device)
        rows = slice(sl.start * n_samples, sl.stop * n_samples)
        nat.train()
        stats = _rule_step(rule, x[:, sl], target[sl], uniforms[:, rows])
        stats.pop("seconds", None)
        step += 1
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        n_acc += 1
        if bar is not None:
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix(
                    loss=f"{stats.get('decoder_loss', float('nan')):.1f}",
                    rate=f"{stats.get('readout_rate', float('nan')):.3f}",
                )
        if log is not None and (step % t_cfg.log_every == 0 or step == total_steps):
            log.write(
                {
                    "kind": "train",
                    "step": step,
                    "examples": step * B,
                    "seconds": round(elapsed(), 2),
                    **{k: v / n_acc for k, v in acc.items()},
                }
            )
            acc, n_acc = {}, 0
        if step % eval_every == 0 and step < total_steps and log is not None:
            res = evaluate_now(nat, ds.test, judge, cfg.eval.limit, cfg.eval.batch_size, seed, device)
            log.write(
                {"kind": "eval", "step": step, "examples": step * B, "seconds": round(elapsed(), 2), **res}
            )
            if bar is not None:
                bar.write(
                    f"step {step}: "
                    + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float))
                )
        if step % ckpt_every == 0 and step < total_steps:
            checkpoint()
        if (t_cfg.max_seconds and elapsed() > t_cfg.max_seconds) or (
            t_cfg.stop_after_steps and step - first_step >= t_cfg.stop_after_steps
        ):
            stopped_early = step < total_steps
            break
    if bar is not None:
        bar.close()
    checkpoint()
    summary: dict[str, Any] = {
        "steps": step,
        "examples": step * B,
        "train_seconds": round(elapsed(), 1),
        "stopped_early": stopped_early,
        "world_size": dist.world,
        "device": str(device),
    }
    if log is not None:  # the main rank
        res = evaluate_now(nat, ds.test, judge, cfg.eval.final_limit, cfg.eval.batch_size, seed, device)
        summary["final_eval"] = res
        log.write(
            {
                "kind": "eval",
                "step": step,
                "examples": step * B,
                "seconds": round(elapsed(), 2),
                "final": True,
                **res,
            }
        )
        log.close()
        save_dir = Path(r.save) if r.save else run_dir / "final"
        prov = {
            "run_dir": str(run_dir),
            "hardware": hardware_string(),
            "data": ds.info,
            "command": cfg.run.command,
            **init_info,
        }
        metrics = {**res, **{k: v for k, v in summary.items() if k != "final_eval"}}
        if r.save_dtype != "float32":
            # evaluate what is shipped: the weights as stored (e.g. float16 halves the size)
            nat = cast_weights(nat, r.save_dtype)
            res = evaluate_now(nat, ds.test, judge, cfg.eval.final_limit, cfg.eval.batch_size, seed, device)
            summary["final_eval"] = metrics["stored_weights_eval"] = res
            metrics.update(res)
        export_checkpoint(save_dir, nat, cfg, metrics, prov, r.save_dtype)
        summary["checkpoint"] = str(save_dir)
        plot_run(run_dir)
    dist.barrier()
    if dist.initialised_here:
        tdist.destroy_process_group()
    return summary


def cast_weights(nat: Naturalizer, dtype: str) -> Naturalizer:
    """A copy of ``nat`` whose float parameters are rounded to ``dtype`` and back to float32
    (``int4`` / ``int8``: quantized as ``model.save_checkpoint(quantize=...)`` stores them)."""
    if dtype in ("int4", "int8"):
        device = next(nat.parameters()).device
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, copy.deepcopy(nat).to("cpu"), quantize=dtype)
            loaded, _ = load_checkpoint(tmp, device=device)
        if not isinstance(loaded, Naturalizer):
            raise TypeError(f"{type(nat).__name__} re-loaded as {type(loaded).__name__}")
        return loaded
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    out = copy.deepcopy(nat)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dt).to(p.dtype))
    return out


def export_checkpoint(
    save_dir: Path,
    nat: Naturalizer,
    cfg: TrainingConfig,
    metrics: dict[str, Any],
    provenance: dict[str, Any],
    dtype: str = "float32",
) -> Path:
    """``model.save_checkpoint`` with the weights stored as ``dtype`` (loading casts them back), plus
    the model card; files are world-readable."""
    if dtype in ("int4", "int8"):
        save_checkpoint(
            save_dir,
            copy.deepcopy(nat).to("cpu"),
            training_config=cfg.to_dict(),
            metrics=metrics,
            provenance={**provenance, "weights_dtype": dtype},
            quantize=dtype,
        )
    else:
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        stored = copy.deepcopy(nat).to("cpu").to(dt) if dt != torch.float32 else nat
        save_checkpoint(
            save_dir,
            stored,
            training_config=cfg.to_dict(),
            metrics=metrics,
            provenance={**provenance, "weights_dtype": dtype},
        )
    write_model_card(save_dir, cfg.run.title or None, cfg.run.notes)
    for f in Path(save_dir).iterdir():
        os.chmod(f, 0o644)
    return Path(save_dir)


def params_vector(nat: torch.nn.Module) -> torch.Tensor:
    """All parameters concatenated (tests compare runs with it)."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in nat.parameters()])
