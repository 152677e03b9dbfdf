"""Encoder + decoder ("naturalizer"): spike frames in, natural images out.

:class:`Naturalizer` is the shared, stateless model; :class:`OnlineNaturalizer` owns one
stream's (or a fixed batch of streams') state: the encoder state, a ring buffer of the last
``tau_d`` readout spike vectors and the generator the readout samples from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .decoders import Decoder, build_decoder
from .encoder import Encoder, EncoderConfig, EncoderState

__all__ = ["NaturalizerConfig", "Naturalizer", "OnlineNaturalizer", "sliding_windows"]


@dataclass(frozen=True)
class NaturalizerConfig:
    """Everything needed to rebuild a :class:`Naturalizer` and to feed it (JSON via :meth:`to_dict`).

    Attributes:
        encoder: the :class:`EncoderConfig`; ``encoder.n_inputs`` must equal ``C * H * W``.
        decoder: registry name (:func:`model.decoders.decoder_names`).
        tau_d: decoder window in steps.
        image_shape: output shape, e.g. ``(28, 28)``; ``(n_classes,)`` with ``output="logits"``.
        input_shape: spike-frame shape ``(C, H, W)`` as produced by ``events.bin_events``.
        dt_us: bin width in µs the model was trained with.
        polarity: ``"split"``, ``"merge"`` or ``"signed"`` (events.BinSpec).
        mode: ``"presence"`` or ``"count"`` (events.BinSpec).
        preprocessing: free JSON dict (ROI policy, pooling, sensor size, ...).
        decoder_options: extra keyword arguments of the decoder (e.g. ``{"hidden": 512}``).
        output: ``"image"`` (sigmoid outputs in [0, 1]) or ``"logits"``.
    """

    encoder: EncoderConfig
    decoder: str = "mlp"
    tau_d: int = 30
    image_shape: tuple[int, ...] = (28, 28)
    input_shape: tuple[int, int, int] = (2, 26, 26)
    dt_us: int = 10_000
    polarity: str = "split"
    mode: str = "presence"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    decoder_options: dict[str, Any] = field(default_factory=dict)
    output: str = "image"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if math.prod(self.input_shape) != self.encoder.n_inputs:
            raise ValueError(
                f"input_shape {self.input_shape} has {math.prod(self.input_shape)} values but the "
                f"encoder takes {self.encoder.n_inputs} inputs"
            )
        if self.tau_d < 1:
            raise ValueError(f"tau_d must be >= 1, got {self.tau_d}")
        if not self.image_shape or any(s < 1 for s in self.image_shape):
            raise ValueError(f"bad image_shape {self.image_shape}")
        if self.dt_us < 1:
            raise ValueError(f"dt_us must be >= 1, got {self.dt_us}")

    @property
    def out_features(self) -> int:
        return math.prod(self.image_shape)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["encoder"] = self.encoder.to_dict()
        d["image_shape"] = list(self.image_shape)
        d["input_shape"] = list(self.input_shape)
        d["preprocessing"] = dict(self.preprocessing)
        d["decoder_options"] = dict(self.decoder_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NaturalizerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown naturalizer config keys: {sorted(unknown)}")
        if "encoder" not in d or not isinstance(d["encoder"], dict):
            raise ValueError("naturalizer config needs an 'encoder' object")
        d = dict(d)
        d["encoder"] = EncoderConfig.from_dict(d["encoder"])
        for key in ("image_shape", "input_shape"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def sliding_windows(y: Tensor, tau_d: int) -> Tensor:
    """All decoder windows of a sequence: ``y [T, B, N] -> [T, B, tau_d, N]`` (zeros before t = 0).

    Window ``t`` holds steps ``t - tau_d + 1 .. t`` oldest first, as :class:`OnlineNaturalizer`
    sees it after pushing frame ``t``.
    """
    padded = torch.cat((y.new_zeros((tau_d - 1, *y.shape[1:])), y), dim=0)  # [T + tau_d - 1, B, N]
    return padded.unfold(0, tau_d, 1).permute(0, 1, 3, 2)  # [T, B, N, tau_d] -> [T, B, tau_d, N]


class Naturalizer(nn.Module):
    """The encoder SNN and the decoder ANN of one model (``.encoder``, ``.decoder``, ``.config``)."""

    def __init__(
        self, config: NaturalizerConfig, *, hidden_init: str = "zero", hidden_init_scale: float = 1.0
    ):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, hidden_init=hidden_init, hidden_init_scale=hidden_init_scale)
        self.decoder: Decoder = build_decoder(
            config.decoder,
            config.encoder.n_readout,
            config.tau_d,
            config.out_features,
            output=config.output,
            **config.decoder_options,
        )

    def flatten_input(self, x: Tensor) -> Tensor:
        """``[..., C, H, W]`` (any integer or float dtype) -> float ``[..., C*H*W]``; flat input passes."""
        n = self.config.encoder.n_inputs
        if x.shape[-3:] == self.config.input_shape:
            x = x.flatten(-3)
        if x.shape[-1] != n:
            raise ValueError(
                f"expected frames of shape {self.config.input_shape} or {n} values, got {tuple(x.shape)}"
            )
        return x.to(self.encoder.readout_bias.dtype)

    def decode(self, window: Tensor) -> Tensor:
        """``window [B, tau_d, n_readout] -> [B, *image_shape]``."""
        return cast(Tensor, self.decoder(window).reshape(window.shape[0], *self.config.image_shape))

    @torch.no_grad()
    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode ``x [T, B, C, H, W]`` (or ``[T, B, N]``) and decode the last window (inference, no autograd).

        Returns ``(y [T, B, n_readout], image [B, *image_shape])``; the window is zero-padded
        at the old end when ``T < tau_d``. Runs exactly the steps :class:`OnlineNaturalizer`
        runs (same event-driven/dense choices), so the two agree bit for bit.
        """
        xf = self.flatten_input(x)
        y = self.encoder(xf, generator, uniforms=uniforms)
        assert isinstance(y, Tensor)
        window = sliding_windows(y[-self.config.tau_d :], self.config.tau_d)[-1]
        return y, self.decode(window)

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        every_step: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fast evaluation: the vectorised training rollout (hoisted GEMMs) instead of the step loop.

        Returns ``(y [T, B, n_readout], images)``: ``[B, *image_shape]`` for the last window, or
        ``[T, B, *image_shape]`` with ``every_step``. Draws one ``torch.rand((T, B, n_readout))``,
        so the spikes follow the same distribution as :meth:`forward` but not the same draws, and
        potentials agree with the step path only to float rounding.
        """
        from .rollout import hidden_rollout, readout_ff, readout_sample

        xf = self.flatten_input(x)
        roll = hidden_rollout(self.encoder, xf, matmul_dtype=matmul_dtype)
        u_ff = readout_ff(self.encoder, roll.z, matmul_dtype=matmul_dtype)
        uniforms = torch.rand(u_ff.shape, generator=generator, dtype=u_ff.dtype, device=u_ff.device)
        y, _, _ = readout_sample(self.encoder, u_ff, uniforms)
        tau_d = self.config.tau_d
        if not every_step:
            return y, self.decode(sliding_windows(y[-tau_d:], tau_d)[-1])
        w = sliding_windows(y, tau_d)
        T, B = w.shape[:2]
        return y, self.decode(w.reshape(T * B, tau_d, -1)).reshape(T, B, *self.config.image_shape)


class OnlineNaturalizer:
    """One stream (or a fixed batch of streams) stepped frame by frame.

    ``push(frame)`` steps the encoder once (drawing ``torch.rand((batch, n_readout),
    generator=generator)``) and stores the spikes in a ring buffer of the last ``tau_d`` steps;
    ``decode()`` runs the decoder on that window. Pushing the frames of a sequence one by one
    gives exactly the spikes and final image of ``Naturalizer.forward`` with an equally seeded
    generator.
    """

    def __init__(
        self,
        naturalizer: Naturalizer,
        generator: torch.Generator | None = None,
        batch: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        squeeze: bool | None = None,
    ):
        self.naturalizer = naturalizer
        self.generator = generator
        self.batch = batch
        self.device = torch.device(device) if device is not None else naturalizer.encoder.readout_bias.device
        self.dtype = dtype
        # batch-1 streams accept and return unbatched frames/images unless told otherwise
        self.squeeze = (batch == 1) if squeeze is None else squeeze
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Forget the past: zero encoder state and window (the generator keeps its position)."""
        cfg = self.naturalizer.config
        self.state: EncoderState = self.naturalizer.encoder.init_state(self.batch, self.device, self.dtype)
        self._buf = torch.zeros(
            self.batch, cfg.tau_d, cfg.encoder.n_readout, device=self.device, dtype=self.dtype
        )
        self._head = 0
        self.steps = 0

    @torch.no_grad()
    def push(self, frame: Tensor) -> Tensor:
        """Step once: ``frame [C, H, W]`` (batch 1) or ``[B, C, H, W]`` / ``[B, N]`` -> spikes."""
        cfg = self.naturalizer.config
        x = torch.as_tensor(frame, device=self.device)
        if x.dim() == 3 or (x.dim() == 1 and x.shape[0] == cfg.encoder.n_inputs):
            x = x.unsqueeze(0)
        x = self.naturalizer.flatten_input(x).to(self.dtype)
        if x.shape[0] != self.batch:
            raise ValueError(f"frame batch {x.shape[0]} != stream batch {self.batch}")
        y, self.state = self.naturalizer.encoder.step(x, self.state, self.generator)
        self._buf[:, self._head] = y
        self._head = (self._head + 1) % cfg.tau_d
        self.steps += 1
        return y[0] if self.squeeze else y

    @torch.no_grad()
    def push_many(self, frames: Tensor) -> Tensor:
        """Push ``[k, ...]`` frames in order; returns the stacked spikes ``[k, ...]``."""
        return torch.stack([self.push(f) for f in frames.unbind(0)])

    def window(self) -> Tensor:
        """The last ``tau_d`` spike vectors, oldest first: ``[B, tau_d, n_readout]``."""
        return torch.cat((self._buf[:, self._head :], self._buf[:, : self._head]), dim=1)

    @torch.no_grad()
    def decode(self) -> Tensor:
        """Decode the current window: ``[*image_shape]`` (batch 1) or ``[B, *image_shape]``."""
        img = self.naturalizer.decode(self.window())
        return img[0] if self.squeeze else img
