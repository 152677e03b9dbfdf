"""The ``vdib`` rule (the paper's): score-function readout gradients and e-prop with DFA for the hidden layers.

Usage (training/)::

    rule = build_rule("vdib", naturalizer, lr=1e-3, beta=1e-3, baseline="loo", n_samples=2)
    stats = rule.train_step(x, target, generator=g)   # x [T, B, C, H, W] or [T, B, N]
    ckpt = rule.state_dict(); rule.load_state_dict(ckpt)   # model + optimizers + rule state
    rule.all_reduce = lambda t: (dist.all_reduce(t), t)[1]  # DDP: sum over ranks

``vdib`` (paper eq. 11-22). Per sample ``b`` with spikes ``y_b`` drawn from the SNN, the learning
signal is :math:`\\ell_b = \\ell_d(y_b, r_b) + \\beta\\,\\ell_e(y_b, x_b)`; the encoder update is

.. math:: \\Delta\\theta = -\\eta\\,\\frac{1}{B}\\sum_b (\\ell_b - b_b)\\, g_b,

where :math:`g_b` is sample ``b``'s own eligibility (not the batch-mean gradient):

* readout (exact score function, eq. 19): :math:`g_{W_{ijk}} = \\sum_t (y_{it}-\\sigma(u_{it}))
  (z_j * \\phi_k)_t`, likewise for the feedback weight (trace :math:`(y_i*\\psi)_{t-1}`) and bias;
* hidden (e-prop with direct feedback alignment, eq. 20-22): :math:`g_{W_{ij}} = \\sum_t L_{it}\\,
  \\Theta'(U_{it})\\,P_{jt}` with :math:`L_t = B_{dfa}(y_t - \\sigma(u_t))`, ``B_dfa`` fixed random.

Because :math:`\\ell_b - b_b` is a per-sample scalar, :math:`\\sum_b (\\ell_b-b_b) g_b` collapses
into one GEMM over ``(t, b)`` with the errors pre-scaled per sample; no per-sample matrices
are formed (except for the per-parameter baseline, which needs :math:`g_b^2`).

Baselines ``b_b``: ``none``; ``moving-average`` (EMA of the batch-mean signal); ``per-parameter``
(the authors': :math:`b = \\mathrm{EMA}[g^2\\ell]/\\mathrm{EMA}[g^2]` per parameter);
``loo`` (leave-one-out over ``n_samples`` readout samples of the same input — removes the
loss variance that comes from the input itself, VDIB-REFERENCE.md pitfall 2).
The decoder is trained by backprop on :math:`\\ell_d` with Adam; the encoder with Adam
(default) or plain SGD (the authors').

``vdib-bptt`` (:mod:`model.rules.bptt`) trains the same objective by backprop through time.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..encoder import Encoder
from ..loss import sampled_kl
from ..naturalizer import Naturalizer
from ..rollout import HiddenRollout, basis_by_lag, hidden_rollout, mm, readout_ff, readout_sample
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

__all__ = ["BASELINES", "Baseline", "VDIBOptions", "VDIBRule", "encoder_gradients", "per_row_gradients"]

Baseline = Literal["none", "moving-average", "per-parameter", "loo"]
BASELINES: tuple[Baseline, ...] = ("none", "moving-average", "per-parameter", "loo")


def _shift_errors(err: Tensor, tau: int) -> Tensor:
    """``[T, B, N_Y] -> [T, B, tau, N_Y]`` with ``out[t, :, d] = err[t + d]`` (zero past the end).

    The transpose of :func:`model.rollout.readout_ff`'s shift-and-add: the per-lag gradient is
    :math:`C_d = \\sum_t E_{t+d}^T z_t` and :math:`\\partial W_k = \\sum_d \\phi_k(d) C_d`.
    """
    T, B, ny = err.shape
    shifted = err.new_zeros(T, B, tau, ny)
    for d in range(min(tau, T)):
        shifted[: T - d, :, d] = err[d:]
    return shifted


def _lag_to_basis(c: Tensor, encoder: Encoder) -> Tensor:
    """Per-lag gradients ``[..., tau, N_Y, n_in]`` -> ``[..., N_Y, n_in, K]``."""
    return torch.einsum("dk,...dij->...ijk", basis_by_lag(encoder).to(c.dtype), c)


def encoder_gradients(
    encoder: Encoder,
    roll: HiddenRollout,
    y: Tensor,
    u: Tensor,
    fb: Tensor,
    weights: Tensor,
    dfa: list[Tensor],
    *,
    n_samples: int = 1,
    matmul_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """:math:`\\sum_r w_r\\, g_r` for every encoder parameter (readout: score function; hidden: e-prop/DFA).

    ``y, u, fb``: ``[T, R, N_Y]`` with ``R = B * n_samples`` readout rows (row ``b * n + k`` is
    sample ``k`` of input ``b``); ``weights [R]`` the per-row factors (e.g. ``(ℓ_r - b_r) / R``).
    """
    T, R, ny = y.shape
    B = R // n_samples
    ew = (y - torch.sigmoid(u)) * weights.view(1, R, 1)  # weighted readout errors
    grads: dict[str, Tensor] = {
        "readout_bias": ew.sum((0, 1)),
        "readout_fb_weight": (ew * fb).sum((0, 1)),
    }
    # the hidden activity is shared by the n samples of an input, and L = B e is linear: sum first
    eb = ew.view(T, B, n_samples, ny).sum(2) if n_samples > 1 else ew
    z = roll.z
    tau = encoder.config.tau_e
    es = _shift_errors(eb, tau).view(T * B, tau * ny)
    c = mm(es.t(), z.reshape(T * B, -1), matmul_dtype).view(tau, ny, -1)  # [tau, N_Y, n_in]
    grads["readout_ff_weight"] = _lag_to_basis(c, encoder).contiguous()
    scale = encoder.config.surrogate_scale
    for li, (layer, b_mat) in enumerate(zip(encoder.layers, dfa, strict=True)):
        sg = torch.sigmoid(scale * roll.u[li])
        h = (eb @ b_mat.t()) * (scale * sg * (1 - sg))  # L_t * Theta'(U_t), [T, B, H]
        H = layer.out_features
        grads[f"hidden.{li}.weight"] = mm(
            h.reshape(T * B, H).t(), roll.p[li].reshape(T * B, -1), matmul_dtype
        )
        grads[f"hidden.{li}.bias"] = h.sum((0, 1))
    return grads


def per_row_gradients(
    encoder: Encoder,
    roll: HiddenRollout,
    y: Tensor,
    u: Tensor,
    fb: Tensor,
    dfa: list[Tensor],
    rows: Tensor,
    n_samples: int = 1,
) -> dict[str, Tensor]:
    """Unweighted per-row eligibilities :math:`g_r` for the rows ``rows`` -> ``{name: [n, *shape]}``."""
    T = y.shape[0]
    ny = y.shape[2]
    e = y[:, rows] - torch.sigmoid(u[:, rows])  # [T, n, N_Y]
    b_idx = rows // n_samples
    n = rows.numel()
    out: dict[str, Tensor] = {
        "readout_bias": e.sum(0),
        "readout_fb_weight": (e * fb[:, rows]).sum(0),
    }
    tau = encoder.config.tau_e
    es = _shift_errors(e, tau).view(T, n, tau * ny)
    z = roll.z[:, b_idx]  # [T, n, n_in]
    c = torch.bmm(es.permute(1, 2, 0), z.permute(1, 0, 2)).view(n, tau, ny, -1)  # [n, tau, N_Y, n_in]
    out["readout_ff_weight"] = _lag_to_basis(c, encoder)
    scale = encoder.config.surrogate_scale
    for li, b_mat in enumerate(dfa):
        sg = torch.sigmoid(scale * roll.u[li][:, b_idx])
        h = (e @ b_mat.t()) * (scale * sg * (1 - sg))  # [T, n, H]
        out[f"hidden.{li}.weight"] = torch.bmm(h.permute(1, 2, 0), roll.p[li][:, b_idx].permute(1, 0, 2))
        out[f"hidden.{li}.bias"] = h.sum(0)
    return out


@dataclass
class VDIBOptions:
    """Options of the ``vdib`` rule (authors' choices: ``baseline="per-parameter"``, ``n_samples=1``,
    ``encoder_optimizer="sgd"``, zero hidden init; the experiment's best: ``baseline="loo"``,
    ``n_samples=2``, random hidden init with ~15 % active, Adam)."""

    lr: float = 1e-3
    decoder_lr: float | None = None  # default: lr
    beta: float = 1e-3
    baseline: Baseline = "loo"
    n_samples: int = 2
    baseline_decay: float = 0.99  # EMA decay of the moving-average and per-parameter baselines
    encoder_optimizer: Literal["adam", "sgd"] = "adam"  # "adam" | "sgd" (authors)
    kl_reduction: KLReduction = "mean"  # ℓ_e / (T * N_Y) as the authors; "sum" = eq. 10
    target_steps: TargetSteps = "last"  # decode the last window only, or "all" windows
    matmul_dtype: MatmulDtype = "float32"  # "bfloat16" casts the big GEMM operands (spikes are exact)
    dfa_scale: float = 1.0  # B_dfa ~ N(0, dfa_scale^2 / N_Y)
    dfa_seed: int = 1234
    hidden_init: HiddenInit | None = None  # None: keep the model's weights; "zero" | "random" re-initialise
    hidden_init_scale: float = 1.0
    grad_clip: float | None = None  # clip the encoder update's norm (None: off)
    per_parameter_chunk: int = 8  # rows per chunk when forming per-sample eligibilities

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.n_samples < 1 or (self.baseline == "loo" and self.n_samples < 2):
            raise ValueError(f"n_samples must be >= 1 (>= 2 for the loo baseline), got {self.n_samples}")
        if self.encoder_optimizer not in ("adam", "sgd"):
            raise ValueError(f"encoder_optimizer must be 'adam' or 'sgd', got {self.encoder_optimizer!r}")
        check_common_options(self.target_steps, self.matmul_dtype, self.hidden_init)


class VDIBRule(Rule):
    """The paper's rule (see the module docstring); options in :class:`VDIBOptions`."""

    name = "vdib"

    def __init__(self, naturalizer: Naturalizer, **options: Any):
        super().__init__(naturalizer)
        self.opts = VDIBOptions(**options)
        o = self.opts
        enc = naturalizer.encoder
        if o.hidden_init is not None:
            init_hidden(enc, o.hidden_init, o.hidden_init_scale)
        g = torch.Generator().manual_seed(o.dfa_seed)
        ny = naturalizer.config.encoder.n_readout
        dev = enc.readout_bias.device
        self.dfa = [
            (torch.randn(layer.out_features, ny, generator=g) * (o.dfa_scale / math.sqrt(ny))).to(
                dev, enc.readout_bias.dtype
            )
            for layer in enc.layers
        ]
        self.enc_params = dict(enc.named_parameters())
        lr_d = o.decoder_lr if o.decoder_lr is not None else o.lr
        if o.encoder_optimizer == "adam":
            self.enc_opt: torch.optim.Optimizer = torch.optim.Adam(enc.parameters(), lr=o.lr)
        else:
            self.enc_opt = torch.optim.SGD(enc.parameters(), lr=o.lr)
        self.dec_opt = torch.optim.Adam(naturalizer.decoder.parameters(), lr=lr_d)
        self.baseline_ma: Tensor | None = None
        self.pp_g2: dict[str, Tensor] = {}
        self.pp_g2l: dict[str, Tensor] = {}
        self._mm = MATMUL_DTYPES[o.matmul_dtype]

    # -- the rollout shared by train_step and evaluate
    def _rollout(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None,
        n_samples: int,
        given: Tensor | None = None,
    ) -> tuple[HiddenRollout, Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        nat = self.naturalizer
        enc = nat.encoder
        xf = flatten_input(nat, x)
        T, B = xf.shape[:2]
        with torch.no_grad():
            roll = hidden_rollout(enc, xf, matmul_dtype=self._mm)
            u_ff = readout_ff(enc, roll.z, matmul_dtype=self._mm)
            if n_samples > 1:
                u_ff = u_ff.repeat_interleave(n_samples, dim=1)
            uniforms = self._uniforms(u_ff.shape, u_ff, generator, given)
            y, u, fb = readout_sample(enc, u_ff, uniforms)
        logits = self._decode_logits(y, self.opts.target_steps)
        ld = self._decoder_loss(logits, target, self.opts.target_steps, n_samples)
        le = sampled_kl(y, u, nat.config.encoder.prior_rate, self.opts.kl_reduction)
        return roll, y, u, fb, ld, le, B

    def _stats(self, roll: HiddenRollout, y: Tensor, ld: Tensor, le: Tensor, t0: float) -> dict[str, float]:
        ls = ld.detach() + self.opts.beta * le
        stats = {
            "loss": float(ls.mean()),
            "decoder_loss": float(ld.detach().mean()),
            "encoder_loss": float(le.mean()),
            "readout_rate": float(y.mean()),
            "signal_std": float(ls.std()) if ls.numel() > 1 else 0.0,
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
        """Losses and rates of one batch without any update (one readout sample per input)."""
        t0 = time.perf_counter()
        roll, y, u, fb, ld, le, _ = self._rollout(x, target, generator, 1, uniforms)
        return self._stats(roll, y, ld, le, t0)

    def train_step(
        self,
        x: Tensor,
        target: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> dict[str, float]:
        """One update on a batch: ``x [T, B, C, H, W]`` or ``[T, B, N]``; ``target [B, ...]``.

        Draws ``torch.rand((T, B * n_samples, N_Y), generator=generator)`` for the readout unless
        ``uniforms`` of that shape are given (row ``b * n_samples + k``: sample k of input b).
        """
        t0 = time.perf_counter()
        o = self.opts
        nat = self.naturalizer
        enc = nat.encoder
        K = o.n_samples
        roll, y, u, fb, ld, le, B = self._rollout(x, target, generator, K, uniforms)
        R = B * K

        # decoder: backprop on the mean ℓ_d (spikes are detached inputs)
        self.dec_opt.zero_grad(set_to_none=True)
        ld.mean().backward()
        self._reduce_grads(list(nat.decoder.parameters()))
        self.dec_opt.step()

        # encoder: common learning signal times each row's own eligibility
        ls = (ld.detach() + o.beta * le).to(y.dtype)  # [R]
        base_value: float | None = None  # per-parameter baselines have no scalar to report
        with torch.no_grad():
            if o.baseline == "per-parameter":
                grads = self._per_parameter_update(roll, y, u, fb, ls, K)
            else:
                if o.baseline == "none":
                    base = torch.zeros_like(ls)
                elif o.baseline == "loo":
                    per = ls.view(B, K)
                    base = ((per.sum(1, keepdim=True) - per) / (K - 1)).reshape(R)
                else:  # moving-average of the batch-mean signal (from previous batches)
                    (mean_ls,) = self._reduce_mean([ls.mean().reshape(1)])
                    if self.baseline_ma is None:
                        self.baseline_ma = mean_ls.clone()
                    base = self.baseline_ma.expand(R)
                    self.baseline_ma = o.baseline_decay * self.baseline_ma + (1 - o.baseline_decay) * mean_ls
                base_value = float(base.mean())
                w = (ls - base) / R
                grads = encoder_gradients(
                    enc, roll, y, u, fb, w, self.dfa, n_samples=K, matmul_dtype=self._mm
                )
            names = list(grads)
            reduced = self._reduce_mean([grads[n] for n in names])
            if o.grad_clip is not None:
                norm = torch.sqrt(torch.stack([(g.float() ** 2).sum() for g in reduced]).sum())
                if norm > o.grad_clip:
                    reduced = [g * (o.grad_clip / norm) for g in reduced]
            for n, g in zip(names, reduced, strict=True):
                self.enc_params[n].grad = g.to(self.enc_params[n].dtype)
        self.enc_opt.step()
        self.enc_opt.zero_grad(set_to_none=True)
        self.steps += 1
        stats = self._stats(roll, y, ld, le, t0)
        if base_value is not None:
            stats["baseline"] = base_value
        return stats

    def _per_parameter_update(
        self, roll: HiddenRollout, y: Tensor, u: Tensor, fb: Tensor, ls: Tensor, K: int
    ) -> dict[str, Tensor]:
        """Authors' baseline :math:`b = EMA[g^2 \\ell]/EMA[g^2]`; returns :math:`\\frac1R\\sum_r (\\ell_r - b) g_r`."""
        o = self.opts
        R = ls.numel()
        s_gl: dict[str, Tensor] = {}
        s_g: dict[str, Tensor] = {}
        s_g2: dict[str, Tensor] = {}
        s_g2l: dict[str, Tensor] = {}
        enc = self.naturalizer.encoder
        for start in range(0, R, o.per_parameter_chunk):
            rows = torch.arange(start, min(R, start + o.per_parameter_chunk), device=y.device)
            g = per_row_gradients(enc, roll, y, u, fb, self.dfa, rows, K)
            lr_ = ls[rows]
            for n, gr in g.items():
                lw = lr_.view(-1, *([1] * (gr.dim() - 1)))
                g2 = gr * gr
                for acc, val in (
                    (s_gl, (gr * lw).sum(0)),
                    (s_g, gr.sum(0)),
                    (s_g2, g2.sum(0)),
                    (s_g2l, (g2 * lw).sum(0)),
                ):
                    acc[n] = acc[n] + val if n in acc else val
        names = list(s_g2)
        stats = self._reduce_mean([s_g2[n] / R for n in names] + [s_g2l[n] / R for n in names])
        m2 = dict(zip(names, stats[: len(names)], strict=True))
        m2l = dict(zip(names, stats[len(names) :], strict=True))
        out = {}
        for n in names:
            if n not in self.pp_g2:  # first batch: start the averages at this batch's values
                self.pp_g2[n], self.pp_g2l[n] = m2[n].clone(), m2l[n].clone()
            base = self.pp_g2l[n] / (self.pp_g2[n] + 1e-12)
            out[n] = (s_gl[n] - base * s_g[n]) / R
            self.pp_g2[n] = o.baseline_decay * self.pp_g2[n] + (1 - o.baseline_decay) * m2[n]
            self.pp_g2l[n] = o.baseline_decay * self.pp_g2l[n] + (1 - o.baseline_decay) * m2l[n]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "options": asdict(self.opts),
            "steps": self.steps,
            "model": {k: v.detach().clone() for k, v in self.naturalizer.state_dict().items()},
            "enc_opt": copy.deepcopy(self.enc_opt.state_dict()),
            "dec_opt": copy.deepcopy(self.dec_opt.state_dict()),
            "dfa": [b.clone() for b in self.dfa],
            "baseline_ma": None if self.baseline_ma is None else self.baseline_ma.clone(),
            "pp_g2": {k: v.clone() for k, v in self.pp_g2.items()},
            "pp_g2l": {k: v.clone() for k, v in self.pp_g2l.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.name:
            raise ValueError(f"state is for rule {state.get('rule')!r}, not {self.name!r}")
        self.naturalizer.load_state_dict(state["model"])
        self.enc_opt.load_state_dict(copy.deepcopy(state["enc_opt"]))
        self.dec_opt.load_state_dict(copy.deepcopy(state["dec_opt"]))
        self.dfa = [b.clone() for b in state["dfa"]]
        self.baseline_ma = state["baseline_ma"]
        self.pp_g2 = dict(state["pp_g2"])
        self.pp_g2l = dict(state["pp_g2l"])
        self.steps = int(state["steps"])
