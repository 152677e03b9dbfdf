"""``vdib-bptt``: the VDIB objective trained by surrogate-gradient BPTT through the hidden layers,
a straight-through estimator for the Bernoulli readout and the analytic KL; one Adam."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..loss import analytic_kl, sampled_kl
from ..naturalizer import Naturalizer
from ..rollout import HiddenRollout, hidden_rollout, readout_ff, readout_sample
from .base import (
    MATMUL_DTYPES,
    HiddenInit,
    KLReduction,
    MatmulDtype,
    Rule,
    TargetSteps,
    check_common_options,
    flatten_input,
    hidden_stats,
    init_hidden,
)

__all__ = ["BPTTOptions", "BPTTRule"]


@dataclass
class BPTTOptions:
    """Options of ``vdib-bptt``: same objective, surrogate-gradient BPTT + straight-through readout."""

    lr: float = 1e-3
    beta: float = 1e-3
    kl_reduction: KLReduction = "mean"
    target_steps: TargetSteps = "last"
    matmul_dtype: MatmulDtype = "float32"
    hidden_init: HiddenInit | None = None
    hidden_init_scale: float = 1.0
    grad_clip: float | None = None
    n_samples: int = 1

    def __post_init__(self) -> None:
        check_common_options(self.target_steps, self.matmul_dtype, self.hidden_init)


class BPTTRule(Rule):
    """``vdib-bptt``: minimise ``mean_b[ℓ_d + β KL(Bern(σ(u)) || Bern(r))]`` by backprop through time."""

    name = "vdib-bptt"

    def __init__(self, naturalizer: Naturalizer, **options: Any):
        super().__init__(naturalizer)
        self.opts = BPTTOptions(**options)
        if self.opts.hidden_init is not None:
            init_hidden(naturalizer.encoder, self.opts.hidden_init, self.opts.hidden_init_scale)
        self.opt = torch.optim.Adam(naturalizer.parameters(), lr=self.opts.lr)
        self._mm = MATMUL_DTYPES[self.opts.matmul_dtype]

    def _forward(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None,
        differentiable: bool,
        given: Tensor | None = None,
    ) -> tuple[HiddenRollout, Tensor, Tensor, Tensor, Tensor]:
        nat = self.naturalizer
        enc = nat.encoder
        o = self.opts
        xf = flatten_input(nat, x)
        roll = hidden_rollout(enc, xf, matmul_dtype=self._mm, differentiable=differentiable)
        u_ff = readout_ff(enc, roll.z, matmul_dtype=self._mm)
        if o.n_samples > 1:
            u_ff = u_ff.repeat_interleave(o.n_samples, dim=1)
        uniforms = self._uniforms(u_ff.shape, u_ff.detach(), generator, given)
        y, u, _ = readout_sample(enc, u_ff, uniforms, straight_through=differentiable)
        logits = self._decode_logits(y, o.target_steps)
        ld = self._decoder_loss(logits, target, o.target_steps, o.n_samples)
        kl = analytic_kl(u, nat.config.encoder.prior_rate, o.kl_reduction)
        return roll, y, u, ld, kl

    def _stats(
        self, roll: HiddenRollout, y: Tensor, u: Tensor, ld: Tensor, kl: Tensor, t0: float
    ) -> dict[str, float]:
        le = sampled_kl(
            y.detach(), u.detach(), self.naturalizer.config.encoder.prior_rate, self.opts.kl_reduction
        )
        stats = {
            "loss": float((ld + self.opts.beta * kl).mean()),
            "decoder_loss": float(ld.mean()),
            "encoder_loss": float(le.mean()),
            "kl": float(kl.mean()),
            "readout_rate": float(y.detach().mean()),
            "seconds": time.perf_counter() - t0,
        }
        stats.update(hidden_stats(roll))
        return stats

    @torch.no_grad()
    def evaluate(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> dict[str, float]:
        t0 = time.perf_counter()
        roll, y, u, ld, kl = self._forward(x, target, generator, False, uniforms)
        return self._stats(roll, y, u, ld, kl, t0)

    def train_step(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> dict[str, float]:
        t0 = time.perf_counter()
        roll, y, u, ld, kl = self._forward(x, target, generator, True, uniforms)
        loss = (ld + self.opts.beta * kl).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.naturalizer.parameters())
        self._reduce_grads(params)
        if self.opts.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.opts.grad_clip)
        self.opt.step()
        self.steps += 1
        return self._stats(roll, y, u, ld.detach(), kl.detach(), t0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "options": asdict(self.opts),
            "steps": self.steps,
            "model": {k: v.detach().clone() for k, v in self.naturalizer.state_dict().items()},
            "opt": copy.deepcopy(self.opt.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.name:
            raise ValueError(f"state is for rule {state.get('rule')!r}, not {self.name!r}")
        self.naturalizer.load_state_dict(state["model"])
        self.opt.load_state_dict(copy.deepcopy(state["opt"]))
        self.steps = int(state["steps"])
