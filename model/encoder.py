"""The VDIB encoder SNN: deterministic LIF hidden layers and a stochastic SRM readout.

The module holds parameters only; the state of a stream is an :class:`EncoderState` that goes
in and comes out of :meth:`Encoder.step` (STYLE.md 2), so one shared encoder serves any number
of streams. Sampling draws exactly one ``torch.rand((B, n_readout), generator=...)`` per step,
so a stream's spikes are reproducible from its generator's seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from . import functional as F
from .functional import LIFParameters, LIFState, SRMState

__all__ = ["EVENT_DRIVEN_MODES", "EncoderConfig", "EncoderState", "Encoder", "EventDriven"]


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and constants of the encoder (JSON-serialisable through :meth:`to_dict`).

    Attributes:
        n_inputs: input neurons (``C * H * W`` of a spike frame).
        hidden: sizes of the deterministic LIF layers (empty: inputs feed the readout directly).
        n_readout: stochastic SRM readout neurons (the spiking representation ``y``).
        tau_e: feedforward filter memory of the readout in steps (lags ``0 .. tau_e - 1``).
        n_basis: raised-cosine feedforward bases ``K``.
        fb_memory: feedback filter memory in steps (lags ``1 .. fb_memory``), one basis.
        prior_rate: ``r`` of the sparse Bernoulli prior ``q(y)`` (eq. 8).
        alpha, beta, alpha_rp: hidden LIF trace decays per step (DECOLLE constants).
        surrogate_scale: ``s`` in the surrogate derivative ``s * sigma'(s u)``.
    """

    n_inputs: int
    hidden: tuple[int, ...] = (800,)
    n_readout: int = 256
    tau_e: int = 10
    n_basis: int = 8
    fb_memory: int = 10
    prior_rate: float = 0.3
    alpha: float = 0.9
    beta: float = 0.85
    alpha_rp: float = 0.65
    surrogate_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.n_inputs < 1 or self.n_readout < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer sizes must be >= 1: {self}")
        if self.tau_e < 1 or self.n_basis < 1 or self.fb_memory < 1:
            raise ValueError(f"tau_e, n_basis and fb_memory must be >= 1: {self}")
        if not 0.0 < self.prior_rate < 1.0:
            raise ValueError(f"prior_rate must be in (0, 1), got {self.prior_rate}")

    @property
    def lif(self) -> LIFParameters:
        return LIFParameters(self.alpha, self.beta, self.alpha_rp, self.surrogate_scale)

    @property
    def readout_inputs(self) -> int:
        return self.hidden[-1] if self.hidden else self.n_inputs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown encoder config keys: {sorted(unknown)}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


class EncoderState(NamedTuple):
    """State of one or many streams (batch dimension first in every tensor)."""

    hidden: tuple[LIFState, ...]
    readout: SRMState


#: How a step computes input currents (an argument of :meth:`Encoder.step` and friends, never
#: a switch on the shared module): ``"auto"``: sparse inputs at small batch take the event-driven
#: gather, else the GEMM (no autograd); ``"never"``: always dense GEMMs (ONNX/TorchScript export);
#: ``"always"``: gather the batch's active input columns; ``"rows"``: per-row sums of each row's
#: own active inputs (:func:`functional.input_current`; batches of independent streams, e.g. a
#: server's scheduler: a row's result does not depend on the other rows).
EventDriven = Literal["auto", "never", "always", "rows"]
EVENT_DRIVEN_MODES: tuple[str, ...] = ("auto", "never", "always", "rows")


class Encoder(nn.Module):
    """Layered encoder SNN (paper sec. 5).

    Parameters: ``hidden.{l}.weight [n_out, n_in]``, ``hidden.{l}.bias [n_out]`` per LIF layer;
    ``readout_ff_weight [n_readout, n_in, K]``, ``readout_fb_weight [n_readout]``,
    ``readout_bias [n_readout]``. Filter kernels are non-persistent buffers derived from the
    config.
    """

    ff_kernel: Tensor
    fb_kernel: Tensor
    #: ``event_driven="auto"`` gathers for batches up to this size with at most this share of
    #: non-zero inputs (constants of the class, not switches)
    event_max_batch = 8
    event_max_density = 0.1

    def __init__(self, config: EncoderConfig, *, hidden_init: str = "zero", hidden_init_scale: float = 1.0):
        super().__init__()
        self.config = config
        sizes = (config.n_inputs, *config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        n_in = config.readout_inputs
        self.readout_ff_weight = nn.Parameter(torch.empty(config.n_readout, n_in, config.n_basis))
        self.readout_fb_weight = nn.Parameter(torch.empty(config.n_readout))
        self.readout_bias = nn.Parameter(torch.empty(config.n_readout))
        ff = F.history_kernel(F.raised_cosine_basis(config.n_basis, config.tau_e))
        fb = F.history_kernel(F.raised_cosine_basis(1, config.fb_memory))[:, 0]
        self.register_buffer("ff_kernel", ff, persistent=False)
        self.register_buffer("fb_kernel", fb.contiguous(), persistent=False)
        self._cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        self.reset_parameters(hidden_init=hidden_init, hidden_init_scale=hidden_init_scale)

    @property
    def layers(self) -> list[nn.Linear]:
        """The hidden layers' ``nn.Linear`` modules (weight ``[H, n_in]``, bias ``[H]``)."""
        return [cast(nn.Linear, m) for m in self.hidden]

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self, *, hidden_init: str = "zero", hidden_init_scale: float = 1.0) -> None:
        """Initialise as the authors (``hidden_init="zero"``: W = 0, b ~ U(-1e-3, 1e-3)) or randomly.

        ``hidden_init="random"``: W ~ N(0, (scale / sqrt(n_in * p_trace))^2) where ``p_trace``
        ≈ 0.05 is a typical slow-trace magnitude, b ~ U(-1e-3, 1e-3); training's rule options
        tune ``scale`` so that ~15 % of hidden neurons are active (VDIB-REFERENCE.md pitfall 3).
        Readout: Xavier-uniform feedforward and feedback weights, zero bias.
        """
        for layer in self.layers:
            if hidden_init == "zero":
                nn.init.zeros_(layer.weight)
            elif hidden_init == "random":
                std = hidden_init_scale / math.sqrt(layer.in_features * 0.05)
                nn.init.normal_(layer.weight, 0.0, std)
            else:
                raise ValueError(f"hidden_init must be 'zero' or 'random', got {hidden_init!r}")
            nn.init.uniform_(layer.bias, -1e-3, 1e-3)
        nn.init.xavier_uniform_(self.readout_ff_weight)
        bound = math.sqrt(6.0 / (1 + self.config.n_readout))
        nn.init.uniform_(self.readout_fb_weight, -bound, bound)
        nn.init.zeros_(self.readout_bias)

    # ------------------------------------------------------------------ derived weights
    def _derived(self, name: str, source: Tensor, fn: Callable[[], Tensor]) -> Tensor:
        """``fn()`` cached until ``source`` changes (in-place updates bump its version)."""
        if torch.is_grad_enabled() and source.requires_grad:
            return fn()  # keep the autograd graph
        key = (source._version, source.data_ptr(), source.dtype, source.device)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        # a plain tensor even when called under inference_mode, so it stays usable everywhere
        with torch.inference_mode(False), torch.no_grad():
            value = fn().contiguous()
        self._cache[name] = (key, value)
        return value

    def lag_weight_t(self) -> Tensor:
        """Per-lag readout weights, transposed ``[n_in, tau_e * n_readout]`` (see :func:`functional.lag_weights`)."""
        w = self.readout_ff_weight
        return self._derived("lag", w, lambda: F.lag_weights(w, self.ff_kernel.flip(0)))

    def hidden_weight_t(self, i: int) -> Tensor:
        w = self.layers[i].weight
        return self._derived(f"h{i}", w, lambda: w.t())

    def _use_events(self, x: Tensor, mode: EventDriven = "auto") -> bool | str:
        if mode not in EVENT_DRIVEN_MODES:
            raise ValueError(f"event_driven must be one of {EVENT_DRIVEN_MODES}, got {mode!r}")
        if mode == "never" or (
            torch.is_grad_enabled() and (self.readout_ff_weight.requires_grad or x.requires_grad)
        ):
            return False
        if mode == "always":
            return True
        if mode == "rows":
            return "rows"
        if x.device.type != "cpu" or x.shape[0] > self.event_max_batch:  # GPUs: the GEMM, no sync
            return False
        return int(x.count_nonzero()) <= self.event_max_density * x.numel()

    # ------------------------------------------------------------------ state
    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> EncoderState:
        """All-zero state for ``batch`` streams on ``device`` (default: the parameters' device)."""
        if device is None:
            device = self.readout_bias.device
        c = self.config
        hidden = tuple(F.lif_init_state(batch, h, device, dtype) for h in c.hidden)
        readout = F.srm_init_state(batch, c.n_readout, c.tau_e, c.fb_memory, device, dtype)
        return EncoderState(hidden, readout)

    # ------------------------------------------------------------------ stepping
    def hidden_step(
        self, x_t: Tensor, states: Sequence[LIFState], *, event_driven: EventDriven = "auto"
    ) -> tuple[Tensor, tuple[LIFState, ...]]:
        """Run the deterministic hidden layers for one step; returns the last layer's spikes."""
        lif = self.config.lif
        z = x_t
        new: list[LIFState] = []
        for i, (layer, st) in enumerate(zip(self.layers, states, strict=True)):
            z, st2, _ = F.lif_step(
                z,
                st,
                layer.weight,
                layer.bias,
                lif,
                weight_t=self.hidden_weight_t(i),
                event_driven=self._use_events(z, event_driven),
            )
            new.append(st2)
        return z, tuple(new)

    def step_detailed(
        self, x_t: Tensor, state: EncoderState, uniforms: Tensor, *, event_driven: EventDriven = "auto"
    ) -> tuple[Tensor, Tensor, EncoderState]:
        """One step given the uniforms: returns ``(y_t, u_t, new_state)`` (``u_t`` the readout
        potential). ``event_driven``: how input currents are computed (:data:`EventDriven`; equal
        up to float rounding)."""
        z, hidden = self.hidden_step(x_t, state.hidden, event_driven=event_driven)
        y, readout, u = F.srm_readout_step(
            z,
            state.readout,
            self.lag_weight_t(),
            self.readout_fb_weight,
            self.readout_bias,
            self.fb_kernel,
            uniforms,
            event_driven=self._use_events(z, event_driven),
        )
        return y, u, EncoderState(hidden, readout)

    def draw_uniforms(
        self, batch: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """The single random draw of one step: ``torch.rand((batch, n_readout), generator=...)``."""
        return torch.rand((batch, self.config.n_readout), generator=generator, device=device, dtype=dtype)

    def step(
        self,
        x_t: Tensor,
        state: EncoderState,
        generator: torch.Generator | None = None,
        *,
        uniforms: Tensor | None = None,
        event_driven: EventDriven = "auto",
    ) -> tuple[Tensor, EncoderState]:
        """One time step for ``B`` streams: ``x_t [B, n_inputs] -> y_t [B, n_readout]`` (0/1 floats).

        Draws exactly one ``torch.rand((B, n_readout), generator=generator)`` unless ``uniforms``
        is given; ``y = uniforms < sigmoid(u)``. ``event_driven`` as in :meth:`step_detailed`.
        """
        x_t = x_t.to(state.readout.fb_hist.dtype)
        if uniforms is None:
            uniforms = self.draw_uniforms(x_t.shape[0], generator, x_t.device, x_t.dtype)
        y, _, new_state = self.step_detailed(x_t, state, uniforms, event_driven=event_driven)
        return y, new_state

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        state: EncoderState | None = None,
        *,
        uniforms: Tensor | None = None,
        return_state: bool = False,
        event_driven: EventDriven = "auto",
    ) -> Tensor | tuple[Tensor, EncoderState]:
        """Run a whole sequence ``x [T, B, n_inputs] -> y [T, B, n_readout]``.

        Equal bit for bit to calling :meth:`step` ``T`` times with the same generator (it *is*
        that loop; the fast vectorised training path lives in :mod:`model.rules`).
        ``uniforms`` ``[T, B, n_readout]`` replaces the draws.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [T, B, n_inputs], got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(x.shape[1], x.device, x.dtype if x.is_floating_point() else torch.float32)
        ys = []
        for t, x_t in enumerate(x.unbind(0)):
            y, state = self.step(
                x_t,
                state,
                generator,
                uniforms=None if uniforms is None else uniforms[t],
                event_driven=event_driven,
            )
            ys.append(y)
        y_all = (
            torch.stack(ys)
            if ys
            else x.new_zeros((0, x.shape[1], self.config.n_readout), dtype=torch.float32)
        )
        return (y_all, state) if return_state else y_all
