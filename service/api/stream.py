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
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..deps import bearer, key_ok
from ..guard import TokenBucket
from ..protocol import (
    AEDAT4_MAGIC,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_INVALID,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNSUPPORTED,
    EVENT_MAGIC,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    ProtocolError,
    StartMessage,
    default_emit,
)
from ..registry import RoiError
from ..session import Aedat4Stream, Outgoing, Session

log = logging.getLogger("vdib.service")
router = APIRouter(tags=["stream"])

#: Largest |t0_us| a start message may give (bin end times stay far inside int64).
MAX_T_US = 1 << 62


class _Closed(Exception):
    """The connection is gone (client closed or we closed it)."""


async def _send_error(ws: WebSocket, metrics: Any, code: int, message: str) -> None:
    metrics.streams_rejected.labels(str(code)).inc()
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))
    with contextlib.suppress(Exception):
        await ws.close(code=code, reason=message[:120])


async def _receive(ws: WebSocket, timeout: float) -> Any:
    try:
        async with asyncio.timeout(timeout):
            msg = await ws.receive()
    except TimeoutError as exc:
        raise ProtocolError(CLOSE_GOING_AWAY, f"idle for {timeout:g} s: stream timed out") from exc
    if msg["type"] == "websocket.disconnect":
        raise _Closed()
    return msg


def _size(msg: Mapping[str, Any]) -> int:
    b, t = msg.get("bytes"), msg.get("text")
    return len(b) if b is not None else len(t.encode()) if t is not None else 0


def _parse_json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(CLOSE_INVALID, f"text message is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(CLOSE_INVALID, "text message is JSON nested too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(CLOSE_INVALID, "a text message must be a JSON object with a string 'type'")
    return obj


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    """A live stream: start message, event packets, flush/end; frames and stats back."""
    app = ws.app
    settings, registry, scheduler, metrics = (
        app.state.settings, app.state.registry, app.state.scheduler, app.state.metrics,
    )
    offered = list(ws.scope.get("subprotocols") or [])
    key = bearer(ws.headers.get("authorization"))
    for proto in offered:
        if proto.startswith("bearer."):
            key = proto[len("bearer.") :]
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)

    slot = False
    session: Session | None = None
    sender: asyncio.Task[None] | None = None
    try:
        # Authentication first: no slot, buffer or session for a client without a valid key.
        if key is not None and not key_ok(settings, key):
            raise ProtocolError(CLOSE_POLICY, "missing or invalid API key")
        if not registry.ready[0]:
            raise ProtocolError(CLOSE_TRY_AGAIN, f"service not ready: {registry.public_reason}")
        msg = await _receive(ws, settings.start_timeout_s)
        if _size(msg) > settings.max_message_bytes:
            raise ProtocolError(CLOSE_TOO_BIG, f"message of {_size(msg)} bytes exceeds {settings.max_message_bytes}")
        if msg.get("text") is None:
            raise ProtocolError(CLOSE_UNSUPPORTED, "the first message must be the JSON start message")
        obj = _parse_json(msg["text"])
        if obj.get("type") != "start":
            raise ProtocolError(CLOSE_UNSUPPORTED, f"expected a 'start' message, got {obj.get('type')!r}")
        if not key_ok(settings, key or obj.get("api_key")):
            raise ProtocolError(CLOSE_POLICY, "missing or invalid API key")
        if app.state.stream_slots >= settings.max_sessions:
            raise ProtocolError(CLOSE_TRY_AGAIN, f"session limit of {settings.max_sessions} streams reached; try again later")
        app.state.stream_slots += 1
        slot = True
        if obj.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ProtocolError(CLOSE_UNSUPPORTED, f"protocol version {obj.get('protocol')!r} is not supported (server speaks {PROTOCOL_VERSION})")
        try:
            start = StartMessage.model_validate(obj)
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ProtocolError(CLOSE_INVALID, f"bad start message: {errs}") from exc
        try:
            entry = registry.get(start.model)
        except KeyError as exc:
            raise ProtocolError(CLOSE_UNSUPPORTED, exc.args[0]) from exc
        try:
            roi, pool = entry.resolve_roi(start.sensor.width, start.sensor.height, start.roi)
        except RoiError as exc:
            raise ProtocolError(CLOSE_UNSUPPORTED, str(exc)) from exc
        dt = start.dt_us or entry.dt_us
        if dt < settings.min_dt_us:
            raise ProtocolError(CLOSE_POLICY, f"dt_us {dt} is below the service's min_dt_us of {settings.min_dt_us}")
        if start.t0_us is not None and abs(start.t0_us) > MAX_T_US:
            raise ProtocolError(CLOSE_INVALID, f"t0_us must be within +-{MAX_T_US}")
        emit = None if start.emit == "last" else int(start.emit or default_emit(dt))
        session = Session(
            entry, roi, pool, dt, emit, start.seed, spikes=start.spikes, inputs=start.inputs, fmt=start.format,
            encoding=start.encoding, t0_us=start.t0_us, max_gap_us=settings.max_gap_us,
            out_queue_frames=settings.out_queue_frames,
        )
        scheduler.add(session)
        metrics.streams_total.inc()
        metrics.active_streams.inc()
        await ws.send_text(json.dumps({
            "type": "ready", "protocol": PROTOCOL_VERSION, "session": session.id, "model": entry.name,
            "roi": list(roi), "pool": pool, "dt_us": dt, "emit": emit if emit is not None else "last",
            "input_shape": list(entry.input_shape), "image_shape": list(entry.engine.image_shape),
            "n_readout": entry.engine.n_readout, "tau_d": entry.engine.tau_d, "format": start.format,
            "spikes": start.spikes, "inputs": start.inputs, "seed": start.seed,
            "limits": settings.public_limits(),
        }))
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
        if slot:
            app.state.stream_slots -= 1
        if session is not None:
            scheduler.remove(session)
            metrics.active_streams.dec()
            session.release()
        if sender is not None:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(BaseException):
                await sender  # also takes a finished sender's error (no "never retrieved" task)
        session = sender = None


async def _ingest(ws: WebSocket, s: Session, settings: Any, scheduler: Any, metrics: Any,
                  sender: asyncio.Task[None]) -> tuple[int, str] | None:
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


async def _ingest_loop(ws: WebSocket, s: Session, settings: Any, scheduler: Any, metrics: Any,
                       sender: asyncio.Task[None], me: asyncio.Task[Any] | None, stop_receiving: Any) -> None:
    # The idle timeout is one watchdog timer per timeout period, not an ``asyncio.timeout``
    # around every receive: a stream gets ~100 packets per second, and a timer armed and
    # cancelled per packet costs more than binning the packet.
    loop = asyncio.get_running_loop()
    timeout = settings.idle_timeout_s
    watch = _Watchdog(loop, timeout, me)
    receive, notify = ws.receive, scheduler.notify
    max_bytes, max_pending = settings.max_message_bytes, settings.max_pending_bins
    offload = settings.offload_bytes
    now = loop.time()
    messages = TokenBucket(settings.message_rate_per_s, settings.message_burst, now)
    control = TokenBucket(settings.control_rate_per_s, settings.control_burst, now)
    pool = ws.app.state.ingest_pool
    try:
        while True:
            try:
                msg = await receive()
            except asyncio.CancelledError:
                if watch.fired and me is not None:
                    me.uncancel()
                    raise ProtocolError(CLOSE_GOING_AWAY, f"idle for {timeout:g} s: stream timed out") from None
                if not sender.done() or me is None:
                    raise
                me.uncancel()
                return
            now = watch.last = loop.time()
            if msg["type"] == "websocket.disconnect":
                raise _Closed()
            if not messages.take(now):
                raise ProtocolError(CLOSE_POLICY, f"more than {settings.message_rate_per_s:g} messages per second "
                                    f"(burst {settings.message_burst})")
            data = msg.get("bytes")
            if data is not None:
                if len(data) > max_bytes:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message of {len(data)} bytes exceeds {max_bytes}")
                if len(data) >= offload or s.encoding != "packed" and _is_aedat4(s, data):
                    # decoding and binning that cost real CPU run off the event loop (bounded pool)
                    n = await loop.run_in_executor(pool, _push, s, data, settings)
                else:
                    n = _push(s, data, settings)
                if n:
                    s.unreported_events += n
                    if len(s.pending) > max_pending:
                        raise ProtocolError(
                            CLOSE_POLICY, f"{len(s.pending)} bins waiting (limit {max_pending}): "
                            "the stream runs ahead of the service; slow down or raise dt_us",
                        )
                    notify()
                continue
            n = _size(msg)
            if n > max_bytes:
                raise ProtocolError(CLOSE_TOO_BIG, f"message of {n} bytes exceeds {max_bytes}")
            if not control.take(now):
                raise ProtocolError(CLOSE_POLICY, f"more than {settings.control_rate_per_s:g} text messages per "
                                    f"second (burst {settings.control_burst})")
            obj = _parse_json(msg.get("text") or "")
            kind = obj["type"]
            if kind == "flush":
                s.flush()
                if len(s.pending) > max_pending:
                    raise ProtocolError(CLOSE_POLICY, f"{len(s.pending)} bins and flushes waiting (limit {max_pending})")
                notify()
            elif kind == "end":
                watch.cancel()  # the remaining frames may take longer than the idle timeout
                s.flush(end=True)
                notify()
                sender.remove_done_callback(stop_receiving)
                with contextlib.suppress(Exception):
                    await sender  # sends the remaining frames, the final stats, then closes with 1000
                return
            elif kind == "ping":
                if len(s.out) <= 2 * s.out_limit:  # a client that reads nothing gets no more pongs
                    s.deliver(Outgoing(json.dumps({"type": "pong", "t": time.time()}), False))
            elif kind == "start":
                raise ProtocolError(CLOSE_UNSUPPORTED, "the stream has already started")
            else:
                raise ProtocolError(CLOSE_UNSUPPORTED, f"unknown message type {kind!r} (expected flush, end or ping)")
    finally:
        watch.cancel()
        s.report_events(metrics)


class _Watchdog:
    """Cancels ``task`` once nothing was received for ``timeout`` seconds (``last`` is the time
    of the latest message, updated by the receiver; the timer re-arms itself from it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, task: asyncio.Task[Any] | None) -> None:
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


def _is_aedat4(s: Session, data: bytes) -> bool:
    """Whether ``data`` goes to the stream's AEDAT 4 decoder (``auto``: it starts like one)."""
    return s.encoding == "aedat4" or s.encoding == "auto" and data[:1] == AEDAT4_MAGIC[:1]


def _push(s: Session, data: bytes, settings: Any) -> int:
    """Bin one binary message (an event packet or AEDAT 4 bytes); its number of events."""
    if s.encoding == "auto":
        if not data:
            return 0
        if data[:4] == EVENT_MAGIC:
            s.encoding = "packed"
        elif data[: len(AEDAT4_MAGIC)] == AEDAT4_MAGIC or AEDAT4_MAGIC.startswith(bytes(data)):
            s.encoding = "aedat4"  # a stream cut anywhere, even inside its magic
        else:
            raise ProtocolError(CLOSE_UNSUPPORTED, "binary data is neither a 'VDEV' event packet nor an AEDAT 4 stream")
    if s.encoding == "aedat4":
        if s.aedat4 is None:
            s.aedat4 = Aedat4Stream(max_buffer=settings.max_message_bytes * 4, max_events=settings.max_message_events)
            s.aedat4.max_decompressed = settings.max_message_decoded_bytes
        events = s.aedat4.feed(data)
        if len(events):
            s.push_events(events)
        return len(events)
    return s.push_packet(data)


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
