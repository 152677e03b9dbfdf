"""The upload path: a whole recording through :class:`events.Binner` and
:func:`model.batching.decode_segments` with the model's engine (one stream, batch 1).

It runs the same per-stream semantics as a websocket session (service/session.py), so a recording
uploaded here and streamed in any chunking with the same seed gives the same frames:

* bins come from :class:`events.Binner` (``t0`` = first event, gaps longer than ``max_gap_us``
  reset the encoder state and the decoder window; runs of empty bins are stepped, never
  materialized);
* step ``i`` (0-based over stepped bins) uses ``torch.rand((1, n_readout), generator=g)`` from a
  generator seeded with ``seed``;
* a frame is emitted after bin ``i`` when ``(i + 1) % emit == 0`` and after the last bin; the
  decoder window holds the spikes of bins ``i - tau_d + 1 .. i`` of the current segment, oldest
  first, zeros before the segment start.

The frames a recording would give are checked against ``max_frames`` before any work
(:class:`events.EventLimitError`, HTTP 413); ``check`` is called between chunks of work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from events import EventLimitError
from model.batching import stream_uniforms as uniforms_for  # noqa: F401  (session.py, until it moves)

from .registry import ModelEntry

#: Events pushed to the binner at once (bounds the memory of one step of the pipeline).
CHUNK_EVENTS = 1 << 20
#: Bins stepped per engine call (their float32 copies stay small).
STEP_CHUNK = 4096
#: Decoder windows per engine call. One: a GEMM over M rows may round differently from M = 1,
#: and a lone websocket stream decodes one window at a time; per-window decoding keeps uploads
#: and streams bit-identical (a frame costs ~0.05-0.5 ms, and uploads are bounded by max_frames).
DECODE_BATCH = 1


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
    #: scene models: the images at these times (µs, the recording's clock) instead of every emit-th bin
    timestamps: tuple[int, ...] | None = None
    max_output_pixels: int | None = None  # frames x H x W of the answer
    max_bins: int | None = None  # bins the timestamps may reach past the first event


@dataclass
class RunResult:
    images: np.ndarray  # [F, H, W] float32 in [0, 1]
    frame_bins: np.ndarray  # [F] int64: stepped-bin index of each frame
    frame_end_us: np.ndarray  # [F] int64: bin end time of each frame
    spikes: np.ndarray | None  # [T, n_readout] uint8 (when requested)
    bin_end_us: np.ndarray  # [T] int64
    inputs: list[np.ndarray] = field(default_factory=list)  # per frame [C, H, W] presence since last frame
    stats: dict[str, Any] = field(default_factory=dict)


def naturalize(entry: ModelEntry, events: np.ndarray, opts: RunOptions) -> RunResult:
    """Run one recording's events (sorted by ``t``) through ``entry``; see the module docstring.
    Scene models (any sensor) run in :func:`service.scene_engine.run_scene` by the same rules."""
    if entry.family == "scene":
        from .scene_engine import SceneEntry, run_scene

        return run_scene(cast(SceneEntry, entry), events, opts)
    if opts.timestamps is not None:
        raise ValueError("timestamps are served by scene-family models")
    from events import Binner, BinSpec
    from model.batching import decode_segments

    engine = entry.engine
    spec = BinSpec(opts.roi, opts.dt_us, entry.polarity, entry.mode, opts.pool)
    if tuple(spec.shape) != tuple(entry.input_shape):
        raise ValueError(f"binned frames {spec.shape} do not match the model input {entry.input_shape}")
    n_ev = len(events)
    if n_ev and opts.max_frames is not None:
        # checked before any binning or stepping
        n_bins = (int(events["t"][-1]) - int(events["t"][0])) // opts.dt_us + 1
        n_frames = 1 if opts.emit is None else n_bins // opts.emit + 1
        if n_frames > opts.max_frames:
            raise EventLimitError(
                f"{n_bins} bins at emit={opts.emit} give about {n_frames} frames, over the limit of "
                f"{opts.max_frames}: use a larger emit, emit=last or format=npz"
            )
    max_gap = opts.max_gap_us if opts.max_gap_us is None else max(opts.max_gap_us, opts.dt_us)
    binner = Binner(spec, t0=None, max_gap_us=max_gap)
    t_bin = 0.0

    def segments() -> Iterator[Any]:
        nonlocal t_bin
        for a in [*range(0, n_ev, CHUNK_EVENTS), -1]:  # -1: the flush
            if opts.check is not None:
                opts.check()
            t = time.perf_counter()
            segs = binner.push(events[a : a + CHUNK_EVENTS]) if a >= 0 else binner.flush()
            t_bin += time.perf_counter() - t
            yield from segs

    gen = torch.Generator().manual_seed(opts.seed)
    out = decode_segments(
        engine,
        segments(),
        gen,
        opts.emit,
        dt_us=opts.dt_us,
        step_chunk=STEP_CHUNK,
        decode_batch=DECODE_BATCH,
        keep_frames=opts.inputs,
        check=opts.check,
    )
    T = len(out.spikes)
    inputs: list[np.ndarray] = []
    if opts.inputs and T:
        allf = np.concatenate(out.frames)
        prev = 0
        for i in out.frame_steps:
            inputs.append(np.asarray(allf[prev : i + 1].astype(bool).any(axis=0)))
            prev = int(i) + 1
    stats = {
        "events": int(n_ev),
        "bins": int(T),
        "frames": int(len(out.frame_steps)),
        "gaps": int(binner.gaps),
        "late_events": int(binner.late_events),
        "spike_rate": float(out.spikes.mean()) if T else 0.0,
        "seconds": {"bin": t_bin, **out.seconds},
    }
    return RunResult(
        images=out.images,
        frame_bins=out.frame_steps,
        frame_end_us=out.frame_end_us,
        spikes=out.spikes if opts.spikes else None,
        bin_end_us=out.bin_end_us,
        inputs=inputs,
        stats=stats,
    )
