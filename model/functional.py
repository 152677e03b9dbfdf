"""Neuron math as pure step functions with explicit NamedTuple states (STYLE.md 1 and 2).

Two neuron types make up the VDIB encoder (paper sec. 5, VDIB-REFERENCE.md "Encoder SNN"):

* hidden layers: deterministic LIF with DECOLLE-style exponential traces,

  .. math::
      Q_t = \\beta Q_{t-1} + (1-\\beta) S^{in}_t,\\quad
      P_t = \\alpha P_{t-1} + (1-\\alpha) Q_t,\\quad
      R_t = \\alpha_{rp} R_{t-1} - S_{t-1},\\quad
      U_t = W P_t + R_t + b,\\quad S_t = \\Theta(U_t)

  The traces are linear in the input, so the step keeps them *after* the synapses,
  :math:`WQ_t` and :math:`WP_t` (``[B, n_out]``): the input current :math:`W S^{in}_t` of a
  sparse binary input is then a gather of the active columns (event-driven), and the state is
  smaller. The training path (:mod:`model.rollout`) keeps the presynaptic :math:`P_t`, which
  e-prop needs; both agree to float rounding.

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
  feedback basis :math:`\\psi` over lags ``1 .. fb_memory``. With per-lag weights
  :math:`\\tilde W_d = \\sum_k \\phi_k(d) W_k` the feedforward part is
  :math:`\\sum_d \\tilde W_d z_{t-d}`; the step adds :math:`\\tilde W_d z_t` to a buffer of
  *pending* potentials for steps ``t .. t + tau_e - 1`` (state ``[B, tau_e, n_out]``), again a
  gather of active columns for sparse spikes.

Every function here is pure: state goes in and the new state comes out. Histories are stored
oldest first, so filter kernels are stored *aligned with the history* (``kernel[i]`` weights
history slot ``i``, which holds lag ``len - 1 - i``); :func:`history_kernel` makes them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

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
    "lif_dynamics",
    "lif_traces",
    "raised_cosine_basis",
    "input_current",
    "lag_weights",
    "srm_init_state",
    "srm_readout_step",
    "surrogate_derivative",
]


class LIFParameters(NamedTuple):
    """Constants of the hidden LIF neurons (VDIB-REFERENCE.md, DECOLLE)."""

    alpha: float = 0.9  # slow (membrane) trace decay per step
    beta: float = 0.85  # fast (synaptic) trace decay per step
    alpha_rp: float = 0.65  # refractory trace decay per step
    surrogate_scale: float = 1.0  # Theta'(u) := s * sigma'(s * u)


class LIFState(NamedTuple):
    """State of one hidden LIF layer; all tensors are ``[B, n_out]``."""

    q: Tensor  # fast synaptic trace after the weights, W Q_t
    p: Tensor  # slow synaptic trace after the weights, W P_t
    r: Tensor  # refractory trace
    s: Tensor  # previous output spikes


class SRMState(NamedTuple):
    """State of the stochastic SRM readout."""

    pending: Tensor  # [B, tau_e, n_out]: feedforward potential already owed to steps t .. t+tau_e-1
    fb_hist: Tensor  # [B, fb_memory, n_out]: own spikes of the last fb_memory steps, oldest first


class _HeavisideSigmoid(torch.autograd.Function):
    """Forward ``[u > 0]``; backward the sigmoid surrogate ``s * sigma'(s * u)``."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.scale = scale
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (u,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.scale * u)
        return grad * ctx.scale * sg * (1 - sg), None


def heaviside_surrogate(u: Tensor, scale: float = 1.0) -> Tensor:
    """:math:`\\Theta(u) = [u > 0]` with the surrogate gradient :math:`s\\,\\sigma'(s u)`."""
    if torch.is_grad_enabled() and u.requires_grad:
        return cast(Tensor, _HeavisideSigmoid.apply(u, scale))  # type: ignore[no-untyped-call]
    return (u > 0).to(u.dtype)


def surrogate_derivative(u: Tensor, scale: float = 1.0) -> Tensor:
    """:math:`\\Theta'(u) \\approx s\\,\\sigma(su)(1-\\sigma(su))` (eq. 22 with a sigmoid surrogate)."""
    sg = torch.sigmoid(scale * u)
    return scale * sg * (1 - sg)


def lif_init_state(
    batch: int, n_out: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> LIFState:
    """All-zero LIF state (no past input, no past spike)."""
    z = torch.zeros(batch, n_out, device=device, dtype=dtype)
    return LIFState(z, z.clone(), z.clone(), z.clone())


def lif_traces(x: Tensor, q: Tensor, p: Tensor, params: LIFParameters) -> tuple[Tensor, Tensor]:
    """Traces: :math:`Q' = \\beta Q + (1-\\beta)x`, :math:`P' = \\alpha P + (1-\\alpha)Q'`."""
    q = params.beta * q + (1.0 - params.beta) * x
    p = params.alpha * p + (1.0 - params.alpha) * q
    return q, p


def input_current(x: Tensor, weight_t: Tensor, *, event_driven: bool | str = False) -> Tensor:
    """:math:`x W^T` for ``x [B, n_in]`` and ``weight_t = W^T [n_in, n_out]``.

    ``event_driven=True`` multiplies only the input columns that are non-zero in some row
    (``x[:, active] @ weight_t[active]``): far cheaper than the full GEMM when few inputs are
    active, equal up to float rounding, and correct for any input values.
    ``event_driven="rows"`` sums, for each row separately, the weight rows of its own non-zero
    inputs (one ``embedding_bag``): cheaper again when the rows are sparse but active in
    different columns (independent streams batched together, whose union of active columns is
    most of them), and a row's result does not depend on the other rows of the batch.
    """
    if not event_driven:
        return x @ weight_t
    if event_driven == "rows":
        nz = x.nonzero()
        rows, cols = nz[:, 0], nz[:, 1]
        vals = x[rows, cols]
        offsets = torch.searchsorted(rows, torch.arange(x.shape[0], device=x.device))
        weights = None if bool((vals == 1).all()) else vals.to(weight_t.dtype)
        return torch.nn.functional.embedding_bag(
            cols, weight_t, offsets, mode="sum", per_sample_weights=weights
        )
    active = x.any(0).nonzero().squeeze(1)
    return x.index_select(1, active) @ weight_t.index_select(0, active)


def lif_step(
    x: Tensor,
    state: LIFState,
    weight: Tensor,
    bias: Tensor,
    params: LIFParameters = LIFParameters(),
    *,
    weight_t: Tensor | None = None,
    event_driven: bool | str = False,
) -> tuple[Tensor, LIFState, Tensor]:
    """One step of a hidden LIF layer.

    Args:
        x: input spikes ``[B, n_in]`` (0/1, or any real input).
        state: :class:`LIFState` of the previous step.
        weight: ``[n_out, n_in]``; bias: ``[n_out]``; ``weight_t``: optional cached ``weight.T``
        (contiguous, for the event-driven gather).

    Returns:
        ``(s, new_state, u)``: spikes :math:`S_t = \\Theta(U_t)` ``[B, n_out]``, the new state
        and the membrane potential :math:`U_t = W P_t + R_t + b`.
    """
    wt = weight.t() if weight_t is None else weight_t
    return lif_dynamics(input_current(x, wt, event_driven=event_driven), state, bias, params)


def lif_dynamics(
    i: Tensor, state: LIFState, bias: Tensor | float, params: LIFParameters = LIFParameters()
) -> tuple[Tensor, LIFState, Tensor]:
    """The LIF update for a given input current ``i`` (any shape, e.g. ``[B, n]`` or a conv's
    ``[B, C, H, W]``): traces, refractory trace, :math:`U_t = P_t + R_t + b`,
    :math:`S_t = \\Theta(U_t)`. :func:`lif_step` is this with :math:`i = W x_t`."""
    q, p = lif_traces(i, state.q, state.p, params)
    r = params.alpha_rp * state.r - state.s
    u = p + r + bias
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
    # always computed on the CPU (also under a ``torch.device("meta")`` context)
    d = torch.arange(length, dtype=torch.float64, device="cpu")
    if n_basis == 1:
        basis = 0.5 * (1 + torch.cos(math.pi * d / length))
        return basis[:, None].float()
    x = torch.log1p(d)
    span = float(x[-1]) if length > 1 else 1.0
    delta = span / (n_basis - 1)
    centres = torch.linspace(0.0, span, n_basis, dtype=torch.float64, device="cpu")
    arg = (math.pi * (x[:, None] - centres[None, :]) / (2 * delta)).clamp(-math.pi, math.pi)
    return (0.5 * (1 + torch.cos(arg))).float()


def history_kernel(basis_by_lag: Tensor) -> Tensor:
    """Flip a ``[L, K]`` by-lag basis so that row ``i`` weights history slot ``i`` (oldest first)."""
    return basis_by_lag.flip(0).contiguous()


def lag_weights(ff_weight: Tensor, basis_by_lag: Tensor) -> Tensor:
    """Per-lag readout weights :math:`\\tilde W_d = \\sum_k \\phi_k(d) W_k`, transposed: ``[n_in, tau_e * n_out]``.

    ``ff_weight [n_out, n_in, K]``, ``basis_by_lag [tau_e, K]`` (row d = lag d). Column
    ``d * n_out + i`` holds :math:`\\tilde W_d[i, :]`.
    """
    lag = torch.einsum("dk,ijk->jdi", basis_by_lag.to(ff_weight.dtype), ff_weight)
    return lag.reshape(ff_weight.shape[1], -1)


def srm_init_state(
    batch: int,
    n_out: int,
    tau_e: int,
    fb_memory: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SRMState:
    """All-zero SRM readout state (no spike in the filter memories)."""
    return SRMState(
        torch.zeros(batch, tau_e, n_out, device=device, dtype=dtype),
        torch.zeros(batch, fb_memory, n_out, device=device, dtype=dtype),
    )


def srm_readout_step(
    z: Tensor,
    state: SRMState,
    lag_weight_t: Tensor,
    fb_weight: Tensor,
    bias: Tensor,
    fb_kernel: Tensor,
    uniforms: Tensor,
    *,
    event_driven: bool | str = False,
) -> tuple[Tensor, SRMState, Tensor]:
    """One step of the stochastic-threshold SRM readout (eq. 15, 17).

    Args:
        z: presynaptic spikes at this step ``[B, n_in]``.
        state: :class:`SRMState` of the previous step.
        lag_weight_t: :func:`lag_weights` ``[n_in, tau_e * n_out]``; fb_weight, bias: ``[n_out]``.
        fb_kernel: ``[fb_memory]`` aligned with the feedback history (:func:`history_kernel`).
        uniforms: ``[B, n_out]`` in [0, 1); the spike is ``uniforms < sigmoid(u)``.

    Returns:
        ``(y, new_state, u)``: spikes (0/1 in ``z``'s dtype), the new state, the potential
        :math:`u_t = \\sum_{d} \\tilde W_d z_{t-d} + w_{fb} (y * \\psi)_{t-1} + b`.
    """
    B, tau, n_out = state.pending.shape
    g = input_current(z, lag_weight_t, event_driven=event_driven).view(B, tau, n_out)
    # what earlier inputs owe to steps t .. t+tau-2, plus nothing yet for t+tau-1
    pending = torch.nn.functional.pad(state.pending[:, 1:], (0, 0, 0, 1)) + g
    fb = torch.matmul(fb_kernel, state.fb_hist)  # [L] @ [B, L, n_out] -> [B, n_out]
    u = pending[:, 0] + fb_weight * fb + bias
    y = (uniforms < torch.sigmoid(u)).to(z.dtype)
    fb_hist = torch.cat((state.fb_hist[:, 1:], y.unsqueeze(1)), dim=1)
    return y, SRMState(pending, fb_hist), u
