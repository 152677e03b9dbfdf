"""The VDIB loss (paper eq. 8-10) as pure functions.

.. math::
    \\mathcal{L}_{VDIB} = \\mathbb{E}\\big[\\ell_d(y, r) + \\beta\\,\\ell_e(y, x)\\big],\\quad
    \\ell_d = -\\log q_{w^d}(r \\,\\|\\, y),\\quad
    \\ell_e = \\log\\frac{p_{w^e}(y \\| x)}{q(y)}
            = \\sum_{t,i} y_{it}\\log\\frac{\\sigma(u_{it})}{r} + (1-y_{it})\\log\\frac{1-\\sigma(u_{it})}{1-r}

``ℓ_e`` is the *sampled* KL to the Bernoulli(r) prior (its expectation over y is the KL).
``reduction="mean"`` divides it by ``T * n_readout`` as the authors' code does (so their β
values carry over); ``"sum"`` is eq. 10 exactly. All functions return one value per sample.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KLReduction", "LossKind", "VDIBLoss", "decoder_loss", "sampled_kl", "analytic_kl", "vdib_loss"]

#: ``"bce"``: Bernoulli log-loss summed over pixels (images); ``"nll"``: cross-entropy over classes.
LossKind = Literal["bce", "nll"]
#: ℓ_e divided by ``T * n_readout`` (``"mean"``, the authors' code) or summed (``"sum"``, eq. 10).
KLReduction = Literal["mean", "sum"]


class VDIBLoss(NamedTuple):
    total: Tensor  # [B] ℓ_d + β ℓ_e
    decoder: Tensor  # [B] ℓ_d
    encoder: Tensor  # [B] ℓ_e


def decoder_loss(logits: Tensor, target: Tensor, kind: LossKind = "bce") -> Tensor:
    """Per-sample decoder log-loss :math:`\\ell_d = -\\log q(r | y)` from pre-sigmoid/softmax outputs.

    ``kind="bce"``: Bernoulli log-loss summed over pixels, ``logits [B, P]``, ``target [B, P]``
    in [0, 1] (any trailing shape is flattened). ``kind="nll"``: softmax cross-entropy,
    ``target [B]`` class indices.
    """
    if kind == "bce":
        t = target.reshape(logits.shape[0], -1).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits.reshape(t.shape), t, reduction="none").sum(1)
    if kind == "nll":
        return F.cross_entropy(logits, target.long(), reduction="none")
    raise ValueError(f"kind must be 'bce' or 'nll', got {kind!r}")


def _norm(y: Tensor, reduction: KLReduction) -> float:
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return 1.0 / (y.shape[0] * y.shape[-1])
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def sampled_kl(y: Tensor, u: Tensor, prior_rate: float, reduction: KLReduction = "mean") -> Tensor:
    """:math:`\\ell_e` per sample from spikes ``y [T, B, N]`` and potentials ``u [T, B, N]`` -> ``[B]``."""
    log_p1 = F.logsigmoid(u)
    log_p0 = F.logsigmoid(-u)
    lr1, lr0 = math.log(prior_rate), math.log1p(-prior_rate)
    terms = y * (log_p1 - lr1) + (1 - y) * (log_p0 - lr0)
    return terms.sum(dim=(0, 2)) * _norm(y, reduction)


def analytic_kl(u: Tensor, prior_rate: float, reduction: KLReduction = "mean") -> Tensor:
    """:math:`\\sum_{t,i} KL(\\mathrm{Bern}(\\sigma(u_{it})) \\| \\mathrm{Bern}(r))` per sample -> ``[B]``."""
    p = torch.sigmoid(u)
    lr1, lr0 = math.log(prior_rate), math.log1p(-prior_rate)
    terms = p * (F.logsigmoid(u) - lr1) + (1 - p) * (F.logsigmoid(-u) - lr0)
    return terms.sum(dim=(0, 2)) * _norm(u, reduction)


def vdib_loss(
    logits: Tensor,
    target: Tensor,
    y: Tensor,
    u: Tensor,
    prior_rate: float,
    beta: float,
    *,
    kind: LossKind = "bce",
    kl: Literal["sampled", "analytic"] = "sampled",
    reduction: KLReduction = "mean",
) -> VDIBLoss:
    """Single-sample estimate of eq. 10 per input: ``(ℓ_d + β ℓ_e, ℓ_d, ℓ_e)``, each ``[B]``.

    ``kl="analytic"`` replaces the sampled ℓ_e by its expectation over y (lower variance; used
    by the BPTT rule).
    """
    ld = decoder_loss(logits, target, kind)
    le = sampled_kl(y, u, prior_rate, reduction) if kl == "sampled" else analytic_kl(u, prior_rate, reduction)
    return VDIBLoss(ld + beta * le, ld, le)
