"""A straightforward per-sample, per-time-step implementation of the ``vdib`` encoder eligibilities.

This is how the authors' code runs (one sample at a time, eligibilities accumulated as outer
products at every step). It exists as a test oracle for the vectorised
:func:`model.rules.encoder_gradients` and as the baseline of ``bench/model.py``; do not train
with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F
from .encoder import Encoder


@torch.no_grad()
def reference_encoder_gradients(
    encoder: Encoder, x: Tensor, uniforms: Tensor, weights: Tensor, dfa: list[Tensor]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """:math:`\\sum_b w_b g_b` computed sample by sample and step by step.

    Args:
        x: ``[T, B, n_inputs]``; uniforms: ``[T, B, N_Y]``; weights: ``[B]``; dfa: per hidden
        layer ``[H_l, N_Y]``.

    Returns:
        ``(grads, y [T, B, N_Y], u [T, B, N_Y])``.
    """
    T, B = x.shape[:2]
    lif = encoder.config.lif
    scale = lif.surrogate_scale
    params = dict(encoder.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    ys = torch.zeros_like(uniforms)
    us = torch.zeros_like(uniforms)
    tau = encoder.config.tau_e
    n_ro_in = encoder.config.readout_inputs
    lag_t = F.lag_weights(
        encoder.readout_ff_weight, encoder.ff_kernel.flip(0)
    )  # once per call, as a cache would
    for b in range(B):
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        state = encoder.init_state(1, x.device, x.dtype)
        # presynaptic traces (e-prop eligibility, eq. 22) and the readout's input history (eq. 19)
        pre = [
            (
                torch.zeros(1, layer.in_features, dtype=x.dtype),
                torch.zeros(1, layer.in_features, dtype=x.dtype),
            )
            for layer in encoder.layers
        ]
        hist = torch.zeros(tau, n_ro_in, dtype=x.dtype)
        for t in range(T):
            z = x[t, b : b + 1]
            hidden_states = []
            hidden_info = []
            for li, (layer, st) in enumerate(zip(encoder.layers, state.hidden, strict=True)):
                q_pre, p_pre = F.lif_traces(z, pre[li][0], pre[li][1], lif)
                pre[li] = (q_pre, p_pre)
                z, st2, u_h = F.lif_step(z, st, layer.weight, layer.bias, lif)
                hidden_states.append(st2)
                hidden_info.append((p_pre[0], u_h[0]))
            ro = state.readout
            fb = torch.einsum("blo,l->bo", ro.fb_hist, encoder.fb_kernel)[0]
            y, ro2, u = F.srm_readout_step(
                z,
                ro,
                lag_t,
                encoder.readout_fb_weight,
                encoder.readout_bias,
                encoder.fb_kernel,
                uniforms[t, b : b + 1],
            )
            hist = torch.cat((hist[1:], z), dim=0)
            e = y[0] - torch.sigmoid(u[0])  # eq. 19 error
            trace = hist.t() @ encoder.ff_kernel  # [n_in, K]: (z * phi_k)_t
            acc["readout_ff_weight"] += e[:, None, None] * trace[None]
            acc["readout_fb_weight"] += e * fb
            acc["readout_bias"] += e
            for li, ((p_pre, u_h), b_mat) in enumerate(zip(hidden_info, dfa, strict=True)):
                sg = torch.sigmoid(scale * u_h)
                h = (b_mat @ e) * (scale * sg * (1 - sg))  # eq. 21 x eq. 22 surrogate
                acc[f"hidden.{li}.weight"] += torch.outer(h, p_pre)
                acc[f"hidden.{li}.bias"] += h
            ys[t, b], us[t, b] = y[0], u[0]
            state = type(state)(tuple(hidden_states), ro2)
        for n in total:
            total[n] += weights[b] * acc[n]
    return total, ys, us
