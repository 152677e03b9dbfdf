"""uvicorn's ``websockets-sansio`` websocket protocol with a fast path for binary messages.

A live stream sends ~100 small binary messages (event packets) per second. uvicorn hands each
TCP read to the ``websockets`` sans-I/O parser, a chain of Python generators (~10 us per
message here, the largest per-message cost of the service after binning was compiled). This
subclass parses the frames itself and queues each complete, unfragmented, masked binary frame
(``FIN`` set, opcode 2, no extension bits, payload within ``ws_max_size``) as a
``websocket.receive`` message directly (unmasked by ``websockets``' C ``apply_mask``).

Every other frame (text, ping, pong, close, fragments, extension bits, oversized or unmasked
frames) is handed to the ``websockets`` parser unchanged and whole, so the library sees a
valid frame sequence and keeps handling the protocol (control frames, close handshake, size
limits, errors). After a fragment, a close frame, a negotiated extension or any byte the
library saw before the fast path started, the connection stays on the library path.

Sending: the app's binary and text messages go out as one unfragmented frame each, written
straight to the transport (server frames are not masked), under the same conditions (open
connection, no extension, nothing sent after a close); everything else goes through uvicorn.
"""

from __future__ import annotations

from typing import Any

from websockets.frames import apply_mask
from websockets.protocol import State

from .guard import STARTED, GuardedWebSocketProtocol

_BINARY_FIN = 0x82  # FIN bit + opcode 2, RSV bits clear
#: queued messages at which reading the socket pauses (uvicorn's receive() resumes it once the
#: app has emptied the queue): a client that sends faster than the app takes stays bounded
_QUEUE_PAUSE = 64


class FastWebSocketProtocol(GuardedWebSocketProtocol):
    """See the module docstring. Use with ``uvicorn.run(app, ws=FastWebSocketProtocol)``.

    Partial frames wait in a ``bytearray`` with the number of bytes the next parse needs, so
    a frame that arrives a byte at a time costs time linear in its size (each byte is copied
    twice), not quadratic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buf = bytearray()
        self._need = 0  # bytes self._buf must hold before parsing again
        self._fast: bool | None = None  # None: not decided yet (before the handshake completes)
        self._limit = self.conn.max_message_size or self.config.ws_max_size  # small until the app answers
        self._holding = False  # a message went to the app before it answered: hold the rest unparsed
        self._parked = False  # bytes kept unparsed (and the socket not read) until the app takes messages

    def app_answered(self) -> None:
        """The stream started: the full message size, and the bytes held since the start message
        are parsed now (a client may send packets right after its start message)."""
        super().app_answered()
        self._limit = self._full_max
        if self._holding:
            self._holding = False
            self._unpark()

    def _hold(self, rest: bytes | memoryview) -> None:
        """Keep ``rest`` unparsed and stop reading until the app answers (before that, a client
        that has not authenticated gets one message and no more buffer than one read)."""
        self._holding = True
        self._park(rest)

    def _park(self, rest: bytes | memoryview) -> None:
        """Keep ``rest`` unparsed and stop reading the socket: parsing resumes when the app has
        taken the queued messages (:meth:`receive`). A flood of small frames is then parsed only
        as fast as the app takes them, and not at all once the app has closed the stream."""
        self._parked = True
        self._buf += rest
        self._need = 0
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        message = await super().receive()
        if (
            self._parked
            and not self._holding
            and self.queue.qsize() < _QUEUE_PAUSE // 2
            and not self.close_sent
        ):
            self._unpark()
        return message

    def _unpark(self) -> None:
        self._parked = False
        held = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        if held:
            self.data_received(held)
        if not self._parked and self.read_paused and self.queue.empty() and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._fast is None:
            if not self.handshake_complete:
                if self.handshake_initiated:
                    self._fast = False  # frame bytes before the accept: the library keeps them
                super().data_received(data)
                return
            self._fast = not self.conn.reader.buffer and not self.conn.extensions
        if not self._fast:
            super().data_received(data)
            return
        if self._parked:
            self._park(data)
            return
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data
        n = len(buf)
        i = 0
        need = 0
        while True:
            if n - i < 2:
                need = 2
                break
            b0, b1 = buf[i], buf[i + 1]
            length = b1 & 0x7F
            h = 2
            if length == 126:
                if n - i < 4:
                    need = 4
                    break
                length = int.from_bytes(buf[i + 2 : i + 4], "big")
                h = 4
            elif length == 127:
                if n - i < 10:
                    need = 10
                    break
                length = int.from_bytes(buf[i + 2 : i + 10], "big")
                h = 10
            masked = b1 & 0x80
            if length > self._limit or not masked:
                # the library raises the right error (1009 too big, 1002 unmasked)
                self._handover(buf[i:])
                return
            end = i + h + 4 + length
            if end > n:
                need = end - i  # incomplete frame: wait for the rest
                break
            if b0 == _BINARY_FIN and self.conn.state is State.OPEN and not self.close_sent:
                mask = buf[i + h : i + h + 4]
                self.queue.put_nowait(
                    {"type": "websocket.receive", "bytes": apply_mask(buf[i + h + 4 : end], mask)}
                )
                if not self._answered:
                    self._hold(memoryview(buf)[end:])
                    return
                if self.queue.qsize() >= _QUEUE_PAUSE:
                    # backpressure: neither parse nor read more until the app has taken messages
                    self._park(memoryview(buf)[end:])
                    return
            else:
                frame = buf[i:end]
                opcode = b0 & 0x0F
                if not b0 & 0x80 or opcode == 0 or opcode == 8 or b0 & 0x70:
                    # a fragment, a close or extension bits: the library owns the rest
                    self._handover(buf[i:])
                    return
                super().data_received(frame)  # a whole text, ping or pong frame
                if self.conn.parser_exc is not None or self.transport.is_closing():
                    self._fast = False
                    self._buf.clear()
                    return
                if not self._answered and opcode == 1:
                    self._hold(memoryview(buf)[end:])
                    return
                if self.queue.qsize() >= _QUEUE_PAUSE:
                    self._park(memoryview(buf)[end:])
                    return
            i = end
        if i < n:
            self._buf += memoryview(buf)[i:]
        self._need = need

    async def send(self, message: Any) -> None:
        if not self._answered and self.scope.get(STARTED):
            self.app_answered()
        if (
            message["type"] == "websocket.send"
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
            and self.conn.state is State.OPEN
            and not self.conn.extensions
        ):
            data = message.get("bytes")
            opcode = 0x82
            if data is None:
                text = message.get("text")
                if text is None:
                    await super().send(message)
                    return
                data, opcode = text.encode(), 0x81
            await self.writable.wait()
            if self.disconnected or self.close_sent:
                await super().send(message)  # raises or ignores like uvicorn does
                return
            n = len(data)
            if n < 126:
                head = bytes((opcode, n))
            elif n < 1 << 16:
                head = bytes((opcode, 126)) + n.to_bytes(2, "big")
            else:
                head = bytes((opcode, 127)) + n.to_bytes(8, "big")
            self.transport.write(head + data)
            return
        await super().send(message)

    def _handover(self, rest: bytes) -> None:
        self._fast = False
        self._buf.clear()
        super().data_received(rest)
