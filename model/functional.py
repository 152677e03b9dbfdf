"""Neuron math as pure step functions with explicit NamedTuple states (STYLE.md 1 and 2).

Two neuron types make up the VDIB encoder (paper sec. 5, VDIB-REFERENCE.md "Encoder SNN"):

* hidden layers: deterministic LIF with DECOLLE-style exponential traces,

  .. math::
      Q_t = \\beta Q_{t-1} + (1-\\beta) S^{in}_t,\\quad
      P_t = \\alpha P_{t-1} + (1-\\alpha) Q_t,\\quad
      R_t = \\alpha_{rp} R_{t-1} - S_{t-1},\\quad
      U_t = W P_t + R_t + b,\\quad S_t = \\Theta(U_t)

  with :math:`\\alpha = 0.9`, :math:`\\beta = 0.85`, :math:`\\alpha_{rp} = 0.65` (dimensionless
  per-step decay factors; one step = one time bin ``dt``) and :math:`\\Theta(u) = [u > 0]` (eq. 16).
  The surrogate derivative is :math:`\\sigma'(U)` (scaled by ``surrogate_scale``).

* the readout layer: a stochastic-threshold SRM (eq. 15, 17),

  .. math::
      u_t = \\sum_{k} W_k \\,(z * \\phi_k)_t + w_{fb}\\,(y * \\psi)_{t-1} + b,\\qquad
      y_t = [U_t < \\sigma(u_t)],\\ U_t \\sim \\mathcal{U}(0, 1)

  i.e. :math:`y_t \\sim \\mathrm{Bernoulli}(\\sigma(u_t))`, with ``K`` raised-cosine feedforward
  bases :math:`\\phi_k` on a log time axis over lags ``0 .. tau_e-1`` (the readout at step t sees
  the hidden spikes of steps ``t-tau_e+1 .. t``, matching eq. 3's :math:`x^t_{t-\\tau_e}`) and one
  feedback basis :math:`\\psi` over lags ``1 .. fb_memory``.

Every function here is pure: state goes in and the new state comes out. Histories are stored
oldest first, so the filter kernels are stored *aligned with the history* (``kernel[i]`` weights
history slot ``i``, which holds lag ``len - 1 - i``); :func:`history_kernel` makes them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LIFParameters",
    "LIFState",
    "SRMState",
    "heaviside_surrogate",
    "history_kernel",
    "lif_init_state",
    "lif_step",
    "lif_traces",
    "raised_cosine_basis",
    "srm_init_state",
    "srm_readout_step",
    "srm_ff_trace",
]


class LIFParameters(NamedTuple):
    """Constants of the hidden LIF neurons (VDIB-REFERENCE.md, DECOLLE)."""

    alpha: float = 0.9  # slow (membrane) trace decay per step
    beta: float = 0.85  # fast (synaptic) trace decay per step
    alpha_rp: float = 0.65  # refractory trace decay per step
    surrogate_scale: float = 1.0  # Theta'(u) := s * sigma'(s * u)


class LIFState(NamedTuple):
    """State of one hidden LIF layer; all tensors are ``[B, n]``."""

    q: Tensor  # fast presynaptic trace, [B, n_in]
    p: Tensor  # slow presynaptic trace, [B, n_in]
    r: Tensor  # refractory trace, [B, n_out]
    s: Tensor  # previous output spikes, [B, n_out]


class SRMState(NamedTuple):
    """State of the stochastic SRM readout: the spike histories its filters see (oldest first)."""

    ff_hist: Tensor  # [B, tau_e, n_in]: presynaptic spikes of the last tau_e steps
    fb_hist: Tensor  # [B, fb_memory, n_out]: own spikes of the last fb_memory steps


class _HeavisideSigmoid(torch.autograd.Function):
    """Forward ``[u > 0]``; backward the sigmoid surrogate ``s * sigma'(s * u)``."""

    @staticmethod
    def forward(ctx, u: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.scale = scale
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.scale * u)
        return grad * ctx.scale * sg * (1 - sg), None


def heaviside_surrogate(u: Tensor, scale: float = 1.0) -> Tensor:
    """:math:`\\Theta(u) = [u > 0]` with the surrogate gradient :math:`s\\,\\sigma'(s u)`."""
    if torch.is_grad_enabled() and u.requires_grad:
        return _HeavisideSigmoid.apply(u, scale)
    return (u > 0).to(u.dtype)


def surrogate_derivative(u: Tensor, scale: float = 1.0) -> Tensor:
    """:math:`\\Theta'(u) \\approx s\\,\\sigma(su)(1-\\sigma(su))` (eq. 22 with a sigmoid surrogate)."""
    sg = torch.sigmoid(scale * u)
    return scale * sg * (1 - sg)


def lif_init_state(
    batch: int, n_in: int, n_out: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> LIFState:
    """All-zero LIF state (no past input, no past spike)."""
    z_in = torch.zeros(batch, n_in, device=device, dtype=dtype)
    z_out = torch.zeros(batch, n_out, device=device, dtype=dtype)
    return LIFState(z_in, z_in.clone(), z_out, z_out.clone())


def lif_traces(x: Tensor, q: Tensor, p: Tensor, params: LIFParameters) -> tuple[Tensor, Tensor]:
    """Presynaptic traces: :math:`Q' = \\beta Q + (1-\\beta)x`, :math:`P' = \\alpha P + (1-\\alpha)Q'`."""
    q = params.beta * q + (1.0 - params.beta) * x
    p = params.alpha * p + (1.0 - params.alpha) * q
    return q, p


def lif_step(
    x: Tensor, state: LIFState, weight: Tensor, bias: Tensor, params: LIFParameters = LIFParameters()
) -> tuple[Tensor, LIFState, Tensor]:
    """One step of a hidden LIF layer.

    Args:
        x: input spikes ``[B, n_in]`` (0/1, or any real input).
        state: :class:`LIFState` of the previous step.
        weight: ``[n_out, n_in]``; bias: ``[n_out]``.

    Returns:
        ``(s, new_state, u)``: spikes :math:`S_t = \\Theta(U_t)` ``[B, n_out]``, the new state
        and the membrane potential :math:`U_t = W P_t + R_t + b`.
    """
    q, p = lif_traces(x, state.q, state.p, params)
    r = params.alpha_rp * state.r - state.s
    u = torch.addmm(bias, p, weight.t()) + r
    s = heaviside_surrogate(u, params.surrogate_scale)
    return s, LIFState(q, p, r, s), u


def raised_cosine_basis(n_basis: int, length: int, first_lag: int = 0) -> Tensor:
    """Raised-cosine bases on a log time axis (Pillow et al. 2008), ``[length, n_basis]`` by lag.

    Row ``d`` is lag ``first_lag + d``. With :math:`x_d = \\log(1 + d)` and centres
    :math:`c_k` evenly spaced (spacing :math:`\\Delta`) between :math:`x_0` and :math:`x_{L-1}`,

    .. math:: \\phi_k(d) = \\tfrac12\\left(1 + \\cos\\left(\\mathrm{clip}\\left(
              \\tfrac{\\pi (x_d - c_k)}{2\\Delta}, -\\pi, \\pi\\right)\\right)\\right)

    (Pillow's centre spacing of a quarter period): every basis overlaps its neighbours, no basis
    is empty even when ``K`` is close to ``length``, early lags get narrow bases and late lags
    wide ones. ``n_basis == 1`` gives one half cosine
    that decays from 1 at the first lag to 0 one step past the last.
    """
    if n_basis < 1 or length < 1:
        raise ValueError(f"n_basis and length must be >= 1, got {n_basis}, {length}")
    d = torch.arange(length, dtype=torch.float64)
    if n_basis == 1:
        basis = 0.5 * (1 + torch.cos(math.pi * d / length))
        return basis[:, None].float()
    x = torch.log1p(d)
    span = float(x[-1]) if length > 1 else 1.0
    delta = span / (n_basis - 1)
    centres = torch.linspace(0.0, span, n_basis, dtype=torch.float64)
    arg = (math.pi * (x[:, None] - centres[None, :]) / (2 * delta)).clamp(-math.pi, math.pi)
    return (0.5 * (1 + torch.cos(arg))).float()


def history_kernel(basis_by_lag: Tensor) -> Tensor:
    """Flip a ``[L, K]`` by-lag basis so that row ``i`` weights history slot ``i`` (oldest first)."""
    return basis_by_lag.flip(0).contiguous()


def srm_init_state(
    batch: int,
    n_in: int,
    n_out: int,
    tau_e: int,
    fb_memory: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SRMState:
    """All-zero SRM readout state (no spike in the filter memories)."""
    return SRMState(
        torch.zeros(batch, tau_e, n_in, device=device, dtype=dtype),
        torch.zeros(batch, fb_memory, n_out, device=device, dtype=dtype),
    )


def srm_ff_trace(ff_hist: Tensor, ff_kernel: Tensor) -> Tensor:
    """Feedforward traces :math:`(z * \\phi_k)_t` ``[B, n_in, K]`` from a ``[B, L, n_in]`` history."""
    return torch.einsum("bln,lk->bnk", ff_hist, ff_kernel)


def srm_readout_step(
    z: Tensor,
    state: SRMState,
    ff_weight: Tensor,
    fb_weight: Tensor,
    bias: Tensor,
    ff_kernel: Tensor,
    fb_kernel: Tensor,
    uniforms: Tensor,
) -> tuple[Tensor, SRMState, Tensor]:
    """One step of the stochastic-threshold SRM readout (eq. 15, 17).

    Args:
        z: presynaptic spikes at this step ``[B, n_in]``.
        state: :class:`SRMState` of the previous step.
        ff_weight: ``[n_out, n_in, K]``; fb_weight: ``[n_out]``; bias: ``[n_out]``.
        ff_kernel: ``[tau_e, K]`` aligned with the history (:func:`history_kernel`).
        fb_kernel: ``[fb_memory]`` aligned with the feedback history.
        uniforms: ``[B, n_out]`` in [0, 1); the spike is ``uniforms < sigmoid(u)``.

    Returns:
        ``(y, new_state, u)``: spikes (0/1 in ``z``'s dtype), the new state, the potential.
    """
    ff_hist = torch.cat((state.ff_hist[:, 1:], z.unsqueeze(1)), dim=1)
    trace = srm_ff_trace(ff_hist, ff_kernel).reshape(z.shape[0], -1)
    fb = torch.einsum("blo,l->bo", state.fb_hist, fb_kernel)
    u = torch.addmm(bias, trace, ff_weight.reshape(ff_weight.shape[0], -1).t()) + fb_weight * fb
    y = (uniforms < torch.sigmoid(u)).to(z.dtype)
    fb_hist = torch.cat((state.fb_hist[:, 1:], y.unsqueeze(1)), dim=1)
    return y, SRMState(ff_hist, fb_hist), u
