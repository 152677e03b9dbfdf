"""One websocket stream's state: binner, encoder state, decoder ring buffer, generator, queues,
and the start handshake that creates it (:func:`start_session`).

Everything a stream owns lives here (DESIGN.md: no per-stream state anywhere else); what it
computes is done by ``events`` (decoding, binning) and ``model`` (through the entry's engine).
The event loop touches the ingress side (``pending``, ``out``) and runs the scheduler's ticks,
which touch the model side (``state``, ``ring``, ``generator``; a scene-model stream's ticks run
in the scheduler's scene thread, one tick of a session at a time); :meth:`Session.bin_message`
(``binner`` and the AEDAT 4 decoder only) may run in a worker thread for a large or AEDAT 4
message, while the stream's receive loop awaits it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from events import Binner, BinSegment, BinSpec, EventFormatError, EventLimitError
from events.formats.aedat4 import Aedat4StreamDecoder
from model.batching import stream_uniforms

from .protocol import (
    AEDAT4_MAGIC,
    CLOSE_INVALID,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNSUPPORTED,
    EVENT_HEADER,
    EVENT_MAGIC,
    MAX_T_US,
    ProtocolError,
    StartMessage,
    packet_count,
    parse_emit,
)
from .registry import ModelEntry, RoiError, UnknownModelError

_ids = itertools.count(1)

BIN, EMIT_NOW, END = 0, 1, 2

#: Steps of uniforms a session draws at once (see :meth:`Session.draw_uniforms`).
UNIFORM_BLOCK = 32
#: ... and at most this many numbers per block (a scene stream draws K*h*w per step).
UNIFORM_VALUES = 1 << 16
#: Spike rows one frame carries at most (uint16 in the frame header): the latest ones.
MAX_SPIKE_ROWS = 0xFFFF


@dataclass(slots=True)
class Pending:
    """A unit of work for the scheduler: a complete bin, a forced emit (flush) or the end."""

    kind: int
    frame: np.ndarray | None = None  # [C, H, W]
    bin_end_us: int = 0
    reset: bool = False
    t_ready: float = 0.0  # perf_counter when the bin became complete (latency origin)
    run: int = 1  # > 1: this many empty bins from bin_end_us on (a BinQueue hands them out singly)


class BinQueue(deque):  # type: ignore[type-arg]
    """The scheduler's work of one stream, oldest first: :class:`Pending` items, where a run of
    empty bins (``events.BinSegment.empty``) is one item with ``run`` > 1 that :meth:`popleft`
    hands out one bin at a time (a shared zero frame), so a long silence costs no memory.
    ``bins`` counts the work in bins (runs by their length); ``len`` counts items."""

    def __init__(self, zero_frame: np.ndarray, dt_us: int) -> None:
        super().__init__()
        self.bins = 0
        self.zero = zero_frame  # the frame of every empty bin (shared, never written)
        self._dt = dt_us

    def append(self, item: Pending) -> None:
        super().append(item)
        self.bins += item.run

    def popleft(self) -> Pending:
        item: Pending = self[0]
        self.bins -= 1
        if item.run == 1:
            return super().popleft()  # type: ignore[no-any-return]
        # the first bin of the run; the item stays with the rest
        first = Pending(BIN, self.zero, item.bin_end_us, item.reset, item.t_ready)
        item.run -= 1
        item.bin_end_us += self._dt
        item.reset = False
        return first

    def clear(self) -> None:
        super().clear()
        self.bins = 0


@dataclass(slots=True)
class Outgoing:
    """A message for the client; frames may be dropped under backpressure, control never."""

    data: bytes | str | Callable[[], str]  # a callable is rendered when sent (final stats)
    is_frame: bool
    t_ready: float = 0.0
    close_code: int | None = None  # close the socket with this code after sending


#: Upper edges (ms) of the frame-latency histogram reported in stats (last bucket: above 500 ms).
LATENCY_EDGES_MS = (1, 2, 5, 10, 15, 20, 30, 50, 100, 200, 500)


@dataclass
class Counters:
    events: int = 0
    bins: int = 0
    frames_sent: int = 0
    dropped_frames: int = 0
    spikes: int = 0
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=1024))
    latency_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))

    def add_latency(self, ms: float) -> None:
        self.latency_ms.append(ms)
        self.latency_hist[bisect.bisect_left(LATENCY_EDGES_MS, ms)] += 1


class Session:
    """State of one stream (see the module docstring)."""

    def __init__(
        self,
        entry: ModelEntry,
        roi: Any,
        pool: int,
        dt_us: int,
        emit: int | None,
        seed: int,
        *,
        spikes: bool,
        inputs: bool,
        fmt: str,
        encoding: str,
        t0_us: int | None,
        max_gap_us: int,
        out_queue_frames: int,
        max_pending_bins: int | None = None,
        max_message_events: int = 50_000_000,
        max_message_decoded_bytes: int | None = None,
        max_aedat4_buffer: int = 16 << 20,
    ) -> None:
        self.id = f"s{next(_ids)}"
        self.entry = entry
        self.spec = BinSpec(roi, dt_us, entry.polarity, entry.mode, pool)
        self.engine = entry.engine_for(self.spec.shape)  # a scene model's engine for this sensor size
        self.model_reason = ""  # why the stream got its model (the ready message says it)
        self.roi, self.pool, self.dt_us = roi, pool, dt_us
        self.binner = Binner(self.spec, t0_us, max(max_gap_us, dt_us))
        self.max_pending_bins = max_pending_bins
        self.emit = emit
        self.seed = seed
        self.want_spikes, self.want_inputs, self.format = spikes, inputs, fmt
        self.encoding = encoding
        self.aedat4: Aedat4StreamDecoder | None = None
        self._aedat4_limits = (max_aedat4_buffer, max_message_events, max_message_decoded_bytes)
        self.generator = torch.Generator().manual_seed(seed)
        self.state = self.engine.init_state()
        self.ring = np.zeros((self.engine.tau_d, self.engine.n_readout), dtype=np.uint8)
        self.head = 0
        self.steps = 0
        self.last_emit_step = 0
        self.last_bin_end = 0
        # spikes of the bins since the last frame: at most the 65535 latest (the frame header's
        # 16-bit row count; emit="last" would otherwise grow it without bound)
        self.since_emit: deque[np.ndarray] = deque(maxlen=MAX_SPIKE_ROWS)
        self.input_acc: np.ndarray | None = None
        zero = np.zeros(self.spec.shape, self.spec.dtype)
        zero.flags.writeable = False
        self.pending = BinQueue(zero, dt_us)
        self.out: deque[Outgoing] = deque()
        self.out_frames = 0
        self.out_limit = out_queue_frames
        self.out_event = asyncio.Event()
        self.counters = Counters()
        self.unreported_events = 0  # events not yet added to the Prometheus counter
        self.reported_late = 0  # late events already added to it
        self._uniforms: np.ndarray | None = None  # a block of this stream's future draws
        self._u_next = 0
        self.closed = False
        self.ending = False
        self.created = time.time()

    # ------------------------------------------------------------------ ingress (event loop)
    def offload(self, data: bytes, offload_bytes: int) -> bool:
        """Whether binning ``data`` costs enough CPU to run off the event loop: a large message,
        or AEDAT 4 bytes (decompression)."""
        if len(data) >= offload_bytes:
            return True
        if self.encoding == "packed":
            return False
        return self.encoding == "aedat4" or data[:1] == AEDAT4_MAGIC[:1]

    def bin_message(self, data: bytes) -> tuple[int, list[BinSegment]]:
        """Decode and bin one binary message (an event packet, or AEDAT 4 bytes of a stream cut
        anywhere; ``encoding="auto"`` tells them apart by the first message): its number of events
        and the bins it completes. Touches only the binner and the decoder, so it may run in a
        worker thread; :meth:`queue` the bins on the event loop. Raises :class:`ProtocolError`:
        1007 malformed, 1003 neither format, 1009 a per-message budget of the AEDAT 4 decoder,
        1008 more bins than ``max_pending_bins`` would allow (checked before binning them)."""
        if self.encoding == "auto":
            if not data:
                return 0, []
            if data[:4] == EVENT_MAGIC:
                self.encoding = "packed"
            elif data[: len(AEDAT4_MAGIC)] == AEDAT4_MAGIC or AEDAT4_MAGIC.startswith(bytes(data)):
                self.encoding = "aedat4"  # a stream cut anywhere, even inside its magic
            else:
                raise ProtocolError(
                    CLOSE_UNSUPPORTED, "binary data is neither a 'VDEV' event packet nor an AEDAT 4 stream"
                )
        budget = None if self.max_pending_bins is None else max(0, self.max_pending_bins - self.pending.bins)
        try:
            if self.encoding == "aedat4":
                if self.aedat4 is None:
                    self.aedat4 = Aedat4StreamDecoder(*self._aedat4_limits)
                try:
                    events = self.aedat4.feed(data)
                except EventLimitError as exc:  # a per-message budget, not corrupt data
                    raise ProtocolError(CLOSE_TOO_BIG, f"AEDAT 4: {exc}") from None
                except EventFormatError as exc:
                    raise ProtocolError(CLOSE_INVALID, f"AEDAT 4: {exc}") from None
                n = len(events)
                segments = self.binner.push(events, max_bins=budget) if n else []
            else:
                n = packet_count(data)
                segments = self.binner.push_packed(
                    np.frombuffer(data, np.uint8), EVENT_HEADER.size, n, max_bins=budget
                )
        except EventLimitError:
            raise ProtocolError(
                CLOSE_POLICY,
                f"{self.pending.bins} bins waiting and the message completes more than {budget} more "
                f"(limit {self.max_pending_bins}): the stream runs ahead of the service; slow down or raise dt_us",
            ) from None
        except EventFormatError as exc:
            raise ProtocolError(CLOSE_INVALID, str(exc)) from None
        return n, segments

    def push_events(self, events: np.ndarray) -> int:
        """Bin a chunk of events (``events.EVENT_DTYPE``) and queue the completed bins; the bins."""
        self.counters.events += len(events)
        return self.queue(self.binner.push(events))

    def release(self) -> None:
        """Drop the queued work and buffers of a closed stream (they are garbage at once, even
        while something still holds the session)."""
        self.closed = True
        self.pending.clear()
        self.out.clear()
        self.since_emit.clear()
        self.aedat4 = None

    def report_events(self, metrics: Any) -> None:
        """Add the events (``metrics.stream_events``) and late events (``metrics.late_events``)
        received since the last call (once per stats interval instead of once per packet)."""
        if self.unreported_events:
            metrics.stream_events.inc(self.unreported_events)
            self.unreported_events = 0
        late = self.binner.late_events
        if late > self.reported_late:
            metrics.late_events.inc(late - self.reported_late)
            self.reported_late = late

    def flush(self, end: bool = False) -> None:
        """Complete the open bin, then force a frame for the last bin (and end the stream)."""
        self.queue(self.binner.flush())
        self.pending.append(Pending(EMIT_NOW, t_ready=time.perf_counter()))
        if end:
            self.ending = True
            self.pending.append(Pending(END, t_ready=time.perf_counter()))

    def queue(self, segments: list[BinSegment]) -> int:
        """Queue completed bins for the scheduler (a run of empty bins as one item); the bins."""
        if not segments:
            return 0
        now = time.perf_counter()
        pending = self.pending
        append = super(BinQueue, pending).append  # deque's own append; the bins are counted once below
        n = 0
        for seg in segments:
            if seg.empty:
                append(Pending(BIN, pending.zero, int(seg.bin_end_us[0]), seg.reset, now, seg.empty))
                n += seg.empty
            elif len(seg.frames) == 1:  # a live stream's usual packet: one complete bin
                append(Pending(BIN, seg.frames[0], int(seg.bin_end_us[0]), seg.reset, now))
                n += 1
            else:
                reset = seg.reset
                for f, e in zip(seg.frames, seg.bin_end_us.tolist(), strict=True):
                    append(Pending(BIN, f, e, reset, now))
                    reset = False
                n += len(seg.frames)
        pending.bins += n
        return n

    # ------------------------------------------------------------------ model side (worker)
    def draw_uniforms(self) -> np.ndarray:
        """This stream's draw for one step, ``[1, n_readout]``: the next ``torch.rand((1, n_readout),
        generator)``. Drawn ahead in blocks (one ``torch.rand((k, 1, n))`` gives the same numbers
        as ``k`` single draws, see :func:`model.batching.stream_uniforms`): one torch call per
        ``UNIFORM_BLOCK`` steps instead of one per step."""
        u = self._uniforms
        i = self._u_next
        if u is None or i >= len(u):
            n = self.engine.n_readout
            u = self._uniforms = stream_uniforms(
                self.generator, max(1, min(UNIFORM_BLOCK, UNIFORM_VALUES // n)), n
            )
            i = 0
        self._u_next = i + 1
        return u[i : i + 1]

    def reset_model_state(self) -> None:
        self.state = self.engine.init_state()
        self.ring[:] = 0
        self.head = 0

    def record_step(
        self, y: np.ndarray, frame: np.ndarray, bin_end_us: int, n_spikes: int | None = None
    ) -> bool:
        """Store one step's spikes (``n_spikes``: their count when the caller has it, e.g. from
        one sum over the whole batch); True when this step is due to emit a frame."""
        self.last_bin_end = bin_end_us
        self.ring[self.head] = y
        self.head = (self.head + 1) % len(self.ring)
        self.steps += 1
        self.counters.bins += 1
        self.counters.spikes += int(y.sum()) if n_spikes is None else n_spikes
        if self.want_spikes:
            self.since_emit.append(y.copy())
        if self.want_inputs:
            self.input_acc = (
                frame.astype(bool) if self.input_acc is None else (self.input_acc | frame.astype(bool))
            )
        return self.emit is not None and self.steps % self.emit == 0

    def window(self) -> np.ndarray:
        """The last ``tau_d`` spike vectors, oldest first ``[tau_d, n_readout]``."""
        return np.concatenate((self.ring[self.head :], self.ring[: self.head]))

    # ------------------------------------------------------------------ egress (event loop)
    def deliver(self, msg: Outgoing, metrics: Any = None) -> None:
        """Queue a message; beyond ``out_limit`` queued frames the oldest frame is dropped."""
        if self.closed:
            return
        if msg.is_frame:
            if self.out_frames >= self.out_limit:
                for i, old in enumerate(self.out):
                    if old.is_frame:
                        del self.out[i]
                        self.out_frames -= 1
                        self.counters.dropped_frames += 1
                        if metrics is not None:
                            metrics.dropped_frames.inc()
                        break
            self.out_frames += 1
        self.out.append(msg)
        self.out_event.set()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        lat = sorted(c.latency_ms)
        return {
            "type": "stats",
            "session": self.id,
            "events": c.events,
            "bins": c.bins,
            "frames_sent": c.frames_sent,
            "dropped_frames": c.dropped_frames,
            "late_events": int(self.binner.late_events),
            "gaps": int(self.binner.gaps),
            "pending_bins": self.pending.bins,
            "spike_rate": c.spikes / max(1, c.bins * self.engine.n_readout),
            "latency_ms_p50": lat[len(lat) // 2] if lat else None,
            "latency_ms_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "latency_hist": {"edges_ms": list(LATENCY_EDGES_MS), "counts": list(c.latency_hist)},
        }


def start_session(start: StartMessage, registry: Any, settings: Any) -> Session:
    """The session a validated start message asks for (the model, ROI, bin width and emit
    rule it resolves to); :class:`ProtocolError` when it cannot be served: 1003 unknown model, no
    default model for the sensor or unusable ROI, 1008 ``dt_us`` below ``min_dt_us``, 1007 ``t0_us``
    out of range, 1013 the open scene streams' pixels at ``max_scene_pixels``. A scene model's
    stream carries no spike rows (``spikes`` is off; the ready message says so)."""
    try:
        entry, reason = registry.pick(start.model, start.sensor.width, start.sensor.height)
    except UnknownModelError as exc:
        raise ProtocolError(CLOSE_UNSUPPORTED, exc.args[0]) from None
    try:
        roi, pool = entry.resolve_roi(start.sensor.width, start.sensor.height, start.roi)
    except RoiError as exc:
        raise ProtocolError(CLOSE_UNSUPPORTED, str(exc)) from None
    dt = start.dt_us or entry.dt_us
    if dt < settings.min_dt_us:
        raise ProtocolError(
            CLOSE_POLICY, f"dt_us {dt} is below the service's min_dt_us of {settings.min_dt_us}"
        )
    if start.t0_us is not None and abs(start.t0_us) > MAX_T_US:
        raise ProtocolError(CLOSE_INVALID, f"t0_us must be within +-{MAX_T_US}")
    scene = entry.family == "scene"
    session = Session(
        entry,
        roi,
        pool,
        dt,
        parse_emit(start.emit, dt),
        start.seed,
        spikes=start.spikes and not scene,
        inputs=start.inputs,
        fmt=start.format,
        encoding=start.encoding,
        t0_us=start.t0_us,
        max_gap_us=settings.max_gap_us,
        out_queue_frames=settings.out_queue_frames,
        max_pending_bins=settings.max_pending_bins,
        max_message_events=settings.max_message_events,
        max_message_decoded_bytes=settings.max_message_decoded_bytes,
        max_aedat4_buffer=settings.max_message_bytes * 4,
    )
    session.model_reason = reason
    # the waiting bins hold a frame each: a full-sensor stream may queue fewer of them
    frame_bytes = int(np.prod(session.spec.shape)) * np.dtype(session.spec.dtype).itemsize
    session.max_pending_bins = min(
        settings.max_pending_bins, max(16, settings.max_pending_bytes // frame_bytes)
    )
    if scene:
        from .scene_engine import CapacityError

        try:
            entry.admit(session)
        except CapacityError as exc:
            raise ProtocolError(CLOSE_TRY_AGAIN, str(exc)) from None
    return session
