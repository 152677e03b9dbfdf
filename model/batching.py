"""Streams of one model: batched states, per-stream random draws, and one recording decoder.

Each stream owns a batch-1 :class:`EncoderState`, a decoder window and its own
``torch.Generator``. A scheduler stacks the states of the streams that have a frame ready
(:func:`stack_states`, :func:`select_rows`), draws every stream's uniforms from *its own*
generator (:func:`stream_uniforms`: the same numbers a batch-1 :class:`~model.naturalizer.
OnlineNaturalizer` draws), steps once, and keeps each stream's row. So a stream's spikes do not
depend on which other streams shared its tick (bit for bit with ``event_driven="rows"``; else up
to the float rounding of a GEMM with a different row count, see docs/model.md).

:class:`TorchStreams` runs a :class:`~model.naturalizer.Naturalizer` on numpy arrays for such
callers (the service's torch engine, the evaluation), with the inference choices as
configuration, and :func:`decode_segments` turns one recording's bins into spikes and images the
same way for an upload, an evaluation and (step by step) a live stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from .encoder import EncoderState, EventDriven
from .naturalizer import Naturalizer

#: a stream state: a (named) tuple, maybe nested, of batch-first tensors
S = TypeVar("S")

__all__ = [
    "DecodedRecording",
    "StreamEngine",
    "TorchStreams",
    "decode_segments",
    "frame_steps",
    "map_state",
    "select_rows",
    "stack_states",
    "stream_uniforms",
    "windows_at",
]

#: Largest share of non-zero window entries for which :class:`TorchStreams` decodes with the
#: decoder's :meth:`~model.decoders.Decoder.sparse_form` (above it the dense GEMM is cheaper).
SPARSE_DECODE_DENSITY = 0.25


def map_state(state: S, fn: Callable[[Tensor], Tensor]) -> S:
    """Apply ``fn`` to every tensor of a state: any nesting of (named) tuples of batch-first
    tensors (:class:`EncoderState`, a scene model's state...), structure kept."""
    if isinstance(state, Tensor):
        return fn(state)  # type: ignore[return-value]
    items = [map_state(v, fn) for v in state]  # type: ignore[attr-defined]
    return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)  # type: ignore[call-arg]


def stack_states(states: Sequence[S]) -> S:
    """Concatenate states (any nesting of (named) tuples of batch-first tensors, each state one or
    more rows) along the batch dimension."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states)  # type: ignore[arg-type, return-value]
    items = [stack_states([s[i] for s in states]) for i in range(len(first))]  # type: ignore[index, arg-type]
    return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)  # type: ignore[call-arg]


def select_rows(state: S, index: Tensor | Sequence[int]) -> S:
    """Rows ``index`` of a batched state, in that order (one ``index_select`` per tensor)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=_first_tensor(state).device)
    return map_state(state, lambda t: t.index_select(0, idx))


def _first_tensor(state: Any) -> Tensor:
    if isinstance(state, Tensor):
        return state
    for v in state:
        if isinstance(v, Tensor) or len(v):
            return _first_tensor(v)
    raise ValueError("a state without tensors")


def stream_uniforms(generator: torch.Generator, k: int, n_readout: int) -> np.ndarray:
    """A stream's next ``k`` steps of draws ``[k, n_readout]`` (float32): one
    ``torch.rand((k, 1, n_readout))``, which yields the same numbers as ``k`` calls of
    ``torch.rand((1, n_readout), generator)`` (the draw of one batch-1 step) on a CPU generator
    (tests/model check it), so a stream may draw ahead in blocks."""
    return torch.rand((k, 1, n_readout), generator=generator).reshape(k, n_readout).numpy()


def frame_steps(n_steps: int, emit: int | None) -> np.ndarray:
    """The steps (0-based) after which a frame is decoded: every ``emit``-th step and the last
    one (``emit=None``: the last one only); int64."""
    if n_steps == 0:
        return np.zeros(0, dtype=np.int64)
    if emit is None:
        return np.array([n_steps - 1], dtype=np.int64)
    idx = np.arange(emit - 1, n_steps, emit, dtype=np.int64)
    if len(idx) == 0 or idx[-1] != n_steps - 1:
        idx = np.append(idx, n_steps - 1)
    return idx


def windows_at(spikes: np.ndarray, seg_start: np.ndarray, idx: np.ndarray, tau_d: int) -> np.ndarray:
    """Decoder windows ``[len(idx), tau_d, N]`` (float32) after steps ``idx``: the spikes of steps
    ``i - tau_d + 1 .. i`` oldest first, zeros before the step's segment start ``seg_start[i]``
    (a reset) and before step 0."""
    n = spikes.shape[1]
    out = np.zeros((len(idx), tau_d, n), dtype=np.float32)
    for j, i in enumerate(idx):
        lo = max(int(seg_start[i]), int(i) - tau_d + 1)
        w = spikes[lo : i + 1]
        out[j, tau_d - len(w) :] = w
    return out


class StreamEngine(Protocol):
    """What :func:`decode_segments` needs from an engine (numpy in and out, opaque states)."""

    n_inputs: int
    n_readout: int
    tau_d: int

    @property
    def image_shape(self) -> tuple[int, ...]: ...

    def fresh_state(self) -> Any: ...

    def run_chunk(self, x: np.ndarray, uniforms: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...

    def decode(self, windows: np.ndarray) -> np.ndarray: ...


class TorchStreams:
    """A :class:`Naturalizer` stepped and decoded for independent streams, on numpy arrays.

    Configuration, fixed at construction (never switched on the shared model):

    * ``event_driven``: how the encoder computes input currents (:data:`model.encoder.EventDriven`;
      ``"rows"``: each stream sums the weight rows of its own active inputs, so a stream's result
      does not depend on its batch; a server on the CPU uses it);
    * ``decoder_dtype``: ``torch.bfloat16`` runs a copy of the decoder in bf16 (half the weight
      traffic; images within ~0.05 of float32);
    * ``sparse_decode``: float32 ``linear``/``mlp`` decoders on the CPU decode windows with at
      most :data:`SPARSE_DECODE_DENSITY` non-zero entries by their sparse form.

    ``step(x [B, n_inputs], state, uniforms [B, n_readout]) -> (y uint8 [B, n_readout], state)``,
    ``run_chunk`` (one stream over ``[T, n_inputs]``, the same as ``T`` steps), ``decode(windows
    [B, tau_d, n_readout]) -> [B, *image_shape]`` float32 in [0, 1].
    """

    def __init__(
        self,
        naturalizer: Naturalizer,
        *,
        device: str | torch.device = "cpu",
        event_driven: EventDriven = "auto",
        decoder_dtype: torch.dtype = torch.float32,
        sparse_decode: bool = True,
    ) -> None:
        import copy

        self.device = torch.device(device)
        self.model = naturalizer.to(self.device).eval()
        self.encoder = self.model.encoder
        self.event_driven: EventDriven = event_driven
        self.decoder_dtype = decoder_dtype
        self.decoder = self.model.decoder
        if decoder_dtype != torch.float32:
            self.decoder = copy.deepcopy(self.model.decoder).to(decoder_dtype)
        cfg = self.model.config
        self.n_inputs = int(cfg.encoder.n_inputs)
        self.n_readout = int(cfg.encoder.n_readout)
        self.tau_d = int(cfg.tau_d)
        self.image_shape = tuple(int(s) for s in cfg.image_shape)
        use_sparse = sparse_decode and self.device.type == "cpu" and decoder_dtype == torch.float32
        self.sparse = self.decoder.sparse_form() if use_sparse else None
        with torch.inference_mode():
            self._fresh = self.encoder.init_state(1, device=self.device)

    def fresh_state(self) -> EncoderState:
        """A fresh batch-1 state (shared: states are never written in place)."""
        return self._fresh

    def step(
        self, x: np.ndarray, state: EncoderState, uniforms: np.ndarray
    ) -> tuple[np.ndarray, EncoderState]:
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            ut = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float32)).to(self.device)
            y, state = self.encoder.step(xt, state, uniforms=ut, event_driven=self.event_driven)
            return y.to("cpu", torch.uint8).numpy(), state

    def run_chunk(
        self, x: np.ndarray, uniforms: np.ndarray, state: EncoderState
    ) -> tuple[np.ndarray, EncoderState]:
        """One stream over ``x [T, n_inputs]`` from the batch-1 ``state``: spikes ``[T, n_readout]``
        and the final state; equal to ``T`` calls of :meth:`step`."""
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            ut = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float32)).to(self.device)
            ys = []
            for x_t, u_t in zip(torch.split(xt, 1), torch.split(ut, 1), strict=True):
                y, state = self.encoder.step(x_t, state, uniforms=u_t, event_driven=self.event_driven)
                ys.append(y)
            out = torch.cat(ys) if ys else torch.zeros((0, self.n_readout), device=self.device)
            return out.to("cpu", torch.uint8).numpy(), state

    def decode(self, windows: np.ndarray) -> np.ndarray:
        b = windows.shape[0]
        if self.sparse is not None:
            flat = windows.reshape(b, -1)
            # a bool view of 0/1 bytes: np.flatnonzero is ~3x faster than nonzero on uint8 2-D
            idx = np.flatnonzero(flat.view(bool) if flat.dtype == np.uint8 else flat)
            if len(idx) <= SPARSE_DECODE_DENSITY * flat.size:
                vals = flat.reshape(-1)[idx]
                with torch.inference_mode():
                    img = self.sparse.decode_nonzero(idx, None if np.all(vals == 1) else vals, b)
                    return np.asarray(img.clamp_(0.0, 1.0).numpy()).reshape(b, *self.image_shape)
        with torch.inference_mode():
            wt = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(
                self.device, self.decoder_dtype
            )
            img = self.decoder(wt).float().clamp_(0.0, 1.0)
            return np.asarray(img.reshape(b, *self.image_shape).cpu().numpy())


@dataclass
class DecodedRecording:
    """What :func:`decode_segments` returns: per step the spikes and bin end, per frame the step,
    its bin end and the image."""

    spikes: np.ndarray  # [T, n_readout] uint8
    bin_end_us: np.ndarray  # [T] int64
    seg_start: np.ndarray  # [T] int64: the first step of each step's segment (after a reset)
    frame_steps: np.ndarray  # [F] int64
    images: np.ndarray  # [F, *image_shape] float32 in [0, 1]
    frames: list[np.ndarray] = field(default_factory=list)  # the input frames, with keep_frames
    seconds: dict[str, float] = field(default_factory=dict)  # encode, decode

    @property
    def frame_end_us(self) -> np.ndarray:
        return self.bin_end_us[self.frame_steps] if len(self.frame_steps) else np.zeros(0, np.int64)


def decode_segments(
    engine: StreamEngine,
    segments: Iterable[Any],
    generator: torch.Generator,
    emit: int | None,
    *,
    dt_us: int,
    step_chunk: int = 4096,
    decode_batch: int = 1,
    keep_frames: bool = False,
    check: Callable[[], None] | None = None,
) -> DecodedRecording:
    """One recording through ``engine``: the bins of ``segments`` (``events.BinSegment``-like:
    ``frames``, ``bin_end_us``, ``reset``, ``empty``, ``n_bins``) stepped from a fresh state in
    order, then a frame decoded after every ``emit``-th step and the last (:func:`frame_steps`).

    The rules a live stream follows step by step: step ``i`` draws :func:`stream_uniforms` from
    ``generator``; a segment with ``reset`` starts from a fresh state, and its windows hold zeros
    before it (:func:`windows_at`); a run of ``empty`` bins is stepped with zero input in chunks
    of ``step_chunk`` (never materialized at once). ``decode_batch`` windows per decoder call
    (1: a GEMM over more rows may round differently, and a lone stream decodes one at a time).
    ``check`` is called between chunks of work (it raises to stop them: a budget, a client gone).
    """
    state = engine.fresh_state()
    t_enc = 0.0
    spikes, ends, starts, frames = [], [], [], []
    n_steps = seg_start = 0
    for seg in segments:
        k = seg.n_bins
        if k == 0:
            continue
        if seg.reset:
            state = engine.fresh_state()
            seg_start = n_steps
        t = time.perf_counter()
        for a in range(0, k, step_chunk):
            if check is not None:
                check()
            m = min(step_chunk, k - a)
            x = (
                np.zeros((m, engine.n_inputs), np.float32)
                if seg.empty
                else seg.frames[a : a + m].reshape(m, -1)
            )
            y, state = engine.run_chunk(x, stream_uniforms(generator, m, engine.n_readout), state)
            spikes.append(y)
        t_enc += time.perf_counter() - t
        first = int(seg.bin_end_us[0])
        ends.append(
            first + np.arange(k, dtype=np.int64) * dt_us
            if seg.empty
            else np.asarray(seg.bin_end_us, np.int64)
        )
        starts.append(np.full(k, seg_start, dtype=np.int64))
        if keep_frames:
            frames.append(np.zeros((k, *seg.frames.shape[1:]), seg.frames.dtype) if seg.empty else seg.frames)
        n_steps += k
    y_all = np.concatenate(spikes) if spikes else np.zeros((0, engine.n_readout), np.uint8)
    seg_of = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    idx = frame_steps(n_steps, emit)
    t = time.perf_counter()
    images = np.zeros((len(idx), *engine.image_shape), dtype=np.float32)
    for a in range(0, len(idx), decode_batch):
        sel = idx[a : a + decode_batch]
        if check is not None and a % (64 * decode_batch) == 0:
            check()
        images[a : a + len(sel)] = engine.decode(windows_at(y_all, seg_of, sel, engine.tau_d)).reshape(
            len(sel), *engine.image_shape
        )
    return DecodedRecording(
        spikes=y_all,
        bin_end_us=np.concatenate(ends) if ends else np.zeros(0, np.int64),
        seg_start=seg_of,
        frame_steps=idx,
        images=images,
        frames=frames,
        seconds={"encode": t_enc, "decode": time.perf_counter() - t},
    )
