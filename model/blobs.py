"""The paper's predictive-coding task: two drifting Gaussian blobs on a ring of input neurons.

The one generator of drifting blobs in the project (VDIB-REFERENCE.md "Drifting blobs"):
``training.predictive`` trains on :func:`drifting_blobs`, and ``model.testing.drifting_blobs``
gives the same frames as uint8 arrays for tests. Targets are the classes of
:func:`blob_class_table`: every 1-hot and 2-hot pattern (210 for 20 inputs).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["blob_class_table", "blob_frames", "blob_positions", "class_patterns", "drifting_blobs"]


def blob_positions(
    T: int,
    batch: int,
    n_inputs: int = 20,
    rng: np.random.Generator | None = None,
    n_blobs: int = 2,
    width: float = 0.45,
) -> np.ndarray:
    r"""Bin indices ``int64 [T, B, n_blobs]`` of independent drifting Gaussian blobs (Chalk et al. 2017).

    Per blob, with one :math:`\eta_t \sim \mathcal N(0, 1)` shared by v and A:
    :math:`\theta_t = \theta_{t-1} + v_{t-1}`, :math:`v_t = 0.9 v_{t-1} - 0.14 \eta_t`,
    :math:`A_t = 0.99 A_{t-1} + 0.01 \eta_t`, position :math:`A_t \cdot \mathcal N(\theta_t, \mathrm{width})`
    wrapped to [-π, π] and assigned to the nearest of ``n_inputs`` bin starts
    ``-π + 2πk/n_inputs`` (the authors' convention); A_0 = 0.5, v_0 = 1, θ_0 ~ U(-π, π).
    """
    if T < 0 or batch < 0 or n_inputs < 1 or n_blobs < 1:
        raise ValueError(
            f"need T, batch >= 0 and n_inputs, n_blobs >= 1, got {T}, {batch}, {n_inputs}, {n_blobs}"
        )
    rng = rng if rng is not None else np.random.default_rng()
    shape = (batch, n_blobs)
    bins = -np.pi + 2 * np.pi * np.arange(n_inputs) / n_inputs
    theta = rng.uniform(-np.pi, np.pi, shape)
    v = np.ones(shape)
    a = np.full(shape, 0.5)
    out = np.empty((T, batch, n_blobs), dtype=np.int64)
    for t in range(T):
        if t > 0:
            eta = rng.standard_normal(shape)
            theta = theta + v
            v = 0.9 * v - 0.14 * eta
            a = 0.99 * a + 0.01 * eta
        pos = a * rng.normal(theta, width)
        pos = np.arctan2(np.sin(pos), np.cos(pos))
        out[t] = np.abs(bins[None, None, :] - pos[..., None]).argmin(-1)
    return out


def blob_frames(positions: np.ndarray, n_inputs: int = 20) -> np.ndarray:
    """``float32 [T, B, n_inputs]`` spike frames: a 1 at each blob's bin, blobs OR-ed."""
    T, batch, n_blobs = positions.shape
    x = np.zeros((T, batch, n_inputs), dtype=np.float32)
    tt, bb = np.meshgrid(np.arange(T), np.arange(batch), indexing="ij")
    for k in range(n_blobs):
        x[tt, bb, positions[..., k]] = 1.0
    return x


def blob_class_table(n_inputs: int = 20) -> np.ndarray:
    """[n, n] int table: the class of the pattern with blobs at (i, j), i <= j first.

    Classes enumerate all 1-hot (i == j) and 2-hot patterns: n(n+1)/2 = 210 for n = 20.
    """
    table = np.full((n_inputs, n_inputs), -1, dtype=np.int64)
    k = 0
    for i in range(n_inputs):
        for j in range(i, n_inputs):
            table[i, j] = table[j, i] = k
            k += 1
    return table


def class_patterns(n_inputs: int = 20) -> torch.Tensor:
    """``[n_classes, n_inputs]`` binary pattern of each class of :func:`blob_class_table`."""
    table = blob_class_table(n_inputs)
    pats = torch.zeros(int(table.max()) + 1, n_inputs)
    for i in range(n_inputs):
        for j in range(i, n_inputs):
            pats[table[i, j], i] = 1
            pats[table[i, j], j] = 1
    return pats


def drifting_blobs(
    T: int, batch: int, lag: int = 0, n_inputs: int = 20, rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive-coding batch: inputs ``float32 [T, B, n_inputs]`` and target classes ``int64 [T, B]``.

    The target at step t is the class of the input pattern at step ``t + lag`` (lag < 0: the
    past, lag > 0: the future). The sequence is generated ``|lag|`` steps longer so every
    target exists.
    """
    pos = blob_positions(T + abs(lag), batch, n_inputs, rng)
    x = blob_frames(pos, n_inputs)
    cls = blob_class_table(n_inputs)[pos[..., 0], pos[..., 1]]
    if lag >= 0:
        xs, ys = x[:T], cls[lag : lag + T]
    else:
        xs, ys = x[-lag:], cls[:T]
    return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys))
