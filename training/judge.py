"""The judge: a LeNet-5 trained on MNIST that scores reconstructions by its accuracy on them.

LeNet-5 with ReLU and max-pooling on 32x32 inputs (28x28 digits zero-padded by 2 on each side,
as in LeCun et al. 1998 and the authors' evaluation). Saved as ``weights.safetensors`` +
``config.json`` (never pickled), loaded by :func:`load_judge`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import default_mnist_dir, find_mnist_files, load_mnist_split

JUDGE_FORMAT = "vdib-judge/1"


class LeNet5(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - fc120 - fc84 - fc10, ReLU; input [B, 1, 32, 32]."""

    def __init__(self, c1: int = 6, c2: int = 16, f1: int = 120, f2: int = 84) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, 10)
        self.widths = {"c1": c1, "c2": c2, "f1": f1, "f2": f2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 784] or [B, 28, 28] (or [B, 1, 28, 28]) in [0, 1] -> [B, 1, 32, 32] zero-padded."""
    x = images.reshape(images.shape[0], 1, 28, 28).float()
    return F.pad(x, (2, 2, 2, 2))


@dataclass
class JudgeConfig:
    """Training settings of the judge (stored in its config.json)."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_rotate_deg: float = 12.0
    max_shift_px: float = 2.5
    scale_range: float = 0.12
    max_shear: float = 0.15
    seed: int = 0
    train_limit: int | None = 10_000


def random_affine(x: torch.Tensor, cfg: JudgeConfig, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, shifts, scalings and shears of a batch [B, 1, H, W] (bilinear)."""
    b, _, h, _ = x.shape
    g = generator

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=g)

    ang = u(-1, 1) * math.radians(cfg.max_rotate_deg)
    sc = 1 + u(-1, 1) * cfg.scale_range
    sh = u(-1, 1) * cfg.max_shear
    tx, ty = (u(-1, 1) * cfg.max_shift_px * 2 / h for _ in range(2))
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes [N] for images [N, 784] (or [N, 28, 28]) in [0, 1]."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(model(to_judge_input(images[i : i + batch_size].to(dev))).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the judge assigns to ``labels``."""
    return float((predict(model, images) == labels.cpu()).float().mean())


def train_judge(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: JudgeConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    progress: bool = True,
) -> tuple[LeNet5, dict]:
    """Train LeNet-5 with Adam + one-cycle LR and random affine augmentation; returns (model, metrics).

    ``train_x``/``test_x`` float [N, 784] in [0, 1]. Cross-entropy; test accuracy after each epoch.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = LeNet5()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_x) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    x_all = to_judge_input(train_x)
    history = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="judge", mininterval=1.0)
    for ep in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=g)
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = random_affine(x_all[idx], cfg, g)
            loss = F.cross_entropy(model(xb), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            if bar is not None:
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", ep=ep)
        acc = accuracy(model, test_x, test_y)
        history.append({"epoch": ep + 1, "train_loss": tot / max(steps_per_epoch, 1), "test_accuracy": acc})
        if bar is not None:
            bar.set_postfix(loss=f"{tot / max(steps_per_epoch, 1):.3f}", test_acc=f"{acc:.4f}")
        if on_epoch is not None:
            on_epoch(ep + 1, tot / max(steps_per_epoch, 1), acc)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    metrics = {
        "test_accuracy": history[-1]["test_accuracy"] if history else float("nan"),
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
        "train_seconds": round(seconds, 1),
        "history": history,
    }
    return model, metrics


def hardware_string() -> str:
    """One line describing where training ran (CPU model, cores, threads, torch version)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, {dev}"


def save_judge(out_dir: str | Path, model: LeNet5, cfg: JudgeConfig, metrics: dict, provenance: dict) -> Path:
    """Write weights.safetensors + config.json + README.md atomically (tmp dir, then os.replace)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".judge-", dir=out_dir.parent))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "weights.safetensors"),
    )
    config = {
        "format": JUDGE_FORMAT,
        "architecture": "lenet5",
        "widths": model.widths,
        "input": "[B, 1, 32, 32], 28x28 digits in [0, 1] zero-padded by 2",
        "training": asdict(cfg),
        "metrics": metrics,
        "provenance": provenance,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "README.md").write_text(judge_model_card(cfg, metrics, provenance))
    # mkdtemp makes a private (0700) folder; a shipped checkpoint is world-readable.
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_judge(path: str | Path, device: str | torch.device = "cpu") -> LeNet5:
    """Load a judge saved by :func:`save_judge` (safetensors + JSON; never unpickles)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("format") != JUDGE_FORMAT:
        raise ValueError(f"{path}: not a judge checkpoint (format {cfg.get('format')!r})")
    model = LeNet5(**cfg["widths"])
    model.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(device)))
    return model.to(device).eval()


def default_judge_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "checkpoints" / "judge"


def judge_model_card(cfg: JudgeConfig, metrics: dict, provenance: dict) -> str:
    hist = metrics.get("history", [])
    curve = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['test_accuracy']:.2f} % |" for h in hist
    )
    return f"""# Judge: LeNet-5 on MNIST

Scores naturalized images: the judge's accuracy on reconstructions of the 10,000 MNIST test
digits is the headline metric of every VDIB evaluation (as in the paper, Table 1).

- **Architecture**: LeNet-5 with ReLU and max-pooling: conv5x5(6) - pool2 - conv5x5(16) - pool2 -
  fc120 - fc84 - fc10; input 28x28 in [0, 1] zero-padded to 32x32 (no normalisation).
- **Data**: {provenance.get("train_files", "?")} ({metrics["n_train"]} training digits);
  test on {provenance.get("test_files", "?")} ({metrics["n_test"]} digits).
- **Training**: AdamW (lr {cfg.lr}, weight decay {cfg.weight_decay}), one-cycle schedule,
  batch {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}; augmentation: random rotation
  up to ±{cfg.max_rotate_deg}°, shift up to ±{cfg.max_shift_px} px, scale ±{100 * cfg.scale_range:.0f} %,
  shear up to {cfg.max_shear}.
- **Metric**: test accuracy **{100 * metrics["test_accuracy"]:.2f} %** on the 10,000 official test digits.
- **Training time**: {metrics["train_seconds"]} s on {provenance.get("hardware", "?")}.
- **Files**: `weights.safetensors` (float32), `config.json` (architecture, training config,
  metrics, provenance). Load with `training.judge.load_judge(dir)`.
- **Reproduce**: `{provenance.get("command", "vdib train-judge")}`

| epoch | train loss | test accuracy |
|---|---|---|
{curve}
"""


def load_mnist_tensors(
    data_dir: str | Path | None, train_limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, str]:
    """(train_x, train_y, test_x, test_y, train_files, test_files) as float [N, 784] / int64 tensors."""
    tr = load_mnist_split(data_dir, "train", train_limit)
    te = load_mnist_split(data_dir, "test")

    def f(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    d = data_dir or default_mnist_dir()
    return (
        f(tr[0]),
        torch.from_numpy(tr[1]),
        f(te[0]),
        torch.from_numpy(te[1]),
        find_mnist_files(d, "train")[0].name,
        find_mnist_files(d, "test")[0].name,
    )
