"""Vectorised whole-sequence passes of the encoder for training (batch and time at once).

:meth:`Encoder.forward` loops :meth:`Encoder.step` (bit-exact streaming semantics). Training
wants speed instead: the hidden input GEMM is hoisted out of the time loop
(``[T*B, n_in] x [n_in, H]``), the readout's feedforward filtering becomes one GEMM onto the
``K`` bases followed by a cheap temporal convolution, and only the elementwise recurrences
(refractory trace, readout feedback, sampling) stay in the loop. Results equal the step path
up to float rounding (tested).

Readout feedforward potential, with per-lag weights :math:`\\tilde W_d = \\sum_k \\phi_k(d) W_k`:

.. math:: u^{ff}_t = \\sum_{d=0}^{\\tau_e-1} \\tilde W_d\\, z_{t-d}
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import functional as F
from .encoder import Encoder

__all__ = [
    "HiddenRollout",
    "basis_by_lag",
    "hidden_rollout",
    "mm",
    "readout_ff",
    "readout_lag_weights",
    "readout_sample",
]


class HiddenRollout(NamedTuple):
    p: list[Tensor]  # per layer: presynaptic slow traces P [T, B, n_in_l]
    u: list[Tensor]  # per layer: membrane potentials U [T, B, H_l]
    s: list[Tensor]  # per layer: spikes S [T, B, H_l]
    z: Tensor  # readout input [T, B, n_readout_inputs] (last hidden layer's spikes, or x)


def mm(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``a @ b`` with operands cast to ``dtype`` (e.g. bfloat16), result in ``a``'s dtype."""
    if dtype is None or dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def _traces(x: Tensor, params: F.LIFParameters, differentiable: bool) -> Tensor:
    """P traces of a whole input sequence ``[T, B, N]`` (elementwise loop over time)."""
    q = torch.zeros_like(x[0])
    p = torch.zeros_like(x[0])
    a, b = params.alpha, params.beta
    if differentiable and x.requires_grad:
        out = []
        for x_t in x.unbind(0):
            q = b * q + (1 - b) * x_t
            p = a * p + (1 - a) * q
            out.append(p)
        return torch.stack(out)
    res = torch.empty_like(x)
    for t, x_t in enumerate(x.unbind(0)):
        q.mul_(b).add_(x_t, alpha=1 - b)
        p.mul_(a).add_(q, alpha=1 - a)
        res[t] = p
    return res


def hidden_rollout(
    encoder: Encoder, x: Tensor, *, matmul_dtype: torch.dtype | None = None, differentiable: bool = False
) -> HiddenRollout:
    """Run the deterministic hidden layers on ``x [T, B, n_inputs]`` from the zero state.

    ``differentiable=True`` keeps the autograd graph (surrogate gradients, for BPTT).
    """
    params = encoder.config.lif
    T, B = x.shape[:2]
    ps, us, ss = [], [], []
    z = x
    for layer in encoder.layers:
        p = _traces(z, params, differentiable)
        H = layer.out_features
        wp = mm(p.reshape(T * B, -1), layer.weight.t(), matmul_dtype).view(T, B, H) + layer.bias
        r = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        s = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        if differentiable:
            u_list, s_list = [], []
            for wp_t in wp.unbind(0):
                r = params.alpha_rp * r - s
                u = wp_t + r
                s = F.heaviside_surrogate(u, params.surrogate_scale)
                u_list.append(u)
                s_list.append(s)
            u_all, s_all = torch.stack(u_list), torch.stack(s_list)
        else:
            u_all = torch.empty_like(wp)
            s_all = torch.empty_like(wp)
            for t, wp_t in enumerate(wp.unbind(0)):
                r = params.alpha_rp * r - s
                u = wp_t + r
                s = (u > 0).to(x.dtype)
                u_all[t] = u
                s_all[t] = s
        ps.append(p)
        us.append(u_all)
        ss.append(s_all)
        z = s_all
    return HiddenRollout(ps, us, ss, z)


def basis_by_lag(encoder: Encoder) -> Tensor:
    """The feedforward bases ``[tau_e, K]``, row ``d`` = lag ``d``."""
    return encoder.ff_kernel.flip(0)


def readout_lag_weights(encoder: Encoder) -> Tensor:
    """Per-lag readout weights :math:`\\tilde W_d = \\sum_k \\phi_k(d) W_k` as ``[tau_e * N_Y, n_in]``."""
    w = encoder.readout_ff_weight  # [N_Y, n_in, K]
    lag = torch.einsum("dk,ijk->dij", basis_by_lag(encoder).to(w.dtype), w)
    return lag.reshape(-1, w.shape[1])


def readout_ff(encoder: Encoder, z: Tensor, *, matmul_dtype: torch.dtype | None = None) -> Tensor:
    """Feedforward readout potentials ``[T, B, N_Y]`` (without feedback and bias) from ``z [T, B, n_in]``.

    One GEMM onto the per-lag weights, :math:`G_{t,d} = \\tilde W_d z_t`, then a shift-and-add
    over the ``tau_e`` lags, :math:`u_t = \\sum_d G_{t-d,d}` (a GEMM onto the ``K`` bases
    followed by a temporal filter has fewer FLOPs but the filter is a slow tall-skinny GEMM).
    """
    T, B, n_in = z.shape
    ny, tau = encoder.config.n_readout, encoder.config.tau_e
    g = mm(z.reshape(T * B, n_in), readout_lag_weights(encoder).t(), matmul_dtype).view(T, B, tau, ny)
    u = g[:, :, 0].clone()
    for d in range(1, min(tau, T)):
        u[d:] += g[: T - d, :, d]
    return u


def readout_sample(
    encoder: Encoder, u_ff: Tensor, uniforms: Tensor, *, straight_through: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Add feedback and bias, sample the readout: returns ``(y, u, fb)`` each ``[T, R, N_Y]``.

    ``fb`` is the feedback trace :math:`(y * \\psi)_{t-1}`. With ``straight_through`` the spikes
    carry the gradient of ``sigmoid(u)`` (straight-through estimator) and the graph is kept.
    """
    T, R, ny = u_ff.shape
    fbm = encoder.config.fb_memory
    kern = encoder.fb_kernel.to(u_ff.dtype)
    hist = u_ff.new_zeros(R, fbm, ny)
    wfb, bias = encoder.readout_fb_weight, encoder.readout_bias
    ys, us, fbs = [], [], []
    for uff_t, uni_t in zip(u_ff.unbind(0), uniforms.unbind(0), strict=True):
        fb = torch.einsum("blo,l->bo", hist, kern)
        u = uff_t + wfb * fb + bias
        p = torch.sigmoid(u)
        y = (uni_t < p).to(u.dtype)
        if straight_through:
            y = y + p - p.detach()
        hist = torch.cat((hist[:, 1:], y.unsqueeze(1)), dim=1)
        ys.append(y)
        us.append(u)
        fbs.append(fb)
    return torch.stack(ys), torch.stack(us), torch.stack(fbs)
