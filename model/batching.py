"""Cross-stream batching: step many independent streams as one batch.

Each stream owns a batch-1 :class:`EncoderState`, a window and its own ``torch.Generator``.
A scheduler stacks the states of the streams that have a frame ready, draws every stream's
uniforms from *its own* generator (the same ``torch.rand((1, n_readout))`` call a batch-1
:class:`~model.naturalizer.OnlineNaturalizer` makes), steps once, and splits the result back.
So a stream's spikes do not depend on which other streams shared its tick (up to the
floating-point rounding of a GEMM with a different row count, see docs/model.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .encoder import Encoder, EncoderState
from .functional import LIFState, SRMState
from .naturalizer import Naturalizer

__all__ = [
    "decode_windows",
    "draw_stream_uniforms",
    "map_state",
    "push_window",
    "select_rows",
    "set_rows",
    "stack_states",
    "state_row",
    "step_streams",
    "unstack_states",
]


def map_state(state: EncoderState, fn: Callable[[Tensor], Tensor]) -> EncoderState:
    """Apply ``fn`` to every tensor of a state (keeps the NamedTuple structure)."""
    hidden = tuple(LIFState(*(fn(t) for t in h)) for h in state.hidden)
    return EncoderState(hidden, SRMState(*(fn(t) for t in state.readout)))


def _zip_state(states: Sequence[EncoderState], fn: Callable[[list[Tensor]], Tensor]) -> EncoderState:
    first = states[0]
    hidden = tuple(
        LIFState(*(fn([s.hidden[i][k] for s in states]) for k in range(len(first.hidden[i]))))
        for i in range(len(first.hidden))
    )
    readout = SRMState(*(fn([s.readout[k] for s in states]) for k in range(len(first.readout))))
    return EncoderState(hidden, readout)


def stack_states(states: Sequence[EncoderState]) -> EncoderState:
    """Concatenate states along the batch dimension (each may hold one or more rows)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    return _zip_state(states, lambda ts: torch.cat(ts, dim=0))


def state_row(state: EncoderState, i: int) -> EncoderState:
    """Row ``i`` as a batch-1 state (a copy, safe to keep after the batch is freed)."""
    return map_state(state, lambda t: t[i : i + 1].clone())


def unstack_states(state: EncoderState) -> list[EncoderState]:
    """Split a batched state into batch-1 states."""
    n = state.readout.fb_hist.shape[0]
    return [state_row(state, i) for i in range(n)]


def select_rows(state: EncoderState, index: Tensor | Sequence[int]) -> EncoderState:
    """Rows ``index`` of a batched state, in that order."""
    idx = torch.as_tensor(index, dtype=torch.long, device=state.readout.fb_hist.device)
    return map_state(state, lambda t: t.index_select(0, idx))


def set_rows(state: EncoderState, index: Tensor | Sequence[int], rows: EncoderState) -> EncoderState:
    """A new state equal to ``state`` with rows ``index`` replaced by ``rows`` (inputs untouched)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=state.readout.fb_hist.device)
    hidden = tuple(
        LIFState(*(a.index_copy(0, idx, b) for a, b in zip(hs, hr, strict=True)))
        for hs, hr in zip(state.hidden, rows.hidden, strict=True)
    )
    readout = SRMState(*(a.index_copy(0, idx, b) for a, b in zip(state.readout, rows.readout, strict=True)))
    return EncoderState(hidden, readout)


def draw_stream_uniforms(
    generators: Sequence[torch.Generator | None],
    n_readout: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One ``torch.rand((1, n_readout), generator=g)`` per stream, stacked to ``[B, n_readout]``.

    A generator must live on ``device`` (CPU generators for CPU tensors).
    """
    return torch.cat([torch.rand((1, n_readout), generator=g, device=device, dtype=dtype) for g in generators])


@torch.no_grad()
def step_streams(
    encoder: Encoder, x: Tensor, state: EncoderState, uniforms: Tensor
) -> tuple[Tensor, EncoderState]:
    """Step a batch of independent streams: ``x [B, n_inputs]``, stacked state, ``uniforms [B, n_readout]``."""
    return encoder.step(x, state, uniforms=uniforms)


def push_window(window: Tensor, y: Tensor) -> Tensor:
    """Shift a ``[B, tau_d, n_readout]`` window (oldest first) by one step and append ``y [B, n_readout]``."""
    return torch.cat((window[:, 1:], y.unsqueeze(1)), dim=1)


@torch.no_grad()
def decode_windows(naturalizer: Naturalizer, windows: Tensor) -> Tensor:
    """Decode stacked windows ``[B, tau_d, n_readout]`` -> ``[B, *image_shape]``."""
    return naturalizer.decode(windows)


def describe_state(state: EncoderState) -> dict[str, Any]:
    """Shapes of a state's tensors (for logs and error messages)."""
    return {
        "hidden": [{k: list(v.shape) for k, v in h._asdict().items()} for h in state.hidden],
        "readout": {k: list(v.shape) for k, v in state.readout._asdict().items()},
    }
