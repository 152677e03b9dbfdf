"""The scheduler: one asyncio task that steps every stream with a complete bin, batched.

Like Triton's sequence batcher: each tick takes at most one unit of work from every session
that has some, groups the sessions by model, and per model

1. stacks their encoder states (a fresh state for a session whose bin follows a time gap),
2. draws each stream's uniforms from *its own* generator (so a stream's spikes do not depend on
   the batch it lands in),
3. runs one batched encoder step,
4. runs one batched decoder call over the windows of the streams due to emit a frame,

then hands the encoded frames to the sessions' bounded outgoing queues (never awaiting a
client, so a slow client only loses its own frames). Ticks run on the event loop (a worker thread
only added GIL hand-offs for the small digit models), except the ticks of scene-model streams
(tens of ms of convolutions, which release the GIL): those run in a thread of their own, and a
session waits for its tick to come back before it is collected again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .guard import TRIMMER
from .protocol import encode_frame, frame_json
from .render import event_rgb, pack_spikes, png_encode, png_rgb, to_uint8
from .session import BIN, EMIT_NOW, END, Outgoing, Pending, Session

log = logging.getLogger("vdib.service")


def engine_input_shape(s: Session) -> tuple[int, ...]:
    return tuple(s.spec.shape)


def _failure(kind: str) -> Outgoing:
    """The error message that closes a stream whose work failed in a tick (1011); ``kind``: the
    exception's type name."""
    msg = json.dumps({"type": "error", "code": 1011, "message": f"internal error: {kind}"})
    return Outgoing(msg, False, close_code=1011)


def _end_message(s: Session) -> Callable[[], str]:
    """The final stats, rendered when sent (so it counts every frame sent before it). Holds the
    session weakly: the message waits in the session's own queue (no reference cycle)."""
    ref = weakref.ref(s)

    def render() -> str:
        live = ref()
        return json.dumps({**live.stats(), "type": "end"} if live is not None else {"type": "end"})

    return render


class Scheduler:
    """Owns the set of live sessions and the tick loop (start with :meth:`start`)."""

    def __init__(
        self,
        metrics: Any,
        max_batch: int = 1024,
        inline: bool = True,
        tick_interval_s: float = 0.0,
        png_level: int = 0,
    ) -> None:
        self.metrics = metrics
        self.png_level = png_level
        self.inline = inline
        self.tick_interval_s = tick_interval_s
        self.max_batch = max_batch
        self.sessions: dict[str, Session] = {}
        self.slots = 0  # streams admitted (a slot is taken before its session exists)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdib-tick")
        # Scene-model streams (tens of ms of convolutions per step, which release the GIL) tick in
        # a thread of their own, so they never stall the event loop or the digit streams' ticks;
        # a session is in at most one tick at a time (``_busy``: its tick has not come back yet).
        self._scene_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdib-scene")
        self._busy: set[str] = set()
        self._cursor = 0  # round-robin start when more than max_batch sessions are due
        self.fault: Callable[[str, list[Session]], None] | None = None  # tests: see _probe
        self.trimmer = TRIMMER  # one per process
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
        self._scene_pool.shutdown(wait=False, cancel_futures=True)

    def acquire_slot(self, limit: int) -> bool:
        """Take one of ``limit`` stream slots; False when all are taken."""
        if self.slots >= limit:
            return False
        self.slots += 1
        return True

    def release_slot(self) -> None:
        self.slots -= 1

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session

    def remove(self, session: Session) -> None:
        session.closed = True
        self.sessions.pop(session.id, None)
        self.trimmer.request()  # the closed stream's memory back to the OS (at most every 10 s)

    def notify(self) -> None:
        """Wake the loop: some session has new work."""
        self._wake.set()

    def warmup(self, entry: Any) -> None:
        """Run a synthetic stream through binner, batched ticks and frame encoding once, so the
        first live streams do not pay for lazy imports and first-call costs (~0.5 s here)."""
        import numpy as np

        from events import EVENT_DTYPE

        sessions = []
        width, height = entry.warmup_sensor()
        for seed in range(4):
            roi, pool = entry.resolve_roi(width, height, "centre")
            sessions.append(
                Session(
                    entry,
                    roi,
                    pool,
                    entry.dt_us,
                    2,
                    seed,
                    spikes=entry.family != "scene",
                    inputs=True,
                    fmt="binary",
                    encoding="packed",
                    t0_us=None,
                    max_gap_us=10 * entry.dt_us,
                    out_queue_frames=4,
                )
            )
        ev = np.zeros(200, EVENT_DTYPE)
        ev["t"] = np.arange(200) * (entry.dt_us // 20)
        ev["x"] = np.arange(200) % width
        ev["y"] = np.arange(200) % height
        ev["p"] = np.arange(200) % 2
        from .protocol import encode_events

        packet = encode_events(ev)
        for i, s in enumerate(sessions):
            if i % 2:  # the path a websocket message takes (compiled packet kernel), cold on a new install
                n, segments = s.bin_message(packet)
                s.counters.events += n
                s.queue(segments)
            else:
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
                offloaded = [w for w in work if w[0].entry.family == "scene"]
                if offloaded:
                    work = [w for w in work if w[0].entry.family != "scene"]
                    self._tick_off_loop(loop, offloaded)
                    del offloaded
                    if not work:
                        await asyncio.sleep(0)
                        continue
                try:
                    if self.inline:
                        results = self._tick(work)
                    else:
                        results = await loop.run_in_executor(self._pool, self._tick, work)
                except Exception as exc:  # noqa: BLE001 - a bug outside the isolated steps
                    log.exception("scheduler tick failed")
                    results = [(s, _failure(type(exc).__name__)) for s, _ in work]
                self._deliver(results)
                # no session may stay referenced by this frame while it waits for the next tick
                del work, results
                self._update_rate()
                await asyncio.sleep(0)  # let socket reads and sends run between ticks

    def _tick_off_loop(self, loop: asyncio.AbstractEventLoop, work: list[tuple[Session, Pending]]) -> None:
        """Run ``work``'s tick in the scene thread; its results are delivered on the loop when it
        is done, and its sessions are not collected again before that."""
        ids = [s.id for s, _ in work]
        self._busy.update(ids)
        fut = loop.run_in_executor(self._scene_pool, self._tick, work)

        def done(f: asyncio.Future[list[tuple[Session, Outgoing]]]) -> None:
            self._busy.difference_update(ids)
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.error("scheduler tick (scene streams) failed: %s: %s", type(exc).__name__, exc)
                results = [(s, _failure(type(exc).__name__)) for s, _ in work]
            else:
                results = f.result()
            work.clear()  # no session stays referenced by this callback
            self._deliver(results)
            self._wake.set()

        fut.add_done_callback(done)

    def _deliver(self, results: list[tuple[Session, Outgoing]]) -> None:
        for s, msg in results:
            if msg.close_code == 1011:
                self.sessions.pop(s.id, None)  # stepped no more; its handler closes it
            try:
                s.deliver(msg, self.metrics)
            except Exception:  # noqa: BLE001 - this stream only
                log.exception("stream %s: delivering a message failed", s.id)
                self.sessions.pop(s.id, None)

    def _collect(self) -> list[tuple[Session, Pending]]:
        busy = self._busy
        due = [
            s for s in self.sessions.values() if s.pending and not s.closed and (not busy or s.id not in busy)
        ]
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

    # ------------------------------------------------------------------ one tick (event loop; scene streams: their thread)
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
        """One engine's share of a tick. Every step is isolated: an exception while preparing,
        stepping, decoding or encoding a stream's work closes that stream (1011) and no other.
        Per-stream steps run in their own ``try``; a batched step (state stack, encoder step,
        decoder call) that fails is retried stream by stream (nothing of a stream changes
        before its batched step succeeded), so only the streams that fail alone are closed."""
        engine = items[0][0].engine
        # the error as text: an exception kept here would hold its traceback, whose frames hold
        # this dict (a reference cycle that keeps the failed session alive)
        failed: dict[int, tuple[Session, str, str]] = {}
        out: list[tuple[Session, Outgoing]] = []

        def fail(s: Session, exc: BaseException, step: str) -> None:
            failed.setdefault(
                id(s), (s, type(exc).__name__, f"{type(exc).__name__}: {exc}"[:300] + f" (in {step})")
            )

        def batched(
            step: str, rows: list[Any], fn: Callable[[list[Any]], Any]
        ) -> list[tuple[list[Any], Any]]:
            """``fn(rows)`` at once; when it fails, ``fn([row])`` for each row: the rows whose
            stream fails alone fail, the others go on in batches of one (this tick only)."""
            if failed:
                rows = [r for r in rows if id(r[0]) not in failed]
            if not rows:
                return []
            try:
                if probe is not None:
                    probe(step, [r[0] for r in rows])
                return [(rows, fn(rows))]
            except Exception as exc:  # noqa: BLE001 - find the stream that causes it
                if len(rows) == 1:
                    fail(rows[0][0], exc, step)
                    return []
            done = []  # one at a time (a loop, not recursion: a recursive closure is a reference cycle)
            for r in rows:
                try:
                    if probe is not None:
                        probe(step, [r[0]])
                    done.append(([r], fn([r])))
                except Exception as exc:  # noqa: BLE001 - this stream only
                    fail(r[0], exc, step)
            return done

        # Per-stream steps are plain loops with a try per row (no call per row: this is the
        # scheduler's hot path, ~100 rows per tick).
        probe = self.fault
        emit: list[tuple[Session, float]] = []
        prepared: list[tuple[Session, Pending, np.ndarray, np.ndarray]] = []
        n_in = 0
        for s, it in items:
            if it.kind != BIN:
                continue
            try:
                if probe is not None:
                    probe("prepare", [s])
                if it.reset:
                    s.reset_model_state()
                x = it.frame.reshape(-1)  # type: ignore[union-attr]
                if not n_in:
                    n_in = math.prod(engine_input_shape(s))
                if x.shape[0] != n_in:
                    raise ValueError(f"frame of {x.shape[0]} inputs for a model of {n_in}")
                prepared.append((s, it, x, s.draw_uniforms()))
            except Exception as exc:  # noqa: BLE001 - this stream only
                fail(s, exc, "prepare")
        if prepared:
            prepared.sort(key=lambda r: engine.order_key(r[0].state))

            def step_rows(rows: list[Any]) -> tuple[np.ndarray, list[Any]]:
                x = np.stack([r[2] for r in rows]).astype(np.float32)
                u = np.concatenate([r[3] for r in rows])
                y, state = engine.step(x, engine.stack([r[0].state for r in rows]), u)
                return y, engine.unstack(state, len(rows))

            n_stepped = 0
            for rows, (y, states) in batched("step", prepared, step_rows):
                counts = y.sum(axis=1, dtype=np.int64).tolist()  # one reduction for the batch
                for (s, it, _, _), st, yi, c in zip(rows, states, y, counts, strict=True):
                    try:
                        if probe is not None:
                            probe("record", [s])
                        s.state = st
                        due = s.record_step(yi, it.frame, it.bin_end_us, c)  # type: ignore[arg-type]
                    except Exception as exc:  # noqa: BLE001 - this stream only
                        fail(s, exc, "record")
                        continue
                    n_stepped += 1
                    if due:
                        emit.append((s, it.t_ready))
            if n_stepped:
                self.steps += n_stepped
                self.metrics.steps.inc(n_stepped)
                self.metrics.batch_size.observe(n_stepped)
        for s, it in items:
            if it.kind == EMIT_NOW and s.steps > s.last_emit_step and id(s) not in failed:
                emit.append((s, it.t_ready))
        if emit:
            wrows = []
            for s, t in emit:
                if failed and id(s) in failed:
                    continue
                try:
                    if probe is not None:
                        probe("window", [s])
                    wrows.append((s, t, s.window()))
                except Exception as exc:  # noqa: BLE001 - this stream only
                    fail(s, exc, "window")

            def decode_rows(rows: list[Any]) -> np.ndarray:
                return to_uint8(engine.decode(np.stack([r[2] for r in rows])))  # one conversion per call

            for rows, images in batched("decode", wrows, decode_rows):
                for (s, t, _), img in zip(rows, images, strict=True):
                    try:
                        if probe is not None:
                            probe("encode", [s])
                        out.append((s, self._frame_message(s, img, t)))
                    except Exception as exc:  # noqa: BLE001 - this stream only
                        fail(s, exc, "encode")
        for s, it in items:
            if it.kind == END and id(s) not in failed:
                out.append((s, Outgoing(_end_message(s), False, close_code=1000)))
        for s, kind, text in failed.values():
            log.error("stream %s failed in the scheduler: %s", s.id, text)
            s.pending.clear()
            out.append((s, _failure(kind)))
        return out

    def _probe(self, step: str, sessions: list[Session]) -> None:
        """Fault injection for tests (``fault(step, sessions)`` may raise for some sessions)."""
        if self.fault is not None:
            self.fault(step, sessions)

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
        n = (
            n if n <= 0xFFFF else 0
        )  # the header's 16 bits (a scene stream's K*h*w readouts; it sends no spikes)
        packed = (pack_spikes(spikes) if spikes is not None else b"") if s.want_spikes else None
        rows = 0 if spikes is None else len(spikes)
        encode = frame_json if s.format == "json" else encode_frame
        return Outgoing(encode(bin_index, bin_end, png, inp, packed, rows, n), True, t_ready)
