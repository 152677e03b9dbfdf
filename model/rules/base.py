"""What every learning rule shares: the :class:`Rule` API (train step, evaluation, state, DDP hook),
input flattening, readout uniforms, decoder losses over the last or every window, hidden-layer
statistics and re-initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..encoder import Encoder
from ..loss import KLReduction, LossKind, decoder_loss
from ..naturalizer import Naturalizer, sliding_windows
from ..rollout import HiddenRollout

__all__ = [
    "check_common_options",
    "MATMUL_DTYPES",
    "HiddenInit",
    "KLReduction",
    "MatmulDtype",
    "Rule",
    "TargetSteps",
    "init_hidden",
    "flatten_input",
    "hidden_stats",
]

#: ``matmul_dtype`` option names.
MatmulDtype = Literal["float32", "bfloat16"]
#: ``hidden_init`` option: re-initialise the hidden layers to zero (the authors) or at random.
HiddenInit = Literal["zero", "random"]
#: Decode the last window only, or every window (``target [T, B, ...]`` or one target for all steps).
TargetSteps = Literal["last", "all"]
#: ``matmul_dtype`` option -> the dtype the big GEMM operands are cast to (None: as given).
MATMUL_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def check_common_options(target_steps: str, matmul_dtype: str, hidden_init: str | None) -> None:
    """Check the options every rule has (called by each rule's options dataclass)."""
    if target_steps not in ("last", "all"):
        raise ValueError(f"target_steps must be 'last' or 'all', got {target_steps!r}")
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {sorted(MATMUL_DTYPES)}, got {matmul_dtype!r}")
    if hidden_init not in (None, "zero", "random"):
        raise ValueError(f"hidden_init must be None, 'zero' or 'random', got {hidden_init!r}")


def flatten_input(nat: Naturalizer, x: Tensor) -> Tensor:
    if x.dim() == 5 or (x.dim() == 3 and x.shape[-1] == nat.config.encoder.n_inputs):
        return nat.flatten_input(x)
    raise ValueError(f"x must be [T, B, C, H, W] or [T, B, n_inputs], got {tuple(x.shape)}")


def hidden_stats(roll: HiddenRollout) -> dict[str, float]:
    """Per hidden layer: mean spike rate and the fraction of neurons that fired at all in a sequence."""
    stats = {}
    for i, s in enumerate(roll.s):
        s = s.detach()
        stats[f"hidden_rate_{i}"] = float(s.mean())
        stats[f"hidden_active_{i}"] = float(s.amax(0).mean())
    return stats


def init_hidden(encoder: Encoder, kind: HiddenInit, scale: float) -> None:
    """Re-initialise the hidden layers: ``"zero"`` (the authors) or ``"random"`` N(0, scale² / (0.05 n_in)); biases U(±1e-3)."""
    with torch.no_grad():
        for layer in encoder.layers:
            if kind == "zero":
                layer.weight.zero_()
            else:
                torch.nn.init.normal_(layer.weight, 0.0, scale / math.sqrt(layer.in_features * 0.05))
            torch.nn.init.uniform_(layer.bias, -1e-3, 1e-3)


class Rule:
    """Common API: ``train_step``, ``evaluate``, ``state_dict``/``load_state_dict``, ``all_reduce``."""

    name = ""

    def __init__(self, naturalizer: Naturalizer):
        self.naturalizer = naturalizer
        self.steps = 0
        # DDP hook: sums a tensor over ranks and returns it (None: single process)
        self.all_reduce: Callable[[Tensor], Tensor] | None = None
        self._world: float | None = None

    # -- DDP
    def _world_size(self) -> float:
        if self.all_reduce is None:
            return 1.0
        if self._world is None:
            self._world = float(self.all_reduce(torch.ones(1)).item())
        return self._world

    def _reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """Average tensors over ranks with one all-reduce call (identity without a hook)."""
        if self.all_reduce is None or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = self.all_reduce(flat) / self._world_size()
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def _reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        ps = [p for p in params if p.grad is not None]
        for p, g in zip(ps, self._reduce_mean([p.grad for p in ps]), strict=True):  # type: ignore[misc]
            p.grad = g

    # -- targets / windows
    def _loss_kind(self) -> LossKind:
        return "bce" if self.naturalizer.config.output == "image" else "nll"

    def _decode_logits(self, y: Tensor, target_steps: str) -> Tensor:
        """Decoder logits: ``[R, F]`` for the last window, or ``[T, R, F]`` for every step."""
        tau_d = self.naturalizer.config.tau_d
        dec = self.naturalizer.decoder
        if target_steps == "last":
            return dec.logits(sliding_windows(y[-tau_d:], tau_d)[-1])
        w = sliding_windows(y, tau_d)  # [T, R, tau_d, N]
        T, R = w.shape[:2]
        return dec.logits(w.reshape(T * R, tau_d, -1)).view(T, R, -1)

    def _decoder_loss(self, logits: Tensor, target: Tensor, target_steps: str, n_samples: int) -> Tensor:
        """Per-row ℓ_d ``[R]``; ``target`` ``[B, ...]`` (last) or ``[T, B, ...]``/``[B, ...]`` (all)."""
        kind = self._loss_kind()
        if target_steps == "last":
            tgt = target.repeat_interleave(n_samples, 0) if n_samples > 1 else target
            return decoder_loss(logits, tgt, kind)
        T, R = logits.shape[:2]
        B = R // n_samples
        if tuple(target.shape[:2]) != (T, B):  # one target for every step
            target = target.unsqueeze(0).expand(T, *target.shape)
        tgt = target.repeat_interleave(n_samples, 1) if n_samples > 1 else target
        flat = decoder_loss(logits.reshape(T * R, -1), tgt.reshape(T * R, *tgt.shape[2:]), kind)
        return flat.view(T, R).sum(0)

    def train_step(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def _uniforms(
        shape: torch.Size, like: Tensor, generator: torch.Generator | None, given: Tensor | None
    ) -> Tensor:
        """The readout noise ``[T, R, N_Y]``: ``given`` (checked) or one ``torch.rand`` draw."""
        if given is None:
            return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
        if tuple(given.shape) != tuple(shape):
            raise ValueError(
                f"uniforms must have shape {tuple(shape)} (T, B * n_samples, N_Y), got {tuple(given.shape)}"
            )
        return given.to(device=like.device, dtype=like.dtype)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
