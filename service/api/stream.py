"""WS /v1/stream: live event streams, protocol version 1 (service/protocol.py, docs/service.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..deps import bearer, key_ok
from ..guard import STARTED, TokenBucket
from ..protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNSUPPORTED,
    SUBPROTOCOL,
    ProtocolError,
    StartMessage,
    error_message,
    parse_message,
    parse_start,
    pong_message,
    ready_message,
)
from ..session import Outgoing, Session, start_session

log = logging.getLogger("vdib.service")
router = APIRouter(tags=["stream"])


class _Closed(Exception):
    """The connection is gone (client closed or we closed it)."""


async def _send_error(ws: WebSocket, metrics: Any, code: int, message: str) -> None:
    metrics.streams_rejected.labels(str(code)).inc()
    with contextlib.suppress(Exception):
        await ws.send_text(error_message(code, message))
    with contextlib.suppress(Exception):
        await ws.close(code=code, reason=message[:120])


def _size(msg: Mapping[str, Any]) -> int:
    b, t = msg.get("bytes"), msg.get("text")
    return len(b) if b is not None else len(t.encode()) if t is not None else 0


async def _handshake(ws: WebSocket, key: str | None) -> StartMessage:
    """Authentication first (no slot, buffer or session for a client without a valid key), then
    the start message within ``start_timeout_s``."""
    settings, registry = ws.app.state.settings, ws.app.state.registry
    if key is not None and not key_ok(settings, key):
        raise ProtocolError(CLOSE_POLICY, "missing or invalid API key")
    if not registry.ready[0]:
        raise ProtocolError(CLOSE_TRY_AGAIN, f"service not ready: {registry.public_reason}")
    try:
        async with asyncio.timeout(settings.start_timeout_s):
            msg = await ws.receive()
    except TimeoutError:
        raise ProtocolError(
            CLOSE_GOING_AWAY, f"idle for {settings.start_timeout_s:g} s: stream timed out"
        ) from None
    if msg["type"] == "websocket.disconnect":
        raise _Closed()
    if _size(msg) > settings.max_message_bytes:
        raise ProtocolError(
            CLOSE_TOO_BIG, f"message of {_size(msg)} bytes exceeds {settings.max_message_bytes}"
        )
    if msg.get("text") is None:
        raise ProtocolError(CLOSE_UNSUPPORTED, "the first message must be the JSON start message")
    obj = parse_message(msg["text"])
    if obj["type"] == "start" and not key_ok(settings, key or obj.get("api_key")):
        raise ProtocolError(CLOSE_POLICY, "missing or invalid API key")
    return parse_start(obj)


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    """A live stream: start message, event packets, flush/end; frames and stats back."""
    settings, scheduler, metrics = ws.app.state.settings, ws.app.state.scheduler, ws.app.state.metrics
    offered = list(ws.scope.get("subprotocols") or [])
    keys = [p[len("bearer.") :] for p in offered if p.startswith("bearer.")]
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    slot, session, sender = False, None, None
    try:
        start = await _handshake(ws, keys[-1] if keys else bearer(ws.headers.get("authorization")))
        if not (slot := scheduler.acquire_slot(settings.max_sessions)):
            raise ProtocolError(
                CLOSE_TRY_AGAIN, f"session limit of {settings.max_sessions} streams reached; try again later"
            )
        session = start_session(start, ws.app.state.registry, settings)
        scheduler.add(session)
        metrics.streams_total.inc()
        metrics.active_streams.inc()
        ws.scope[STARTED] = True  # authenticated and started: the websocket layer's full message size
        await ws.send_text(ready_message(session, start, settings.public_limits()))
        sender = asyncio.create_task(_sender(ws, session, metrics, settings.stats_interval_s))
        # The receive loop runs in a task of its own: a task resumes through its own coroutine
        # frames only, while this handler sits ~20 ASGI middleware frames deep (uvicorn,
        # Starlette, FastAPI), each of which would be resumed for every message received.
        # The task returns its error instead of raising it: a task that ends with an exception
        # keeps it, its traceback and the frames' locals (the session) in a reference cycle.
        error = await asyncio.create_task(_ingest(ws, session, settings, scheduler, metrics, sender))
        if error is not None:
            await _send_error(ws, metrics, *error)
    except ProtocolError as exc:
        await _send_error(ws, metrics, exc.code, exc.message)
    except (_Closed, WebSocketDisconnect):
        pass
    except Exception as exc:  # noqa: BLE001 - report, close this stream only
        log.exception("stream failed")
        await _send_error(ws, metrics, CLOSE_INTERNAL, f"internal error: {type(exc).__name__}")
    finally:
        await _close(scheduler, metrics, slot, session, sender)
        session = sender = None


async def _close(
    scheduler: Any, metrics: Any, slot: bool, session: Session | None, sender: asyncio.Task[None] | None
) -> None:
    """Give back the slot, drop the session from the scheduler and its buffers, stop the sender."""
    if slot:
        scheduler.release_slot()
    if session is not None:
        scheduler.remove(session)
        metrics.active_streams.dec()
        session.release()
    if sender is not None:
        if not sender.done():
            sender.cancel()
            await asyncio.wait({sender})
        if not sender.cancelled():
            # taken, not raised here: re-raised in this frame, the sender's error would get this
            # frame in its traceback, and this frame holds the task that holds the error (a cycle
            # keeping the session alive); never "exception was never retrieved" either
            sender.exception()


async def _ingest(
    ws: WebSocket, s: Session, settings: Any, scheduler: Any, metrics: Any, sender: asyncio.Task[None]
) -> tuple[int, str] | None:
    """Read client messages until ``end`` or a disconnect; bad input gives its close code and
    message (returned, not raised: see the caller)."""
    me = asyncio.current_task()

    # The sender ending (it closed the socket after an internal error, or the client vanished)
    # ends this loop too; a callback instead of a task per message keeps receiving cheap.
    def stop_receiving(_t: asyncio.Task[None]) -> None:
        if me is not None and not me.done():
            me.cancel()

    sender.add_done_callback(stop_receiving)
    try:
        await _ingest_loop(ws, s, settings, scheduler, metrics, sender, me, stop_receiving)
    except ProtocolError as exc:
        return exc.code, exc.message
    except (_Closed, WebSocketDisconnect):
        return None
    except Exception as exc:  # noqa: BLE001 - report, close this stream only
        log.error("stream %s failed: %s: %s", s.id, type(exc).__name__, exc)
        return CLOSE_INTERNAL, f"internal error: {type(exc).__name__}"
    finally:
        sender.remove_done_callback(stop_receiving)
        me = None
    return None


async def _ingest_loop(
    ws: WebSocket,
    s: Session,
    settings: Any,
    scheduler: Any,
    metrics: Any,
    sender: asyncio.Task[None],
    me: asyncio.Task[Any] | None,
    stop_receiving: Any,
) -> None:
    # The idle timeout is one watchdog timer per timeout period, not an ``asyncio.timeout``
    # around every receive: a stream gets ~100 packets per second, and a timer armed and
    # cancelled per packet costs more than binning the packet.
    loop = asyncio.get_running_loop()
    timeout = settings.idle_timeout_s
    watch = _Watchdog(loop, timeout, me)
    receive, notify = ws.receive, scheduler.notify
    max_bytes = settings.max_message_bytes
    max_pending = s.max_pending_bins if s.max_pending_bins is not None else settings.max_pending_bins
    offload = settings.offload_bytes
    now = loop.time()
    messages = TokenBucket(settings.message_rate_per_s, settings.message_burst, now)
    control = TokenBucket(settings.control_rate_per_s, settings.control_burst, now)
    cpu = TokenBucket(settings.ingest_cpu_per_s, settings.ingest_cpu_burst_s, now)  # seconds of decode + bin
    charged_from: float | None = None
    pool = ws.app.state.ingest_pool
    try:
        while True:
            try:
                msg = await receive()
            except asyncio.CancelledError:
                if watch.fired and me is not None:
                    me.uncancel()
                    raise ProtocolError(
                        CLOSE_GOING_AWAY, f"idle for {timeout:g} s: stream timed out"
                    ) from None
                if not sender.done() or me is None:
                    raise
                me.uncancel()
                return
            now = watch.last = loop.time()
            if msg["type"] == "websocket.disconnect":
                raise _Closed()
            if not messages.take(now):
                raise ProtocolError(
                    CLOSE_POLICY,
                    f"more than {settings.message_rate_per_s:g} messages per second "
                    f"(burst {settings.message_burst})",
                )
            data = msg.get("bytes")
            if data is not None:
                if len(data) > max_bytes:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message of {len(data)} bytes exceeds {max_bytes}")
                if s.offload(data, offload):
                    # decoding and binning that cost real CPU run off the event loop (bounded pool)
                    try:
                        n, segments, used = await loop.run_in_executor(
                            pool, _bin_timed, s, data, time.thread_time
                        )
                    except asyncio.CancelledError:
                        # the same stops as around receive(): idle timeout, or the sender ended
                        if watch.fired and me is not None:
                            me.uncancel()
                            raise ProtocolError(
                                CLOSE_GOING_AWAY, f"idle for {timeout:g} s: stream timed out"
                            ) from None
                        if not sender.done() or me is None:
                            raise
                        me.uncancel()
                        return
                else:
                    n, segments, used = _bin_timed(s, data, time.perf_counter)
                if charged_from is None:
                    # a stream's first message may load compiled kernels (seconds when the numba
                    # cache is cold): not charged; its size and events are bounded per message
                    charged_from = now
                elif not cpu.spend(now, used):
                    raise ProtocolError(
                        CLOSE_POLICY,
                        f"decoding and binning this stream took more than "
                        f"{settings.ingest_cpu_per_s:g} CPU s per second (burst {settings.ingest_cpu_burst_s:g} s)",
                    )
                if n:
                    s.counters.events += n
                    s.unreported_events += n
                    if s.queue(segments):
                        notify()
                continue
            n = _size(msg)
            if n > max_bytes:
                raise ProtocolError(CLOSE_TOO_BIG, f"message of {n} bytes exceeds {max_bytes}")
            if not control.take(now):
                raise ProtocolError(
                    CLOSE_POLICY,
                    f"more than {settings.control_rate_per_s:g} text messages per "
                    f"second (burst {settings.control_burst})",
                )
            kind = parse_message(msg.get("text") or "")["type"]
            if kind == "flush":
                s.flush()
                if s.pending.bins > max_pending:
                    raise ProtocolError(
                        CLOSE_POLICY, f"{s.pending.bins} bins and flushes waiting (limit {max_pending})"
                    )
                notify()
            elif kind == "end":
                watch.cancel()  # the remaining frames may take longer than the idle timeout
                s.flush(end=True)
                notify()
                sender.remove_done_callback(stop_receiving)
                # the sender sends the remaining frames, the final stats, then closes with 1000;
                # waited for without raising its error here (see _close: no traceback cycle)
                await asyncio.wait({sender})
                return
            elif kind == "ping":
                if len(s.out) <= 2 * s.out_limit:  # a client that reads nothing gets no more pongs
                    s.deliver(Outgoing(pong_message(), False))
            elif kind == "start":
                raise ProtocolError(CLOSE_UNSUPPORTED, "the stream has already started")
            else:
                raise ProtocolError(
                    CLOSE_UNSUPPORTED, f"unknown message type {kind!r} (expected flush, end or ping)"
                )
    finally:
        watch.cancel()
        s.report_events(metrics)


def _bin_timed(s: Session, data: bytes, clock: Any) -> tuple[int, list[Any], float]:
    """``s.bin_message(data)`` and the seconds it took on ``clock`` (thread CPU time in a worker)."""
    t = clock()
    n, segments = s.bin_message(data)
    return n, segments, clock() - t


class _Watchdog:
    """Cancels ``task`` once nothing was received for ``timeout`` seconds (``last`` is the time
    of the latest message, updated by the receiver; the timer re-arms itself from it)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, task: asyncio.Task[Any] | None
    ) -> None:
        self.loop, self.timeout, self.task = loop, timeout, task
        self.last = loop.time()
        self.fired = False
        self.handle: asyncio.TimerHandle | None = loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        due = self.last + self.timeout
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
            return
        self.handle = None
        if self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def _sender(ws: WebSocket, s: Session, metrics: Any, interval: float) -> None:
    """Send queued messages, and stats every ``interval`` seconds, until a closing message.

    The stats are due by a timer that sets the session's wake-up event (no ``wait_for`` per
    frame: it would arm and cancel a timer, and on Python 3.11 create a task, per frame)."""
    loop = asyncio.get_running_loop()
    event, out = s.out_event, s.out
    send = ws.send
    counters = s.counters
    next_stats = loop.time() + interval
    timer = loop.call_at(next_stats, event.set)
    try:
        while True:
            if not out and loop.time() < next_stats:
                await event.wait()
            event.clear()
            sent = 0  # frames for the Prometheus counter, added once per burst
            try:
                while out:
                    m = out.popleft()
                    if m.is_frame:
                        s.out_frames -= 1
                    data = m.data() if callable(m.data) else m.data
                    if isinstance(data, bytes):
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
                    if m.is_frame:
                        lat = time.perf_counter() - m.t_ready
                        sent += 1
                        counters.frames_sent += 1
                        counters.add_latency(lat * 1e3)
                        metrics.frame_latency.observe(lat)
                    if m.close_code is not None:
                        if ws.application_state == WebSocketState.CONNECTED:
                            await ws.close(code=m.close_code)
                        if m.close_code != 1000:
                            metrics.streams_rejected.labels(str(m.close_code)).inc()
                        return
                    if loop.time() >= next_stats:  # also while a slow client keeps the queue full
                        break
            finally:
                if sent:
                    metrics.frames_sent.inc(sent)
            if loop.time() >= next_stats:
                s.report_events(metrics)
                await send({"type": "websocket.send", "text": json.dumps(s.stats())})
                next_stats = loop.time() + interval
                timer.cancel()
                timer = loop.call_at(next_stats, event.set)
    finally:
        timer.cancel()
