"""The upload path: a whole recording through binner, encoder and decoder (one stream, batch 1).

It runs the same per-stream semantics as a websocket session (service/session.py), so a recording
uploaded here and streamed in any chunking with the same seed gives the same frames:

* bins come from :class:`events.Binner` (``t0`` = first event, gaps longer than ``max_gap_us``
  reset the encoder state and the decoder window);
* step ``i`` (0-based over stepped bins) uses ``torch.rand((1, n_readout), generator=g)`` from a
  generator seeded with ``seed``;
* a frame is emitted after bin ``i`` when ``(i + 1) % emit == 0`` and after the last bin; the
  decoder window holds the spikes of bins ``i - tau_d + 1 .. i`` of the current segment, oldest
  first, zeros before the segment start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .registry import ModelEntry

#: Events pushed to the binner at once (bounds the memory of one step of the pipeline).
CHUNK_EVENTS = 1 << 20
#: Bins stepped per engine call (their float32 copies stay small).
STEP_CHUNK = 4096
#: Decoder windows per engine call. One: a GEMM over M rows may round differently from M = 1,
#: and a lone websocket stream decodes one window at a time; per-window decoding keeps uploads
#: and streams bit-identical (a frame costs ~0.05-0.5 ms, and uploads are bounded by max_frames).
DECODE_BATCH = 1


class LimitError(ValueError):
    """The request would exceed a configured limit (HTTP 413)."""


@dataclass(frozen=True)
class RunOptions:
    roi: Any  # events.ROI
    pool: int
    dt_us: int
    emit: int | None  # None: only the last bin
    spikes: bool
    seed: int
    inputs: bool = False
    max_gap_us: int | None = 1_000_000
    max_frames: int | None = None
    #: called between chunks of work; raises to stop it (an upload's CPU budget, a client that left)
    check: Callable[[], None] | None = None


@dataclass
class RunResult:
    images: np.ndarray  # [F, H, W] float32 in [0, 1]
    frame_bins: np.ndarray  # [F] int64: stepped-bin index of each frame
    frame_end_us: np.ndarray  # [F] int64: bin end time of each frame
    spikes: np.ndarray | None  # [T, n_readout] uint8 (when requested)
    bin_end_us: np.ndarray  # [T] int64
    inputs: list[np.ndarray] = field(default_factory=list)  # per frame [C, H, W] presence since last frame
    stats: dict[str, Any] = field(default_factory=dict)


def uniforms_for(generator: torch.Generator, k: int, n_readout: int) -> np.ndarray:
    """``k`` consecutive per-step draws ``torch.rand((1, n_readout))`` as ``[k, n_readout]``.

    One ``torch.rand((k, 1, n))`` call yields the same numbers as ``k`` calls of
    ``torch.rand((1, n))`` on a CPU generator (tests/service check it), so uploads draw in bulk.
    """
    return torch.rand((k, 1, n_readout), generator=generator).reshape(k, n_readout).numpy()


def windows_at(spikes: np.ndarray, seg_start: np.ndarray, idx: np.ndarray, tau_d: int) -> np.ndarray:
    """Decoder windows ``[len(idx), tau_d, N]`` for bins ``idx`` (oldest first, zero before segment)."""
    n = spikes.shape[1]
    out = np.zeros((len(idx), tau_d, n), dtype=np.float32)
    for j, i in enumerate(idx):
        lo = max(int(seg_start[i]), int(i) - tau_d + 1)
        w = spikes[lo : i + 1]
        out[j, tau_d - len(w) :] = w
    return out


def naturalize(entry: ModelEntry, events: np.ndarray, opts: RunOptions) -> RunResult:
    """Run one recording's events (sorted by ``t``) through ``entry``; see the module docstring."""
    from events import Binner, BinSpec

    engine = entry.engine
    spec = BinSpec(opts.roi, opts.dt_us, entry.polarity, entry.mode, opts.pool)
    if tuple(spec.shape) != tuple(entry.input_shape):
        raise ValueError(f"binned frames {spec.shape} do not match the model input {entry.input_shape}")
    n_ev = len(events)
    if opts.max_frames is not None and n_ev:
        span = int(events["t"][-1]) - int(events["t"][0])
        n_bins = span // opts.dt_us + 1
        n_frames = 1 if opts.emit is None else n_bins // opts.emit + 1
        if n_frames > opts.max_frames:
            raise LimitError(
                f"{n_bins} bins at emit={opts.emit} give about {n_frames} frames, over the limit of "
                f"{opts.max_frames}: use a larger emit, emit=last or format=npz"
            )
    gen = torch.Generator().manual_seed(opts.seed)
    max_gap = opts.max_gap_us if opts.max_gap_us is None else max(opts.max_gap_us, opts.dt_us)
    binner = Binner(spec, t0=None, max_gap_us=max_gap)
    t_bin = t_enc = 0.0
    spikes_parts: list[np.ndarray] = []
    ends_parts: list[np.ndarray] = []
    seg_parts: list[np.ndarray] = []
    frames_keep: list[np.ndarray] = []  # input frames (only when inputs are requested)
    n_steps = 0
    seg_start = 0
    state = engine.stack([engine.init_state()])

    def consume(segments: list[Any]) -> None:
        nonlocal n_steps, seg_start, state, t_enc
        for seg in segments:
            k = seg.n_bins
            if k == 0:
                continue
            if seg.reset:
                state = engine.stack([engine.init_state()])
                seg_start = n_steps
            t = time.perf_counter()
            y_parts = []
            for a in range(0, k, STEP_CHUNK):  # bounded float copies of the frames
                if opts.check is not None:
                    opts.check()
                m = min(STEP_CHUNK, k - a)
                x = np.zeros((m, engine.n_inputs), np.float32) if seg.empty else seg.frames[a : a + m].reshape(m, -1)
                u = uniforms_for(gen, m, engine.n_readout)
                y_a, state = engine.run_chunk(x, u, state)
                y_parts.append(y_a)
            y = np.concatenate(y_parts)
            t_enc += time.perf_counter() - t
            spikes_parts.append(y)
            ends = seg.bin_end_us[0] + np.arange(k, dtype=np.int64) * opts.dt_us if seg.empty else seg.bin_end_us
            ends_parts.append(np.asarray(ends, dtype=np.int64))
            seg_parts.append(np.full(k, seg_start, dtype=np.int64))
            if opts.inputs:
                frames_keep.append(np.zeros((k, *spec.shape), spec.dtype) if seg.empty else seg.frames)
            n_steps += k

    for a in range(0, n_ev, CHUNK_EVENTS):
        if opts.check is not None:
            opts.check()
        t = time.perf_counter()
        segs = binner.push(events[a : a + CHUNK_EVENTS])
        t_bin += time.perf_counter() - t
        consume(segs)
    t = time.perf_counter()
    segs = binner.flush()
    t_bin += time.perf_counter() - t
    consume(segs)

    n_readout = engine.n_readout
    spikes = np.concatenate(spikes_parts) if spikes_parts else np.zeros((0, n_readout), np.uint8)
    bin_end = np.concatenate(ends_parts) if ends_parts else np.zeros(0, np.int64)
    seg_of = np.concatenate(seg_parts) if seg_parts else np.zeros(0, np.int64)
    T = len(spikes)
    if T == 0:
        idx = np.zeros(0, dtype=np.int64)
    elif opts.emit is None:
        idx = np.array([T - 1], dtype=np.int64)
    else:
        idx = np.arange(opts.emit - 1, T, opts.emit, dtype=np.int64)
        if len(idx) == 0 or idx[-1] != T - 1:
            idx = np.append(idx, T - 1)
    t = time.perf_counter()
    images = np.zeros((len(idx), *engine.image_shape), dtype=np.float32)
    for a in range(0, len(idx), DECODE_BATCH):
        sel = idx[a : a + DECODE_BATCH]
        if opts.check is not None and a % 64 == 0:
            opts.check()
        images[a : a + len(sel)] = engine.decode(windows_at(spikes, seg_of, sel, engine.tau_d))
    t_dec = time.perf_counter() - t
    inputs: list[np.ndarray] = []
    if opts.inputs and T:
        allf = np.concatenate(frames_keep)
        prev = 0
        for i in idx:
            inputs.append(np.asarray(allf[prev : i + 1].astype(bool).any(axis=0)))
            prev = int(i) + 1
    stats = {
        "events": int(n_ev),
        "bins": int(T),
        "frames": int(len(idx)),
        "gaps": int(binner.gaps),
        "late_events": int(binner.late_events),
        "spike_rate": float(spikes.mean()) if T else 0.0,
        "seconds": {"bin": t_bin, "encode": t_enc, "decode": t_dec},
    }
    return RunResult(
        images=images,
        frame_bins=idx,
        frame_end_us=bin_end[idx] if T else np.zeros(0, np.int64),
        spikes=spikes if opts.spikes else None,
        bin_end_us=bin_end,
        inputs=inputs,
        stats=stats,
    )
