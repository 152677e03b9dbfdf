"""One websocket stream's state: binner, encoder state, decoder ring buffer, generator, queues.

Everything a stream owns lives here (DESIGN.md: no per-stream state anywhere else). The event
loop thread touches the ingress side (``binner``, ``pending``, ``out``); the scheduler's worker
thread touches the model side (``state``, ``ring``, ``generator``) of the sessions in its batch
only, and never concurrently with another tick.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .pipeline import uniforms_for
from .protocol import (
    AEDAT4_MAGIC,
    CLOSE_INVALID,
    CLOSE_TOO_BIG,
    EVENT_HEADER,
    ProtocolError,
    decode_events,
    packet_count,
)
from .registry import ModelEntry

_ids = itertools.count(1)

BIN, EMIT_NOW, END = 0, 1, 2

#: Steps of uniforms a session draws at once (see :meth:`Session.draw_uniforms`).
UNIFORM_BLOCK = 32
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
    ) -> None:
        from events import BinSpec

        from .ingest import StreamBinner, make_binner

        self.id = f"s{next(_ids)}"
        self.entry = entry
        self.engine = entry.engine
        self.spec = BinSpec(roi, dt_us, entry.polarity, entry.mode, pool)
        self.roi, self.pool, self.dt_us = roi, pool, dt_us
        self.binner = make_binner(self.spec, t0_us, max(max_gap_us, dt_us))
        self.fast_ingest = isinstance(self.binner, StreamBinner)
        self.emit = emit
        self.seed = seed
        self.want_spikes, self.want_inputs, self.format = spikes, inputs, fmt
        self.encoding = encoding
        self.aedat4: Aedat4Stream | None = None
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
        self.pending: deque[Pending] = deque()
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
    def push_events(self, events: np.ndarray) -> int:
        """Bin a chunk of events; queue the completed bins. Returns the bins queued."""
        self.counters.events += len(events)
        return self._queue(self.binner.push(events))

    def push_packet(self, data: bytes) -> int:
        """Bin one protocol event packet (``VDEV``), checked like :func:`protocol.decode_events`
        (ProtocolError when malformed); returns its number of events. With a
        :class:`~service.ingest.StreamBinner` the records go from the message bytes straight into
        the compiled binning loop (no structured array, no per-field copies)."""
        if self.fast_ingest:
            n = packet_count(data)
            if n:
                try:
                    parts = self.binner.push_packed(np.frombuffer(data, np.uint8), EVENT_HEADER.size, n)
                except ValueError as exc:
                    raise ProtocolError(CLOSE_INVALID, str(exc)) from None
                self.counters.events += n
                self._queue(parts)
            return n
        events = decode_events(data)
        if len(events):
            self.push_events(events)
        return len(events)

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
        self._queue(self.binner.flush())
        self.pending.append(Pending(EMIT_NOW, t_ready=time.perf_counter()))
        if end:
            self.ending = True
            self.pending.append(Pending(END, t_ready=time.perf_counter()))

    def _queue(self, parts: list[tuple[np.ndarray, list[int], list[bool]]]) -> int:
        """Queue completed bins, ``(frames, bin_end_us, reset)`` parts from the binner."""
        if not parts:
            return 0
        now = time.perf_counter()
        n = 0
        append = self.pending.append
        for frames, ends, resets in parts:
            for f, e, r in zip(frames, ends, resets, strict=True):
                append(Pending(BIN, f, e, r, now))
            n += len(frames)
        return n

    # ------------------------------------------------------------------ model side (worker)
    def draw_uniforms(self) -> np.ndarray:
        """This stream's draw for one step, ``[1, n_readout]``: the next ``torch.rand((1, n_readout),
        generator)``. Drawn ahead in blocks (one ``torch.rand((k, 1, n))`` gives the same numbers
        as ``k`` single draws, see :func:`service.pipeline.uniforms_for`): one torch call per
        ``UNIFORM_BLOCK`` steps instead of one per step."""
        u = self._uniforms
        i = self._u_next
        if u is None or i >= len(u):
            u = self._uniforms = uniforms_for(self.generator, UNIFORM_BLOCK, self.engine.n_readout)
            i = 0
        self._u_next = i + 1
        return u[i : i + 1]

    def reset_model_state(self) -> None:
        self.state = self.engine.init_state()
        self.ring[:] = 0
        self.head = 0

    def record_step(self, y: np.ndarray, frame: np.ndarray, bin_end_us: int, n_spikes: int | None = None) -> bool:
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
            self.input_acc = frame.astype(bool) if self.input_acc is None else (self.input_acc | frame.astype(bool))
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
            "pending_bins": len(self.pending),
            "spike_rate": c.spikes / max(1, c.bins * self.engine.n_readout),
            "latency_ms_p50": lat[len(lat) // 2] if lat else None,
            "latency_ms_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "latency_hist": {"edges_ms": list(LATENCY_EDGES_MS), "counts": list(c.latency_hist)},
        }


class Aedat4Stream:
    """Incremental AEDAT 4 decoding: whole packets are cut from the byte stream as they arrive.

    The file header (version line, uint32 size, IOHeader flatbuffer) is kept, with its data-table
    position patched to -1 (the packets of a live stream end nowhere in particular), and
    prepended to each batch of complete packets (int32 stream id, int32 size, payload), which
    ``events.read`` then checks and decodes. Bytes at or after the original data-table position
    (the file's index, not packets) are ignored.
    """

    _VERSION_LINE = b"#!AER-DAT4.0\r\n"

    def __init__(self, max_buffer: int, max_events: int) -> None:
        self.buf = bytearray()
        self.header: bytes | None = None
        self.max_buffer = max_buffer
        self.max_events = max_events
        self.max_decompressed: int | None = None  # bytes the packets of one feed may decompress to
        self.offset = 0  # absolute stream offset of buf[0]
        self.table_at = -1  # absolute offset of the data table (-1: none)

    def _take_header(self, end: int) -> None:
        from events import EventFormatError
        from events.formats.aedat4 import parse_ioheader

        base = len(self._VERSION_LINE) + 4
        head = bytearray(self.buf[:end])
        try:
            info = parse_ioheader(bytes(head[base:]), base)
        except EventFormatError as exc:
            raise ProtocolError(CLOSE_INVALID, f"AEDAT 4: {exc}") from exc
        self.table_at = int(info["data_table_position"])
        if self.table_at >= 0:
            # locate the int64 field 1 of the IOHeader table and set it to -1
            root = struct.unpack_from("<I", head, base)[0]
            vt = root - struct.unpack_from("<i", head, base + root)[0]
            off = struct.unpack_from("<H", head, base + vt + 6)[0]
            struct.pack_into("<q", head, base + root + off, -1)
        self.header = bytes(head)
        del self.buf[:end]
        self.offset = end

    def feed(self, data: bytes) -> np.ndarray:
        from events import EVENT_DTYPE, EventFormatError, read

        none = np.zeros(0, EVENT_DTYPE)
        if self.table_at >= 0 and self.offset >= self.table_at:
            return none
        self.buf += data
        if len(self.buf) > self.max_buffer:
            raise ProtocolError(CLOSE_INVALID, f"AEDAT 4 packet larger than {self.max_buffer} bytes")
        if self.header is None:
            if len(self.buf) < len(self._VERSION_LINE) + 4:
                return none
            if not bytes(self.buf[: len(AEDAT4_MAGIC)]) == AEDAT4_MAGIC:
                raise ProtocolError(CLOSE_INVALID, "AEDAT 4 stream does not start with '#!AER-DAT4.0'")
            (hsize,) = struct.unpack_from("<i", self.buf, len(self._VERSION_LINE))
            if hsize < 0 or hsize > self.max_buffer:
                raise ProtocolError(CLOSE_INVALID, f"AEDAT 4 header size {hsize} is invalid")
            end = len(self._VERSION_LINE) + 4 + hsize
            if len(self.buf) < end:
                return none
            self._take_header(end)
        limit = len(self.buf) if self.table_at < 0 else min(len(self.buf), self.table_at - self.offset)
        o = 0
        while limit - o >= 8:
            _, size = struct.unpack_from("<ii", self.buf, o)
            if size < 0 or size > self.max_buffer:
                raise ProtocolError(CLOSE_INVALID, f"AEDAT 4 packet size {size} is invalid")
            if limit - o - 8 < size:
                break
            o += 8 + size
        if o == 0:
            return none
        chunk = self.header + bytes(self.buf[:o])  # type: ignore[operator]
        del self.buf[:o]
        self.offset += o
        try:
            rec = read(chunk, format="aedat4", max_events=self.max_events, max_decompressed=self.max_decompressed)
        except EventFormatError as exc:
            over = "max_events" in str(exc) or "max_decompressed" in str(exc)  # a budget, not corrupt data
            raise ProtocolError(CLOSE_TOO_BIG if over else CLOSE_INVALID, f"AEDAT 4: {exc}") from None
        return rec.events
