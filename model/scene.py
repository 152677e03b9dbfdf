"""The general-scene naturalizer: a fully convolutional VDIB encoder SNN and a convolutional
time decoder, for any sensor size.

Encoder (per 10 ms bin ``x_t [B, 2, H, W]`` of event counts, fed as :math:`\\log(1 + n)`):

* hidden layers: convolutional LIF neurons, the same dynamics as :func:`model.functional.lif_step`
  with the input current :math:`I_t = \\mathrm{conv}(x_t)` instead of :math:`W x_t` (the first
  layer has stride ``stride``, so the spike maps live at ``ceil(H / stride) x ceil(W / stride)``);
* readout: stochastic SRM neurons at every location, ``n_readout`` maps. Their potential is the
  paper's eq. 15 with convolutions:
  :math:`u_t = \\sum_{d < \\tau_e} \\tilde W_d * z_{t-d} + w_{fb}\\,(y * \\psi)_{t-1} + b` with
  :math:`\\tilde W_d = \\sum_k \\phi_k(d) W_k` over ``n_basis`` raised-cosine filters
  :math:`\\phi_k` and one feedback filter :math:`\\psi` (:func:`model.functional.raised_cosine_basis`),
  and :math:`y_t \\sim \\mathrm{Bernoulli}(\\sigma(u_t))` (one uniform per neuron and step).

Decoder (an ANN over the last ``tau_d`` spike maps, the paper's time decoding): the window
``[B, tau_d, K, h, w]`` as ``tau_d * K`` channels -> a small U-Net (1x1 time mixing, two
stride-2 levels, additive skips) -> ``stride**2`` channels -> pixel shuffle -> the intensity
image ``[B, H, W]`` in [0, 1]. Every layer is a convolution, so one set of weights serves every
sensor size.

State is explicit (:class:`SceneState`, batch-first tensors) and never lives on the module:
one model serves any number of streams. :func:`reconstruct_events` turns a recording into
images at any timestamps (a partial bin is stepped on a copy of the state, so a frame at
time ``t`` has seen exactly the events before ``t``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .batching import map_state, stack_states  # generic over any state tuple

__all__ = [
    "OnlineSceneNaturalizer",
    "SceneNaturalizer",
    "SceneNaturalizerConfig",
    "SceneState",
    "map_state",
    "stack_states",
    "reconstruct_events",
]


@dataclass(frozen=True)
class SceneNaturalizerConfig:
    """Architecture of :class:`SceneNaturalizer` (stored in the checkpoint's ``config.json``)."""

    in_channels: int = 2  # off, on event counts
    hidden: tuple[int, ...] = (16,)
    kernel: int = 3
    stride: int = 2
    n_readout: int = 8
    readout_kernel: int = 1
    tau_e: int = 6
    n_basis: int = 3
    fb_memory: int = 6
    prior_rate: float = 0.2
    alpha: float = 0.9
    beta: float = 0.85
    alpha_rp: float = 0.65
    surrogate_scale: float = 1.0
    tau_d: int = 12
    decoder_widths: tuple[int, int, int] = (24, 32, 48)
    dt_us: int = 10_000
    input_clip: int = 15  # counts above this saturate
    polarity: str = "split"
    mode: str = "count"
    family: str = field(default="scene", init=False)

    def __post_init__(self) -> None:
        if self.in_channels < 1 or not self.hidden or min(self.hidden) < 1 or self.n_readout < 1:
            raise ValueError(f"channel counts must be >= 1: {self}")
        if self.kernel < 1 or self.kernel % 2 == 0 or self.readout_kernel < 1 or self.readout_kernel % 2 == 0:
            raise ValueError("kernels must be odd and >= 1")
        if self.stride not in (1, 2, 4):
            raise ValueError("stride must be 1, 2 or 4")
        if min(self.tau_e, self.n_basis, self.fb_memory, self.tau_d) < 1:
            raise ValueError("tau_e, n_basis, fb_memory and tau_d must be >= 1")
        if not 0 < self.prior_rate < 1:
            raise ValueError("prior_rate must lie in (0, 1)")
        if len(self.decoder_widths) != 3 or min(self.decoder_widths) < 1:
            raise ValueError("decoder_widths must be three positive widths")
        if self.dt_us < 1 or self.input_clip < 1:
            raise ValueError("dt_us and input_clip must be >= 1")

    @property
    def lif(self) -> F.LIFParameters:
        return F.LIFParameters(self.alpha, self.beta, self.alpha_rp, self.surrogate_scale)

    def spike_shape(self, height: int, width: int) -> tuple[int, int]:
        """Size of the spike maps for a ``height x width`` sensor."""
        return -(-height // self.stride), -(-width // self.stride)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneNaturalizerConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "family"}
        unknown = set(d) - known - {"family"}
        if unknown:
            raise ValueError(f"unknown scene config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


class SceneState(NamedTuple):
    """Per-stream state; every tensor is batch-first. ``window`` holds the last ``tau_d``
    readout spike maps, oldest first."""

    hidden: tuple[F.LIFState, ...]
    pending: Tensor  # [B, tau_e, K, h, w] feedforward potential owed to steps t .. t+tau_e-1
    fb_hist: Tensor  # [B, fb_memory, K, h, w] own spikes, oldest first
    window: Tensor  # [B, tau_d, K, h, w]


class _Decoder(nn.Module):
    """Window of spike maps -> image, a small U-Net (see the module docstring)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], stride: int):
        super().__init__()
        w0, w1, w2 = widths
        self.stride = stride
        self.head = nn.Conv2d(in_channels, w0, 1)
        self.enc0 = nn.Conv2d(w0, w0, 3, padding=1)
        self.down1 = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.enc1 = nn.Conv2d(w1, w1, 3, padding=1)
        self.down2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.enc2 = nn.Conv2d(w2, w2, 3, padding=1)
        self.up1 = nn.Conv2d(w2, w1, 3, padding=1)
        self.up0 = nn.Conv2d(w1, w0, 3, padding=1)
        self.refine = nn.Conv2d(w0, w0, 3, padding=1)
        self.out = nn.Conv2d(w0, stride * stride, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, h, w]`` -> logits ``[B, stride*h, stride*w]`` (any h, w)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = TF.pad(x, (0, pw, 0, ph))
        act = TF.leaky_relu
        e0 = act(self.enc0(act(self.head(x), 0.1)), 0.1)
        e1 = act(self.enc1(act(self.down1(e0), 0.1)), 0.1)
        e2 = act(self.enc2(act(self.down2(e1), 0.1)), 0.1)
        d1 = act(self.up1(e2), 0.1)
        d1 = TF.interpolate(d1, size=e1.shape[-2:], mode="bilinear", align_corners=False) + e1
        d0 = act(self.up0(d1), 0.1)
        d0 = TF.interpolate(d0, size=e0.shape[-2:], mode="bilinear", align_corners=False) + e0
        y = self.out(act(self.refine(d0), 0.1))
        if self.stride > 1:
            y = TF.pixel_shuffle(y, self.stride)
        s = self.stride
        return cast(Tensor, y[:, 0, : h * s, : w * s])


class SceneNaturalizer(nn.Module):
    """Convolutional VDIB encoder + convolutional time decoder (module docstring)."""

    def __init__(self, config: SceneNaturalizerConfig | None = None):
        super().__init__()
        cfg = config or SceneNaturalizerConfig()
        self.config = cfg
        convs = []
        c_in = cfg.in_channels
        for i, c in enumerate(cfg.hidden):
            convs.append(
                nn.Conv2d(c_in, c, cfg.kernel, stride=cfg.stride if i == 0 else 1, padding=cfg.kernel // 2)
            )
            c_in = c
        self.hidden = nn.ModuleList(convs)
        k = cfg.readout_kernel
        self.readout_weight = nn.Parameter(torch.empty(cfg.n_readout, c_in, k, k, cfg.n_basis))
        self.readout_bias = nn.Parameter(torch.zeros(cfg.n_readout))
        self.fb_weight = nn.Parameter(torch.full((cfg.n_readout,), -1.0))
        self.register_buffer("basis", F.raised_cosine_basis(cfg.n_basis, cfg.tau_e), persistent=False)
        fb = F.history_kernel(F.raised_cosine_basis(1, cfg.fb_memory))[:, 0]
        self.register_buffer("fb_kernel", fb.contiguous(), persistent=False)
        self.decoder = _Decoder(cfg.tau_d * cfg.n_readout, cfg.decoder_widths, cfg.stride)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in cast(list[nn.Conv2d], list(self.hidden)):
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
            if conv.bias is not None:
                nn.init.constant_(conv.bias, -0.05)
        fan_in = self.readout_weight[..., 0].numel() // self.readout_weight.shape[0]
        bound = math.sqrt(6.0 / (fan_in + self.config.n_readout))
        nn.init.uniform_(self.readout_weight, -bound, bound)
        # start near the prior rate
        nn.init.constant_(self.readout_bias, math.log(self.config.prior_rate / (1 - self.config.prior_rate)))

    # -- encoder ------------------------------------------------------------------------------
    def lag_weight(self) -> Tensor:
        """Per-lag readout kernels :math:`\\tilde W_d` stacked as ``[tau_e * K, C, k, k]``."""
        w = torch.einsum("dn,kchwn->dkchw", self.basis.to(self.readout_weight.dtype), self.readout_weight)
        return w.reshape(-1, *w.shape[2:]).contiguous()

    def prepare(self, x: Tensor) -> Tensor:
        """Event counts (any dtype) -> the encoder's input :math:`\\log(1 + \\min(n, n_{max}))`."""
        return torch.log1p(x.float().clamp(0, self.config.input_clip))

    def init_state(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        spike_dtype: torch.dtype | None = None,
    ) -> SceneState:
        """All-zero state for ``batch`` streams of a ``height x width`` sensor.

        ``spike_dtype`` is the dtype of the spike buffers (``fb_hist``, ``window``): ``dtype``
        by default (training needs float for the straight-through gradient); ``torch.uint8``
        stores the same 0/1 values in a quarter of the memory when serving.
        """
        cfg = self.config
        h, w = cfg.spike_shape(height, width)

        def z(*s: int) -> Tensor:
            return torch.zeros(batch, *s, device=device, dtype=dtype)

        hidden = tuple(F.LIFState(z(c, h, w), z(c, h, w), z(c, h, w), z(c, h, w)) for c in cfg.hidden)
        k = cfg.n_readout
        sd = spike_dtype or dtype
        return SceneState(
            hidden,
            z(cfg.tau_e, k, h, w),
            torch.zeros(batch, cfg.fb_memory, k, h, w, device=device, dtype=sd),
            torch.zeros(batch, cfg.tau_d, k, h, w, device=device, dtype=sd),
        )

    def draw_uniforms(self, state: SceneState, generator: torch.Generator | None) -> Tensor:
        """The one ``torch.rand`` draw of a step: ``[B, K, h, w]``."""
        return torch.rand(
            state.window[:, 0].shape,
            generator=generator,
            device=state.window.device,
            dtype=state.pending.dtype,
        )

    def step_detailed(
        self, x_t: Tensor, state: SceneState, uniforms: Tensor, lag_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor, SceneState]:
        """One bin: ``x_t [B, C_in, H, W]`` (prepared input) -> ``(y [B, K, h, w], u, state)``.

        In training (grad enabled) the spikes carry the straight-through gradient of
        :math:`\\sigma(u)`; their values are the exact Bernoulli samples either way.
        """
        cfg = self.config
        z = x_t
        hidden = []
        for conv, s in zip(self.hidden, state.hidden, strict=True):
            z, s2, _ = F.lif_dynamics(conv(z), s, 0.0, cfg.lif)
            hidden.append(s2)
        lw = self.lag_weight() if lag_weight is None else lag_weight
        g = TF.conv2d(z, lw, padding=cfg.readout_kernel // 2)
        B, tau, K = state.pending.shape[:3]
        g = g.view(B, tau, K, *g.shape[-2:])
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            pending = torch.cat((state.pending[:, 1:], torch.zeros_like(state.pending[:, :1])), 1) + g
        else:  # one pass over the buffer (it is the largest tensor of a step)
            pending = torch.empty_like(g)
            torch.add(state.pending[:, 1:], g[:, :-1], out=pending[:, :-1])
            pending[:, -1] = g[:, -1]
        fb = torch.einsum("l,blkhw->bkhw", self.fb_kernel.to(g.dtype), state.fb_hist.to(g.dtype))
        u = pending[:, 0] + self.fb_weight.view(1, -1, 1, 1) * fb + self.readout_bias.view(1, -1, 1, 1)
        p = torch.sigmoid(u)
        y = (uniforms < p).to(u.dtype)
        if torch.is_grad_enabled() and p.requires_grad:
            y = y + (p - p.detach())  # straight-through estimator (values stay exactly 0/1)
        # spike buffers keep the state's dtype: float in training, uint8 when serving (exact)
        fb_hist = torch.cat((state.fb_hist[:, 1:], y.detach().unsqueeze(1).to(state.fb_hist.dtype)), 1)
        window = torch.cat((state.window[:, 1:], y.unsqueeze(1).to(state.window.dtype)), 1)
        return y, u, SceneState(tuple(hidden), pending, fb_hist, window)

    def step(
        self,
        x_t: Tensor,
        state: SceneState,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
    ) -> tuple[Tensor, SceneState]:
        """One bin of raw event counts ``[B, C_in, H, W]`` -> spikes ``[B, K, h, w]`` and the new
        state. Draws exactly one ``torch.rand((B, K, h, w), generator)`` unless ``uniforms``."""
        un = self.draw_uniforms(state, generator) if uniforms is None else uniforms
        y, _, state = self.step_detailed(self.prepare(x_t), state, un)
        return y, state

    def decode(self, window: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        """``window [B, tau_d, K, h, w]`` -> images ``[B, H, W]`` in [0, 1] (cropped to
        ``height x width`` when given)."""
        return torch.sigmoid(self.decode_logits(window, height, width))

    def decode_logits(self, window: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        dtype = self.decoder.head.weight.dtype
        out = self.decoder(window.flatten(1, 2).to(dtype))
        return cast(Tensor, out[:, : height or out.shape[1], : width or out.shape[2]])

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        decode_steps: Sequence[int] | None = None,
        uniforms: Tensor | None = None,
        state: SceneState | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A whole sequence ``x [T, B, C_in, H, W]`` (raw counts) -> ``(y [T, B, K, h, w],
        u [T, B, K, h, w], logits [S, B, H, W])`` with images decoded after each step in
        ``decode_steps`` (default: the last). Equals repeated :meth:`step` (same draws)."""
        T, B, _, H, W = x.shape
        st = self.init_state(B, H, W, x.device) if state is None else state
        steps = [T - 1] if decode_steps is None else list(decode_steps)
        lw = self.lag_weight()
        xs = self.prepare(x).unbind(0)
        ys, us, windows = [], [], []
        for t in range(T):
            un = self.draw_uniforms(st, generator) if uniforms is None else uniforms[t]
            y, u, st = self.step_detailed(xs[t], st, un, lw)
            ys.append(y)
            us.append(u)
            if t in steps:
                windows.append(st.window)
        logits = (
            self.decode_logits(torch.cat(windows), H, W).view(len(windows), B, H, W)
            if windows
            else x.new_zeros((0, B, H, W), dtype=torch.float32)
        )
        return torch.stack(ys), torch.stack(us), logits


class OnlineSceneNaturalizer:
    """One stream (or a batch of equal-size streams) stepped bin by bin; state held here."""

    def __init__(
        self,
        net: SceneNaturalizer,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        batch: int = 1,
    ):
        self.net = net
        self.height, self.width = int(height), int(width)
        self.generator = generator
        self.batch = batch
        device = next(net.parameters()).device
        self.state = net.init_state(batch, self.height, self.width, device, spike_dtype=torch.uint8)
        self.steps = 0

    def reset(self) -> None:
        self.state = self.net.init_state(
            self.batch, self.height, self.width, self.state.window.device, spike_dtype=torch.uint8
        )
        self.steps = 0

    @torch.no_grad()
    def push(self, frame: Tensor) -> Tensor:
        """``[C, H, W]`` (or ``[B, C, H, W]``) counts of one bin -> spikes ``[B, K, h, w]``."""
        x = frame if frame.dim() == 4 else frame.unsqueeze(0)
        y, self.state = self.net.step(x.to(self.state.window.device), self.state, self.generator)
        self.steps += 1
        return y

    @torch.no_grad()
    def decode(self) -> Tensor:
        """The image now: ``[H, W]`` (or ``[B, H, W]`` for a batch)."""
        img = self.net.decode(self.state.window, self.height, self.width)
        return img[0] if self.batch == 1 else img


@torch.no_grad()
def reconstruct_events(
    net: SceneNaturalizer,
    events: np.ndarray,
    width: int,
    height: int,
    timestamps_us: Sequence[int] | np.ndarray | None = None,
    *,
    generator: torch.Generator | None = None,
    t0_us: int | None = None,
    every: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images of a recording: ``(images float32 [K, H, W], times_us int64 [K])``.

    Bins of ``net.config.dt_us`` start at ``t0_us`` (default: the first event). With
    ``timestamps_us`` the image at each time ``t`` is decoded after the full bins that end at or
    before ``t`` plus a partial bin of the events in ``[bin start, t)`` stepped on a copy of the
    state (so it has seen exactly the events before ``t``; the stream itself goes on with full
    bins). Without, every ``every``-th bin end is decoded. Times before the first bin give the
    model's empty-state image.
    """
    from events import ROI, bin_events  # events/ owns binning

    cfg = net.config
    device = next(net.parameters()).device
    ev = np.asarray(events)
    t0 = int(ev["t"][0]) if t0_us is None and len(ev) else int(t0_us or 0)
    dt = cfg.dt_us
    roi = ROI.full(width, height)
    last_t = int(ev["t"][-1]) if len(ev) else t0
    if timestamps_us is None:
        n_bins = max((last_t - t0) // dt + 1, 1)
        want = [(k + 1) for k in range(n_bins) if (k + 1) % every == 0 or k == n_bins - 1]
        times = np.array([t0 + k * dt for k in want], dtype=np.int64)
    else:
        times = np.asarray(timestamps_us, dtype=np.int64).reshape(-1)
        if len(times) and np.any(np.diff(times) < 0):
            order = np.argsort(times, kind="stable")
            imgs, _ = reconstruct_events(
                net, ev, width, height, times[order], generator=generator, t0_us=t0, progress=progress
            )
            out = np.empty_like(imgs)
            out[order] = imgs
            return out, times
    state = net.init_state(1, height, width, device, spike_dtype=torch.uint8)
    lw = net.lag_weight()
    t_ev = ev["t"] if len(ev) else np.zeros(0, np.int64)
    out = np.zeros((len(times), height, width), np.float32)

    def step_span(st: SceneState, start: int, end: int) -> SceneState:
        """The state after one bin holding the events of ``[start, end)``."""
        lo, hi = np.searchsorted(t_ev, [start, end])
        x = bin_events(ev[lo:hi], roi, dt, t0=start, n_bins=1, polarity="split", mode="count")
        _, _, nxt = net.step_detailed(
            net.prepare(torch.from_numpy(x).to(device)), st, net.draw_uniforms(st, generator), lw
        )
        return nxt

    k = 0  # bins stepped so far; the state has seen events before t0 + k * dt
    for i, t in enumerate(times.tolist()):
        full = max((t - t0) // dt, 0)
        while k < full:  # step whole bins up to the one containing t
            state = step_span(state, t0 + k * dt, t0 + (k + 1) * dt)
            k += 1
        start = t0 + k * dt
        st = step_span(state, start, t) if t > start else state  # partial bin [start, t) on a copy
        out[i] = net.decode(st.window, height, width)[0].cpu().numpy()
        if progress is not None:
            progress(i + 1, len(times))
    return out, times
