"""The scheduler: one asyncio task that steps every stream with a complete bin, batched.

Like Triton's sequence batcher: each tick takes at most one unit of work from every session
that has some, groups the sessions by model, and per model

1. stacks their encoder states (a fresh state for a session whose bin follows a time gap),
2. draws each stream's uniforms from *its own* generator (so a stream's spikes do not depend on
   the batch it lands in),
3. runs one batched encoder step,
4. runs one batched decoder call over the windows of the streams due to emit a frame,

then hands the encoded frames to the sessions' bounded outgoing queues (never awaiting a
client, so a slow client only loses its own frames). The tensor work runs in one worker thread
so the event loop keeps reading sockets while a tick computes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .protocol import encode_frame
from .render import event_rgb, pack_spikes, png_encode, png_rgb, to_uint8
from .session import BIN, EMIT_NOW, END, Outgoing, Pending, Session

log = logging.getLogger("vdib.service")


def _end_message(s: Session) -> Callable[[], str]:
    """The final stats, rendered when sent (so it counts every frame sent before it)."""
    return lambda: json.dumps({**s.stats(), "type": "end"})


class Scheduler:
    """Owns the set of live sessions and the tick loop (start with :meth:`start`)."""

    def __init__(self, metrics: Any, max_batch: int = 1024, inline: bool = True, tick_interval_s: float = 0.0,
                 png_level: int = 0) -> None:
        self.metrics = metrics
        self.png_level = png_level
        self.inline = inline
        self.tick_interval_s = tick_interval_s
        self.max_batch = max_batch
        self.sessions: dict[str, Session] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdib-tick")
        self._cursor = 0  # round-robin start when more than max_batch sessions are due
        self.ticks = 0
        self.steps = 0
        self._rate_t = time.perf_counter()
        self._rate_steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vdib-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session

    def remove(self, session: Session) -> None:
        session.closed = True
        self.sessions.pop(session.id, None)

    def notify(self) -> None:
        """Wake the loop: some session has new work."""
        self._wake.set()

    def warmup(self, entry: Any) -> None:
        """Run a synthetic stream through binner, batched ticks and frame encoding once, so the
        first live streams do not pay for lazy imports and first-call costs (~0.5 s here)."""
        import numpy as np

        from events import EVENT_DTYPE

        sessions = []
        for seed in range(4):
            roi, pool = entry.resolve_roi(entry.input_shape[2], entry.input_shape[1], "centre")
            sessions.append(Session(entry, roi, pool, entry.dt_us, 2, seed, spikes=True, inputs=True, fmt="binary",
                                    encoding="packed", t0_us=None, max_gap_us=10 * entry.dt_us, out_queue_frames=4))
        ev = np.zeros(200, EVENT_DTYPE)
        ev["t"] = np.arange(200) * (entry.dt_us // 20)
        ev["x"] = np.arange(200) % entry.input_shape[2]
        ev["y"] = np.arange(200) % entry.input_shape[1]
        ev["p"] = np.arange(200) % 2
        for s in sessions:
            s.push_events(ev)
            s.flush(end=True)
        from .metrics import Metrics

        real, self.metrics = self.metrics, Metrics()  # keep the warm-up out of /metrics
        try:
            while any(s.pending for s in sessions):
                self._tick([(s, s.pending.popleft()) for s in sessions if s.pending])
        finally:
            self.metrics = real
            self.ticks = self.steps = 0

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_tick = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                # Like Triton's max queue delay: let bins of other streams arrive so that one tick
                # steps many streams (per-tick costs, above all the decoder's weight reads, are
                # nearly independent of the batch size).
                wait = last_tick + self.tick_interval_s - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                last_tick = time.perf_counter()
                work = self._collect()
                if not work:
                    break
                try:
                    if self.inline:
                        results = self._tick(work)
                    else:
                        results = await loop.run_in_executor(self._pool, self._tick, work)
                except Exception as exc:  # noqa: BLE001 - one bad tick must not kill the service
                    log.exception("scheduler tick failed")
                    for s, _ in work:
                        s.deliver(Outgoing(json.dumps({"type": "error", "code": 1011, "message": f"internal error: {exc}"}),
                                           False, close_code=1011))
                    continue
                for s, msg in results:
                    s.deliver(msg, self.metrics)
                self._update_rate()
                await asyncio.sleep(0)  # let socket reads and sends run between ticks

    def _collect(self) -> list[tuple[Session, Pending]]:
        due = [s for s in self.sessions.values() if s.pending and not s.closed]
        if not due:
            return []
        if len(due) > self.max_batch:
            start = self._cursor % len(due)
            due = (due[start:] + due[:start])[: self.max_batch]
            self._cursor += self.max_batch
        return [(s, s.pending.popleft()) for s in due]

    def _update_rate(self) -> None:
        now = time.perf_counter()
        if now - self._rate_t >= 1.0:
            self.metrics.steps_per_second.set((self.steps - self._rate_steps) / (now - self._rate_t))
            self._rate_t, self._rate_steps = now, self.steps

    # ------------------------------------------------------------------ one tick (worker thread)
    def _tick(self, work: list[tuple[Session, Pending]]) -> list[tuple[Session, Outgoing]]:
        self.ticks += 1
        by_engine: dict[int, list[tuple[Session, Pending]]] = {}
        for s, item in work:
            by_engine.setdefault(id(s.engine), []).append((s, item))
        out: list[tuple[Session, Outgoing]] = []
        for items in by_engine.values():
            out.extend(self._tick_engine(items))
        return out

    def _tick_engine(self, items: list[tuple[Session, Pending]]) -> list[tuple[Session, Outgoing]]:
        engine = items[0][0].engine
        steps = [(s, it) for s, it in items if it.kind == BIN]
        emit: list[tuple[Session, float]] = []
        if steps:
            for s, it in steps:
                if it.reset:
                    s.reset_model_state()
            steps.sort(key=lambda w: engine.order_key(w[0].state))
            x = np.stack([it.frame.reshape(-1) for _, it in steps]).astype(np.float32)  # type: ignore[union-attr]
            u = np.concatenate([s.draw_uniforms() for s, _ in steps])
            state = engine.stack([s.state for s, _ in steps])
            y, state = engine.step(x, state, u)
            counts = y.sum(axis=1, dtype=np.int64).tolist()  # one reduction for the batch
            for (s, it), st, yi, c in zip(steps, engine.unstack(state, len(steps)), y, counts, strict=True):
                s.state = st
                if s.record_step(yi, it.frame, it.bin_end_us, c):  # type: ignore[arg-type]
                    emit.append((s, it.t_ready))
            self.steps += len(steps)
            self.metrics.steps.inc(len(steps))
            self.metrics.batch_size.observe(len(steps))
        for s, it in items:
            if it.kind == EMIT_NOW and s.steps > s.last_emit_step:
                emit.append((s, it.t_ready))
        out: list[tuple[Session, Outgoing]] = []
        if emit:
            windows = np.stack([s.window() for s, _ in emit])
            images = to_uint8(engine.decode(windows))  # one conversion for the whole tick
            for (s, t_ready), img in zip(emit, images, strict=True):
                out.append((s, self._frame_message(s, img, t_ready)))
        for s, it in items:
            if it.kind == END:
                out.append((s, Outgoing(_end_message(s), False, close_code=1000)))
        return out

    def _frame_message(self, s: Session, img: np.ndarray, t_ready: float) -> Outgoing:
        """The frame message of ``img`` (uint8 ``[H, W]``, :func:`render.to_uint8` of the decoder
        output) for the session's latest step."""
        bin_index = s.steps - 1
        bin_end = s.last_bin_end
        s.last_emit_step = s.steps
        png = png_encode(img, self.png_level)
        inp = png_rgb(event_rgb(s.input_acc)) if s.want_inputs and s.input_acc is not None else None
        spikes = np.stack(s.since_emit) if s.want_spikes and s.since_emit else None
        s.since_emit.clear()
        s.input_acc = None
        n = s.engine.n_readout
        if s.format == "json":
            msg: dict[str, Any] = {"type": "frame", "bin": bin_index, "bin_end_us": bin_end,
                                   "image": base64.b64encode(png).decode()}
            if inp is not None:
                msg["input"] = base64.b64encode(inp).decode()
            if s.want_spikes:
                msg["spikes"] = base64.b64encode(pack_spikes(spikes) if spikes is not None else b"").decode()
                msg["spike_rows"] = 0 if spikes is None else len(spikes)
                msg["n_readout"] = n
            return Outgoing(json.dumps(msg), True, t_ready)
        packed = (pack_spikes(spikes) if spikes is not None else b"") if s.want_spikes else None
        rows = 0 if spikes is None else len(spikes)
        return Outgoing(encode_frame(bin_index, bin_end, png, inp, packed, rows, n), True, t_ready)
