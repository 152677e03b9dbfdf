"""Small random models and synthetic data for tests of this and other packages.

``tiny_naturalizer`` builds a random-weight :class:`~model.naturalizer.Naturalizer` whose
hidden layer actually spikes (random init), so stream tests see non-trivial output before any
trained checkpoint exists. ``drifting_blobs`` is the paper's predictive-coding input
(VDIB-REFERENCE.md "Drifting blobs") as uint8 frames, drawn by :mod:`model.blobs`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .blobs import blob_frames, blob_positions
from .encoder import EncoderConfig
from .naturalizer import Naturalizer, NaturalizerConfig

__all__ = ["tiny_naturalizer", "drifting_blobs", "random_spike_frames"]


def tiny_naturalizer(
    input_shape: tuple[int, int, int] = (2, 26, 26),
    hidden: tuple[int, ...] = (32,),
    n_readout: int = 16,
    tau_d: int = 8,
    decoder: str = "linear",
    image_shape: tuple[int, ...] = (28, 28),
    *,
    tau_e: int = 10,
    n_basis: int = 8,
    dt_us: int = 10_000,
    polarity: str = "split",
    mode: str = "presence",
    seed: int = 0,
    hidden_init_scale: float = 3.0,
    readout_bias: float = -1.0,
    **config_kwargs: Any,
) -> Naturalizer:
    """A small random-weight naturalizer in eval mode (seeded, CPU, float32).

    ``readout_bias`` shifts the readout potentials so that spiking is sparse but present.
    Extra keyword arguments go to :class:`NaturalizerConfig` (e.g. ``decoder_options``).
    """
    enc = EncoderConfig(
        n_inputs=math.prod(input_shape), hidden=hidden, n_readout=n_readout, tau_e=tau_e, n_basis=n_basis
    )
    cfg = NaturalizerConfig(
        encoder=enc,
        decoder=decoder,
        tau_d=tau_d,
        image_shape=image_shape,
        input_shape=input_shape,
        dt_us=dt_us,
        polarity=polarity,
        mode=mode,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Naturalizer(cfg, hidden_init="random", hidden_init_scale=hidden_init_scale)
        with torch.no_grad():
            model.encoder.readout_bias.fill_(readout_bias)
    return model.eval()


def random_spike_frames(
    n_steps: int, input_shape: tuple[int, ...] = (2, 26, 26), rate: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """Bernoulli(``rate``) uint8 spike frames ``[T, *input_shape]``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n_steps, *input_shape), generator=g) < rate).to(torch.uint8)


def drifting_blobs(
    n_steps: int,
    batch: int = 1,
    n_positions: int = 20,
    n_blobs: int = 2,
    seed: int = 0,
    width: float = 0.45,
) -> np.ndarray:
    """Drifting-blob spike frames ``uint8 [T, batch, n_positions]`` of :func:`model.blobs.blob_positions`
    (the paper's predictive-coding input, blobs OR-ed), seeded."""
    pos = blob_positions(n_steps, batch, n_positions, np.random.default_rng(seed), n_blobs, width)
    return blob_frames(pos, n_positions).astype(np.uint8)
